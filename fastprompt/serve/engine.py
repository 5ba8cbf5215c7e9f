"""The serving engine: many soft-prompt adapters on one frozen causal LM, continuous batching over slots.

Design (what is where, and why it is exact):

- **Bank.** `AdapterStore` keeps each adapter's per-layer prefix keys/values, computed once when it is
  loaded, and concatenates them into one bank per layer. Every row of every step reads its own entry by
  index, so one decode step runs all active rows whatever their adapters (`fastprompt.ops.prefix_attention`).
- **Cache with a common write offset.** The rows' own keys/values live in a preallocated cache
  `[max_slots, Hkv, cache_len, D]` per layer. All active rows end at one common offset `L`: row `i` holds
  its `length_i` tokens at `[L - length_i, L)`, and a `key_padding_mask` built from the lengths hides the
  rest. A decode step therefore writes every row at the same offset `L`, which is exactly the existing
  "prefix" mode of fastprompt's attention (`backbones/attention.py`, unchanged). Where a key sits in the
  cache does not matter to attention (rotary positions are applied before caching; the model's position
  ids are each row's own, `P + length_i`), only the mask does.
- **Prefill.** A new request runs alone through the backbone, writing its prompt into its slot at
  `[L - T, L)` through a view of the cache (so its attention sees exactly its own T keys, as it would
  alone), samples its first token, and joins the batch at the next decode step. If `T > L`, or the common
  offset reaches the end of the cache, the whole block is moved ("rebased") so the longest row ends at
  the new offset: one contiguous copy per layer, amortised by allocating `cache_len = 2 * max_len`.
- **Slots.** Active rows are kept packed in slots `0..n-1` (a decode step reads a view `[:n]` of the
  cache): a row that finishes frees its slot at once, the last row moving into it.
- **Sampling.** Per row: greedy rows share one argmax, sampled rows draw from their own seeded
  `torch.Generator` with `fastprompt.generation.sample_next`, so a request's tokens do not depend on what
  shares its batch, and equal `PromptModel.generate` for the same adapter, prompt and seed.
- **Threading.** `start()` runs `step()` in a background thread. Everything that touches the model
  (prefill, decode, computing a new adapter's prefixes) runs on that thread; `submit`, `cancel`,
  `load_adapter` and `unload_adapter` may be called from any thread (adapter changes are queued and applied
  between steps).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastprompt.backbones import AttentionContext, KVCache, get_backbone
from fastprompt.model import PromptModel
from fastprompt.serve.adapters import AdapterStore
from fastprompt.serve.metrics import Metrics
from fastprompt.serve.sampling import InvalidRequest, SamplingParams, TextTracker, sample_rows

logger = logging.getLogger("fastprompt.serve")


class QueueFull(RuntimeError):
    """The waiting queue is at capacity (the HTTP layer answers 429 with Retry-After)."""


@dataclass
class RequestUpdate:
    token_ids: list[int]          # tokens generated since the last update
    text: str                     # text that became safe to show since the last update
    finished: bool
    finish_reason: str | None     # "stop", "length", "abort", "timeout", "error"


@dataclass(eq=False)
class Request:
    """One generation: prompt token ids, the adapter (and MPT task) to read, sampling parameters."""

    prompt_ids: list[int]
    adapter: str
    params: SamplingParams = field(default_factory=SamplingParams)
    task: int = 0
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    on_update: Callable[["Request", RequestUpdate], None] | None = None
    timeout_s: float | None = None
    # filled in by the engine
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False

    def cancel(self) -> None:
        """Ask the engine to drop this request (a client went away); its slot is freed at the next step."""
        self.cancelled = True

    @property
    def deadline(self) -> float | None:
        return None if self.timeout_s is None else self.arrival + self.timeout_s

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)


@dataclass(eq=False)
class _Row:
    request: Request
    length: int                       # tokens of this row in the cache
    entry: int                        # bank entry
    generator: torch.Generator | None
    tracker: TextTracker
    last_token: int = -1              # sampled, not yet in the cache
    last_time: float = 0.0


class Engine:
    """Continuous batching of soft-prompt requests on one frozen causal LM.

    model: a Hugging Face causal LM (or a PromptModel, whose base model is used); tokenizer: optional
    (needed for stop strings and text); max_slots: rows decoded together; max_len: prompt + generated
    tokens per request; max_queue: waiting requests before `submit` raises QueueFull.
    """

    def __init__(self, model, tokenizer=None, *, max_slots: int = 8, max_len: int = 512, max_queue: int = 64,
                 cache_len: int | None = None, max_prefills_per_step: int = 4, backend: str | None = None,
                 eos_token_id=None, request_timeout_s: float | None = None, cuda_graphs: bool = True):
        base = model.base_model if isinstance(model, PromptModel) else model
        if max_slots < 1 or max_len < 2 or max_queue < 0:
            raise ValueError(f"need max_slots >= 1, max_len >= 2 and max_queue >= 0, got {max_slots}, {max_len}, "
                             f"{max_queue}")
        self.base_model = base.eval()
        self.backbone = get_backbone(base)
        self.tokenizer = tokenizer
        self.backend = backend
        self.max_slots, self.max_len, self.max_queue = max_slots, max_len, max_queue
        self.cache_len = cache_len or 2 * max_len
        if self.cache_len < max_len:
            raise ValueError(f"cache_len must be >= max_len={max_len}, got {self.cache_len}")
        self.max_prefills_per_step = max_prefills_per_step
        self.request_timeout_s = request_timeout_s
        self.device = self.backbone.device
        self.store = AdapterStore(base, backend)
        shape = (max_slots, self.backbone.num_kv_heads, self.cache_len, self.backbone.head_dim)
        # Zeros, not empty: masked cache positions are multiplied by a zero probability, which must stay 0.
        self.keys = [torch.zeros(shape, dtype=self.backbone.dtype, device=self.device)
                     for _ in range(self.backbone.num_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.L = 0                                   # the common write offset
        self.rows: list[_Row] = []                   # active rows, packed in slots 0..n-1
        self.queue: deque[Request] = deque()
        self.lock = threading.Lock()
        self.wakeup = threading.Event()
        self.control: deque[tuple[Callable, Future]] = deque()
        self.metrics = Metrics()
        gen_config = getattr(base, "generation_config", None)
        eos = eos_token_id if eos_token_id is not None else getattr(gen_config, "eos_token_id", None)
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set() if eos is None else set(eos if isinstance(eos, (list, tuple)) else [eos])
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._store_version = self.store.version
        self._graphs = _DecodeGraphs(self) if cuda_graphs and self.device.type == "cuda" else None

    # adapters --------------------------------------------------------------------------------
    def load_adapter(self, name: str, adapter_dir, timeout: float | None = 300):
        """Load a PEFT or fastprompt adapter folder under `name`; safe while serving (applied between steps)."""
        return self._in_engine(lambda: self.store.add_from_dir(name, adapter_dir), timeout)

    def add_adapter(self, name: str, model: PromptModel, adapter_name: str | None = None,
                    timeout: float | None = 300):
        """Serve adapter `adapter_name` of an in-memory PromptModel (on the same base model) as `name`."""
        return self._in_engine(lambda: self.store.add_from_model(name, model, adapter_name), timeout)

    def unload_adapter(self, name: str, timeout: float | None = 300) -> None:
        """Remove an adapter; its running and waiting requests end with finish_reason "abort"."""
        return self._in_engine(lambda: self._unload(name), timeout)

    def adapter_names(self) -> list[str]:
        return self.store.names()

    def _unload(self, name: str) -> None:
        self.store.remove(name)
        for i in reversed(range(len(self.rows))):
            if self.rows[i].request.adapter == name:
                self._finish(self.rows[i].request, "abort", f"adapter {name!r} was unloaded")
                self._free(i)

    def _in_engine(self, fn: Callable, timeout: float | None):
        thread = self._thread
        if thread is None or not thread.is_alive() or threading.current_thread() is thread:
            with torch.no_grad():
                result = fn()
            self._reindex()
            return result
        future: Future = Future()
        self.control.append((fn, future))
        self.wakeup.set()
        return future.result(timeout)

    def _run_control(self) -> None:
        while self.control:
            fn, future = self.control.popleft()
            try:
                future.set_result(fn())
            except BaseException as error:  # handed to the caller's thread
                future.set_exception(error)
        self._reindex()

    def _reindex(self) -> None:
        if self.store.version != self._store_version:
            for row in self.rows:
                row.entry = self.store.entry(row.request.adapter, row.request.task)
            self._store_version = self.store.version

    # requests --------------------------------------------------------------------------------
    def validate(self, request: Request) -> None:
        """Raise InvalidRequest naming the field if the engine cannot run this request."""
        if not isinstance(request.params, SamplingParams):
            raise InvalidRequest("params", "must be a SamplingParams")
        request.params.validate(self.backbone.vocab_size)
        ids = request.prompt_ids
        vocab = self.backbone.vocab_size
        if (not isinstance(ids, (list, tuple)) or not ids
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids)):
            raise InvalidRequest("prompt", f"must be a non-empty list of token ids in [0, {vocab})")
        if len(ids) >= self.max_len:
            raise InvalidRequest("prompt", f"is {len(ids)} tokens; at most {self.max_len - 1} fit (max_len="
                                           f"{self.max_len} counts prompt and generated tokens)")
        if len(ids) + request.params.max_tokens > self.max_len:
            raise InvalidRequest("max_tokens", f"{request.params.max_tokens} new tokens after a {len(ids)}-token "
                                               f"prompt exceed max_len={self.max_len}; at most "
                                               f"{self.max_len - len(ids)}")
        if isinstance(request.task, bool) or not isinstance(request.task, int):
            raise InvalidRequest("task_id", f"must be an integer, got {request.task!r}")
        self.store.entry(request.adapter, request.task)
        if request.timeout_s is None:
            request.timeout_s = self.request_timeout_s

    def submit(self, request: Request) -> Request:
        """Queue a request (any thread). InvalidRequest on bad input, QueueFull when the queue is full."""
        self.validate(request)
        with self.lock:
            if len(self.queue) >= self.max_queue:
                self.metrics.rejected += 1
                raise QueueFull(f"{len(self.queue)} requests are waiting (max_queue={self.max_queue})")
            self.queue.append(request)
        self.wakeup.set()
        return request

    def submit_many(self, requests: list[Request]) -> list[Request]:
        """Queue several requests all together or none."""
        for request in requests:
            self.validate(request)
        with self.lock:
            if len(self.queue) + len(requests) > self.max_queue:
                self.metrics.rejected += 1
                raise QueueFull(f"{len(self.queue)} requests are waiting (max_queue={self.max_queue})")
            self.queue.extend(requests)
        self.wakeup.set()
        return requests

    def generate(self, requests: list[Request], timeout: float | None = None) -> list[Request]:
        """Submit and wait (or step here when no background thread runs)."""
        self.submit_many(requests)
        if self.running:
            for request in requests:
                request.wait(timeout)
        else:
            while not all(r.done.is_set() for r in requests):
                self.step()
        return requests

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def num_running(self) -> int:
        return len(self.rows)

    # the loop ---------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        if not self.running:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="fastprompt-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still running or waiting end with finish_reason "abort"."""
        self._stopping.set()
        self.wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None
        self._abort_all("the engine stopped")

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                worked = self.step()
            except Exception as error:  # never let one bad step end the server
                logger.exception("engine step failed; aborting the running rows")
                self._abort_all(f"internal error: {type(error).__name__}: {error}", running_only=True)
                worked = False
            if not worked:
                self.wakeup.wait(0.05)
                self.wakeup.clear()

    @torch.no_grad()
    def step(self) -> bool:
        """One iteration: adapter changes, drop cancelled/timed-out requests, prefill newcomers, one decode
        step of all active rows. Returns whether there was anything to do."""
        self._run_control()
        self._reap()
        admitted = self._admit()
        if self.rows:
            self._decode()
            return True
        return admitted

    def _reap(self) -> None:
        now = time.monotonic()
        for i in reversed(range(len(self.rows))):
            request = self.rows[i].request
            reason = self._drop_reason(request, now)
            if reason:
                self._finish(request, reason, "cancelled" if reason == "abort" else "request timed out")
                self._free(i)
        with self.lock:
            dropped = [r for r in self.queue if self._drop_reason(r, now)]
            for r in dropped:
                self.queue.remove(r)
        for r in dropped:
            reason = self._drop_reason(r, now)
            self._finish(r, reason, "cancelled" if reason == "abort" else "request timed out")

    @staticmethod
    def _drop_reason(request: Request, now: float) -> str | None:
        if request.cancelled:
            return "abort"
        if request.deadline is not None and now > request.deadline:
            return "timeout"
        return None

    def _admit(self) -> bool:
        admitted = 0
        while len(self.rows) < self.max_slots and admitted < self.max_prefills_per_step:
            with self.lock:
                if not self.queue:
                    break
                request = self.queue.popleft()
            try:
                entry = self.store.entry(request.adapter, request.task)
            except InvalidRequest as error:  # unloaded while it waited
                self._finish(request, "error", str(error))
                continue
            self._prefill(request, entry)
            admitted += 1
        return admitted > 0

    def _prefill(self, request: Request, entry: int) -> None:
        ids = request.prompt_ids
        T, P = len(ids), self.store.num_virtual_tokens
        if not self.rows:
            self.L = 0
        if T > self.L:
            self._rebase(max([T] + [r.length for r in self.rows]))
        slot, L = len(self.rows), self.L
        cache = KVCache([k[slot:slot + 1, :, L - T:L] for k in self.keys],
                        [v[slot:slot + 1, :, L - T:L] for v in self.values], length=0)
        ctx = AttentionContext("prefix", self.store.bank_k, self.store.bank_v,
                               torch.tensor([entry], device=self.device), cache=cache, backend=self.backend)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = torch.arange(P, P + T, device=self.device)[None]
        hidden = self.backbone.hidden_states(input_ids=input_ids, position_ids=positions, ctx=ctx)
        logits = self.backbone.lm_head(hidden[:, -1])
        params = request.params
        row = _Row(request, T, entry, params.make_generator(self.device), TextTracker(self.tokenizer, params.stop))
        self.rows.append(row)
        with self.metrics.lock:
            self.metrics.prompt_tokens += T
        token = sample_rows(logits, [params], [row.generator])[0]
        self.metrics.tokens(1)
        if self._emit(row, token):
            self._free(slot)

    def _decode(self) -> None:
        start_time = time.monotonic()
        n = len(self.rows)
        if self.L >= self.cache_len:
            self._rebase(max(r.length for r in self.rows))
        P, L = self.store.num_virtual_tokens, self.L
        lengths = torch.tensor([r.length for r in self.rows], device=self.device)
        input_ids = torch.tensor([[r.last_token] for r in self.rows], dtype=torch.long, device=self.device)
        positions = lengths[:, None] + P
        task_ids = torch.tensor([r.entry for r in self.rows], dtype=torch.long, device=self.device)
        logits = None
        if self._graphs is not None:
            logits = self._graphs.run(input_ids, positions, task_ids, lengths)
        if logits is None:
            mask = torch.arange(L + 1, device=self.device)[None] >= (L - lengths)[:, None]
            cache = KVCache([k[:n] for k in self.keys], [v[:n] for v in self.values], length=L)
            ctx = AttentionContext("prefix", self.store.bank_k, self.store.bank_v, task_ids, key_padding_mask=mask,
                                   cache=cache, backend=self.backend)
            hidden = self.backbone.hidden_states(input_ids=input_ids, position_ids=positions, ctx=ctx)
            logits = self.backbone.lm_head(hidden[:, -1])
        self.L += 1
        for row in self.rows:
            row.length += 1
        tokens = sample_rows(logits, [r.request.params for r in self.rows], [r.generator for r in self.rows])
        self.metrics.tokens(n)
        finished = [i for i, (row, token) in enumerate(zip(self.rows, tokens)) if self._emit(row, token)]
        for i in reversed(finished):
            self._free(i)
        with self.metrics.lock:
            self.metrics.steps += 1
        self.metrics.observe(self.metrics.step_time, time.monotonic() - start_time)

    # rows and slots ---------------------------------------------------------------------------
    def _emit(self, row: _Row, token: int) -> bool:
        """Record a sampled token, tell the client, and return whether the row has finished."""
        request, params = row.request, row.request.params
        request.output_ids.append(token)
        now = time.monotonic()
        if request.first_token_time is None:
            request.first_token_time = now
            self.metrics.observe(self.metrics.ttft, now - request.arrival)
        else:
            self.metrics.observe(self.metrics.itl, now - row.last_time)
        row.last_time = now
        row.last_token = token
        reason = None
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        delta, stopped = row.tracker.push([] if reason else [token])
        if stopped:
            reason = "stop"
        elif reason is None and len(request.output_ids) >= params.max_tokens:
            reason = "length"
        if reason and not stopped:
            delta += row.tracker.flush()
        request.text = row.tracker.text
        if reason:
            self._finish(request, reason, None, update=RequestUpdate([token], delta, True, reason))
            return True
        self._notify(request, RequestUpdate([token], delta, False, None))
        return False

    def _finish(self, request: Request, reason: str, error: str | None, update: RequestUpdate | None = None):
        if request.done.is_set():
            return
        request.finish_reason, request.error = reason, error
        request.finish_time = time.monotonic()
        self.metrics.finished(reason)
        self.metrics.observe(self.metrics.e2e, request.finish_time - request.arrival)
        self._notify(request, update or RequestUpdate([], "", True, reason))
        request.done.set()

    @staticmethod
    def _notify(request: Request, update: RequestUpdate) -> None:
        if request.on_update is not None:
            try:
                request.on_update(request, update)
            except Exception:  # a listener's failure is never the batch's
                logger.exception("on_update of request %s failed", request.request_id)

    def _free(self, i: int) -> None:
        """Free slot i at once: the last active row moves into it, so rows stay packed."""
        last = len(self.rows) - 1
        if i != last:
            moved = self.rows[last]
            lo, hi = self.L - moved.length, self.L
            for buf in self.keys + self.values:
                buf[i, :, lo:hi] = buf[last, :, lo:hi]
            self.rows[i] = moved
        self.rows.pop()
        if not self.rows:
            self.L = 0

    def _rebase(self, new_L: int) -> None:
        """Move every row's tokens so that they end at offset new_L (one block copy per layer)."""
        n, m = len(self.rows), max([r.length for r in self.rows], default=0)
        if m and new_L != self.L:
            for buf in self.keys + self.values:
                block = buf[:n, :, self.L - m:self.L].clone()
                buf[:n, :, new_L - m:new_L] = block
        self.L = new_L
        if self._graphs is not None:
            self._graphs.invalidate()

    def _abort_all(self, message: str, running_only: bool = False) -> None:
        for row in self.rows:
            self._finish(row.request, "error" if running_only else "abort", message)
        self.rows.clear()
        self.L = 0
        if running_only:
            return
        with self.lock:
            waiting, self.queue = list(self.queue), deque()
        for request in waiting:
            self._finish(request, "abort", message)


class _DecodeGraphs:
    """CUDA-graph capture of the decode step, for CUDA devices only (not exercised on CPU).

    fastprompt's "prefix" attention writes the cache at a Python-int offset and reads a growing key
    range, both baked into a captured graph. A graph is therefore keyed on (batch size, offset L, bank
    version) and valid for one step only unless the attention learns device-side write offsets; until
    then `run` returns None (eager decode) and capture is off. The class keeps the engine's call site
    and invalidation points in place for that change (see the report to the lead).
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.enabled = False

    def invalidate(self) -> None:
        pass

    def run(self, input_ids, positions, task_ids, lengths):
        return None
