"""Per-request sampling parameters, their validation, and incremental detokenization with stop strings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fastprompt.generation import sample_next


class InvalidRequest(ValueError):
    """A request the engine refuses; `field` names the offending field (the HTTP layer answers 400)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


MAX_STOP_STRINGS = 16


@dataclass
class SamplingParams:
    """max_tokens new tokens at most; temperature 0 = greedy; top_k 0 (or -1) = off; top_p 1 = off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Normalise in place and raise InvalidRequest naming the first bad field."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        temperature, top_p = _finite(self.temperature), _finite(self.top_p)
        if temperature is None or not 0 <= temperature <= 100:
            raise InvalidRequest("temperature", f"must be a number in [0, 100], got {self.temperature!r}")
        self.temperature = temperature
        if top_p is None or not 0 < top_p <= 1:
            raise InvalidRequest("top_p", f"must be a number in (0, 1], got {self.top_p!r}")
        self.top_p = top_p
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidRequest("top_k", f"must be an integer >= 0 (0 or -1 = off), got {self.top_k!r}")
        self.top_k = max(self.top_k, 0)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2**63 <= self.seed < 2**64):
            raise InvalidRequest("seed", f"must be an integer, got {self.seed!r}")
        stop = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if (not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop)
                or len(stop) > MAX_STOP_STRINGS):
            raise InvalidRequest("stop", f"must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                                         f"non-empty strings, got {self.stop!r}")
        self.stop = list(stop)
        ids = self.stop_token_ids or []
        if (not isinstance(ids, (list, tuple))
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
                or (vocab_size is not None and any(t >= vocab_size for t in ids))):
            raise InvalidRequest("stop_token_ids", f"must be a list of token ids in [0, {vocab_size}), got {ids!r}")
        self.stop_token_ids = list(ids)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest("ignore_eos", f"must be a boolean, got {self.ignore_eos!r}")
        return self

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        if self.seed is not None:
            generator.manual_seed(self.seed % 2**64)
        else:
            generator.seed()
        return generator


def _finite(value) -> float | None:
    """value as a float if it is a finite real number (not a bool), else None; an integer too large for a
    float is not finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[int | None]:
    """Next token per row of logits [n, V]: one argmax for all greedy rows, then each sampled row with its
    own generator (so a seeded request draws the same tokens whatever else shares the batch, and the same
    as `PromptModel.generate(..., seed=...)` run on it alone). None for a row whose logits are not all
    finite: it has no next token, and sampling it would fail the whole batch."""
    # One host read for both: the argmax and each row's finiteness.
    chosen, finite = torch.stack([logits.argmax(dim=-1), torch.isfinite(logits).all(dim=-1).long()]).tolist()
    for i, (p, g) in enumerate(zip(params, generators)):
        if not finite[i]:
            chosen[i] = None
        elif not p.greedy:
            chosen[i] = int(sample_next(logits[i:i + 1], do_sample=True, temperature=p.temperature, top_k=p.top_k,
                                        top_p=p.top_p, generator=g)[0])
    return chosen


class TextTracker:
    """Incremental detokenization: the text a request may show so far, holding back what could still
    become a stop string (or an incomplete character), and the stop-string check."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = 0  # characters already handed out
        self.text = ""

    def _decode(self) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_ids: list[int]) -> tuple[str, bool]:
        """Add tokens; (new text safe to show, whether a stop string ended the text)."""
        self.ids.extend(token_ids)
        if self.tokenizer is None:
            return "", False
        full = self._decode()
        for s in self.stop:
            at = full.find(s, max(0, self.emitted - len(s)))
            if at >= 0:
                full = full[:at] if at >= self.emitted else full[:self.emitted]
                self.text = full
                delta, self.emitted = full[self.emitted:], len(full)
                return delta, True
        self.text = full
        safe = len(full)
        if full.endswith("\ufffd"):
            safe -= 1
        for s in self.stop:
            for k in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:k]):
                    safe = min(safe, len(full) - k)
                    break
        if safe <= self.emitted:
            return "", False
        delta, self.emitted = full[self.emitted:safe], safe
        return delta, False

    def flush(self) -> str:
        """The held-back remainder when the request ends for another reason."""
        delta, self.emitted = self.text[self.emitted:], len(self.text)
        return delta
