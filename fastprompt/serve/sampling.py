"""Per-request sampling parameters, their validation, and incremental detokenization with stop strings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fastprompt.generation import sample_next
from fastprompt.serve.limits import ServeLimits


class InvalidRequest(ValueError):
    """A request the engine refuses; `field` names the offending field (the HTTP layer answers 400)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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
    stop_token_set: frozenset[int] = field(default=frozenset(), init=False, repr=False)  # for the decode loop

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self, vocab_size: int | None = None, limits: ServeLimits | None = None) -> "SamplingParams":
        """Normalise in place and raise InvalidRequest naming the first bad field; `limits` (default
        ServeLimits()) bounds the stop strings and stop token ids."""
        limits = limits or ServeLimits()
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
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequest("stop", f"must be a non-empty string or a list of non-empty strings, got "
                                         f"{_preview(self.stop)}")
        if len(stop) > limits.max_stop_strings:
            raise InvalidRequest("stop", f"has {len(stop)} strings; at most {limits.max_stop_strings} "
                                         f"(the server's --max-stop-strings)")
        longest = max(stop, key=len, default="")
        if len(longest) > limits.max_stop_chars:
            raise InvalidRequest("stop", f"holds a string of {len(longest)} characters; at most "
                                         f"{limits.max_stop_chars} each (the server's --max-stop-chars)")
        self.stop = [unicode_text("stop", s) for s in stop]
        ids = self.stop_token_ids or []
        if not isinstance(ids, (list, tuple)):
            raise InvalidRequest("stop_token_ids", f"must be a list of token ids, got {_preview(ids)}")
        if len(ids) > limits.max_stop_token_ids:
            raise InvalidRequest("stop_token_ids", f"has {len(ids)} ids; at most {limits.max_stop_token_ids} (the "
                                                   f"server's --max-stop-token-ids)")
        if (not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
                or (vocab_size is not None and any(t >= vocab_size for t in ids))):
            raise InvalidRequest("stop_token_ids", f"must be a list of token ids in [0, {vocab_size}), got "
                                                   f"{_preview(ids)}")
        self.stop_token_ids = list(ids)
        self.stop_token_set = frozenset(ids)
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


def _preview(value, chars: int = 80) -> str:
    """repr(value), cut to `chars` characters: an error message never echoes a huge field back."""
    text = repr(value)
    return text if len(text) <= chars else text[:chars] + f"... ({len(text)} characters)"


def unicode_text(field: str, value: str) -> str:
    """value, if it is valid Unicode: JSON lets a lone surrogate (\\ud800) through, and tokenizers and file
    paths fail on one."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequest(field, f"is not valid Unicode text (a lone surrogate at index {error.start})") from None
    return value


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
            # The longest tail of the text that begins s: only a tail starting with s[0] can (a stop string's
            # length is bounded by ServeLimits.max_stop_chars, so this stays cheap per token).
            at = full.find(s[0], max(len(full) - len(s) + 1, 0))
            while at >= 0:
                if s.startswith(full[at:]):
                    safe = min(safe, at)
                    break
                at = full.find(s[0], at + 1)
        if safe <= self.emitted:
            return "", False
        delta, self.emitted = full[self.emitted:safe], safe
        return delta, False

    def flush(self) -> str:
        """The held-back remainder when the request ends for another reason."""
        delta, self.emitted = self.text[self.emitted:], len(self.text)
        return delta
