"""The limits on what one client or one adapter may make a server hold or do (`ServeLimits`).

Every size a client controls has a limit here or beside the engine's shape (max_len, max_slots,
max_queue, the body and prompt limits of `fastprompt.serve.server`); the README's limits table lists them
all with their `fastprompt serve` flags. A request over a limit is a 400 naming the field and the limit, an
adapter over one is refused before it reaches the bank.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ServeLimits:
    """max_adapters: adapters loaded at once (each is a bank entry every decode step can read; MPT's one per
    task); max_virtual_tokens: an adapter's num_virtual_tokens (the bank is as wide as its longest prefix,
    so one long adapter costs every row); max_stop_strings / max_stop_chars: a request's stop strings and
    the characters of each (the hold-back check is quadratic in a stop string's length);
    max_stop_token_ids: a request's stop token ids."""

    max_adapters: int = 64
    max_virtual_tokens: int = 256
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_stop_token_ids: int = 256

    def __post_init__(self):
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{spec.name} must be an integer >= 1, got {value!r}")
