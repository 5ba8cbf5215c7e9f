"""Serving metrics in Prometheus' text exposition format (no client library needed)."""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections import deque

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets=LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help_text, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # per bucket, the last one past every edge; cumulated on render
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1  # called per token: one lookup, not a scan
        self.total += 1
        self.sum += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for edge, count in zip(self.buckets, itertools.accumulate(self.counts)):
            lines.append(f'{self.name}_bucket{{le="{edge}"}} {count}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.total}', f"{self.name}_sum {self.sum:.6f}",
                  f"{self.name}_count {self.total}"]
        return lines


class Metrics:
    """Updated by the engine thread, read by the HTTP thread; one lock keeps the two consistent."""

    def __init__(self, window_s: float = 10.0):
        self.lock = threading.Lock()
        self.window_s = window_s
        self.recent_tokens: deque[tuple[float, int]] = deque()
        self.requests: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.rejected = 0
        self.ttft = Histogram("fastprompt_time_to_first_token_seconds", "Time from arrival to the first token.")
        self.itl = Histogram("fastprompt_inter_token_latency_seconds", "Time between a request's tokens.")
        self.e2e = Histogram("fastprompt_request_latency_seconds", "Time from arrival to the last token.")
        self.step_time = Histogram("fastprompt_decode_step_seconds", "Duration of one batched decode step.")

    def tokens(self, count: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.generation_tokens += count
            self.recent_tokens.append((now, count))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self.recent_tokens and self.recent_tokens[0][0] < now - self.window_s:
            self.recent_tokens.popleft()

    def tokens_per_second(self) -> float:
        with self.lock:
            now = time.monotonic()
            self._trim(now)
            return sum(c for _, c in self.recent_tokens) / self.window_s

    def finished(self, reason: str) -> None:
        with self.lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1

    def observe(self, histogram: Histogram, value: float) -> None:
        with self.lock:
            histogram.observe(value)

    def render(self, *, queue_depth: int, running: int, max_slots: int, adapters: int) -> str:
        tps = self.tokens_per_second()
        with self.lock:
            lines = [
                "# HELP fastprompt_queue_depth Requests waiting for a slot.", "# TYPE fastprompt_queue_depth gauge",
                f"fastprompt_queue_depth {queue_depth}",
                "# HELP fastprompt_running_rows Rows in the running batch.", "# TYPE fastprompt_running_rows gauge",
                f"fastprompt_running_rows {running}",
                "# HELP fastprompt_max_slots Slots of the batch.", "# TYPE fastprompt_max_slots gauge",
                f"fastprompt_max_slots {max_slots}",
                "# HELP fastprompt_adapters Loaded adapters.", "# TYPE fastprompt_adapters gauge",
                f"fastprompt_adapters {adapters}",
                f"# HELP fastprompt_generation_tokens_per_second Generated tokens per second over the last "
                f"{self.window_s:g} s.",
                "# TYPE fastprompt_generation_tokens_per_second gauge",
                f"fastprompt_generation_tokens_per_second {tps:.3f}",
                "# HELP fastprompt_prompt_tokens_total Prompt tokens prefilled.",
                "# TYPE fastprompt_prompt_tokens_total counter", f"fastprompt_prompt_tokens_total {self.prompt_tokens}",
                "# HELP fastprompt_generation_tokens_total Tokens generated.",
                "# TYPE fastprompt_generation_tokens_total counter",
                f"fastprompt_generation_tokens_total {self.generation_tokens}",
                "# HELP fastprompt_decode_steps_total Batched decode steps.",
                "# TYPE fastprompt_decode_steps_total counter", f"fastprompt_decode_steps_total {self.steps}",
                "# HELP fastprompt_rejected_total Requests refused because the queue was full.",
                "# TYPE fastprompt_rejected_total counter", f"fastprompt_rejected_total {self.rejected}",
                "# HELP fastprompt_requests_total Finished requests by finish reason.",
                "# TYPE fastprompt_requests_total counter",
            ]
            for reason, count in sorted(self.requests.items()):
                lines.append(f'fastprompt_requests_total{{finish_reason="{reason}"}} {count}')
            for histogram in (self.ttft, self.itl, self.e2e, self.step_time):
                lines += histogram.render()
        return "\n".join(lines) + "\n"
