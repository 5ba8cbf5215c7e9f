"""What a client hands the engine and gets back: `Request`, its `RequestUpdate`s, `QueueFull`, and the checks
that a request fits an engine (`check_request`) or should be dropped now (`drop_reason`).

A request's prompt is a list of int token ids in [0, vocab); its results (`output_ids`, `text`,
`finish_reason`, `error`, timing) are filled in by the engine's thread, which sets `done` last. Nothing here
touches a tensor.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from fastprompt.serve.sampling import InvalidRequest, SamplingParams


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


def check_request(request: Request, *, backbone, store, max_len: int, has_tokenizer: bool) -> None:
    """Raise InvalidRequest naming the field if an engine with this backbone (vocab_size, max_positions,
    sliding_window), adapter store (`AdapterStore`: the adapter, its task and its P virtual tokens) and
    max_len (prompt + generated tokens) cannot run the request. Reads every prompt id; changes nothing."""
    if not isinstance(request.params, SamplingParams):
        raise InvalidRequest("params", "must be a SamplingParams")
    request.params.validate(backbone.vocab_size, store.limits)
    ids = request.prompt_ids
    vocab = backbone.vocab_size
    # The length first: it costs nothing, and a huge prompt is refused before its ids are read.
    if isinstance(ids, (list, tuple)) and len(ids) >= max_len:
        raise InvalidRequest("prompt", f"is {len(ids)} tokens; at most {max_len - 1} fit (max_len="
                                       f"{max_len} counts prompt and generated tokens)")
    if (not isinstance(ids, (list, tuple)) or not ids
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids)):
        raise InvalidRequest("prompt", f"must be a non-empty list of token ids in [0, {vocab})")
    if len(ids) + request.params.max_tokens > max_len:
        raise InvalidRequest("max_tokens", f"{request.params.max_tokens} new tokens after a {len(ids)}-token "
                                           f"prompt exceed max_len={max_len}; at most "
                                           f"{max_len - len(ids)}")
    if isinstance(request.task, bool) or not isinstance(request.task, int):
        raise InvalidRequest("task_id", f"must be an integer, got {request.task!r}")
    store.entry(request.adapter, request.task)
    P = store.num_virtual_tokens_of(request.adapter)
    # Position ids run to P + len + max_tokens - 2 (the last token is not fed back), and the last query
    # sees one key more: both must stay below the limit.
    for limit, what in ((backbone.max_positions, "learned positions"),
                        (backbone.sliding_window, "sliding window")):
        if limit is None:
            continue
        if P + len(ids) > limit:
            raise InvalidRequest("prompt", f"is {len(ids)} tokens; after {P} virtual tokens at most "
                                           f"{limit - P} fit the model's {what}")
        if P + len(ids) + request.params.max_tokens - 2 >= limit:
            raise InvalidRequest("max_tokens", f"{request.params.max_tokens} new tokens after {P} virtual and "
                                               f"{len(ids)} prompt tokens exceed the model's {what}; at most "
                                               f"{limit - P - len(ids) + 1}")
    if request.params.stop and not has_tokenizer:
        raise InvalidRequest("stop", "stop strings need a tokenizer, and this engine has none (token-id "
                                     "prompts only): use stop_token_ids")


def drop_reason(request: Request, now: float) -> str | None:
    """"abort" for a cancelled request, "timeout" for one past its deadline (time.monotonic() `now`), else
    None."""
    if request.cancelled:
        return "abort"
    if request.deadline is not None and now > request.deadline:
        return "timeout"
    return None
