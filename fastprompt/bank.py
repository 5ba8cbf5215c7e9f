"""The prefix bank: the one place per-layer prefix keys/values are built from prompt sources.

Every soft-prompt method on a causal decoder becomes a prefix (ARCHITECTURE.md, "One idea"): prefix tuning's
keys/values are its parameters; prompt tuning's, P-tuning's and MPT's come from one backbone pass over the
prompts (the prompt pass). A bank entry is one prompt (MPT: one per task).

- `entry_prompts` / `entry_kv`: the prompts or per-layer keys/values of some entries of some sources, for one
  forward (differentiable: a training step reads them). `PromptModel`, its encoder and encoder-decoder
  subclasses and serving all build them here.
- `PrefixBank`: entries held for serving, per layer `[n_entries, Hkv, P, D]` in buffers grown in place, so
  an added adapter costs its own rows. Entries may differ in prefix length P_e: the bank is as wide as the
  longest, a shorter prefix is zero-padded after its P_e real positions and `prefix_bias` [n_entries, P] (0 on
  real positions, PREFIX_PAD_BIAS on padding) hides the padding from every query through prefix attention's
  additive bias. A finite bias rather than a mask: a row always sees its own latest key, so the padding's
  softmax weight is exactly 0 in fp32 (exp(-1e9)), and the kernels need no per-entry prefix length. With one
  prefix length the bias is None and costs nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastprompt.backbones import AttentionContext
from fastprompt.backbones.attention import Captures
from fastprompt.methods import PromptSource

PREFIX_PAD_BIAS = -1e9  # added to the scores of a padded prefix position (fp32 in the kernels)

# (source, its local entry ids [n] int64): the entries of one source a forward reads, in bank order
SourceEntries = Sequence[tuple[PromptSource, torch.Tensor]]


def entry_prompts(parts: SourceEntries, dtype: torch.dtype, backend: str | None = None) -> torch.Tensor:
    """Virtual-token embeddings of the entries of virtual-token sources, concatenated: [n_entries, P, d] in
    `dtype`. The sources must share P."""
    prompts = [source.prompts(entries, backend) for source, entries in parts]
    return (prompts[0] if len(prompts) == 1 else torch.cat(prompts)).to(dtype)


def stacked_kv(parts: SourceEntries, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prefix tuning's keys and values of the entries, per prefixed layer [n_entries, Hkv, P, D] in `dtype`
    (one source: its per-layer views as they are, no concatenation)."""
    kv = [source.prefix_kv(entries) for source, entries in parts]
    if len(kv) == 1:
        return [k.to(dtype) for k in kv[0][0]], [v.to(dtype) for v in kv[0][1]]
    layers = range(len(kv[0][0]))
    return ([torch.cat([keys[i] for keys, _ in kv]).to(dtype) for i in layers],
            [torch.cat([values[i] for _, values in kv]).to(dtype) for i in layers])


def prompt_pass(backbone, prompts: torch.Tensor, backend: str | None = None):
    """(keys, values, last_hidden) of prompts [n, P, d] run through a causal backbone at positions 0..P-1:
    per-layer keys/values [n, Hkv, P, D] and the last virtual token's final hidden state [n, d]."""
    n, P = prompts.shape[:2]
    ctx = AttentionContext("capture", backend=backend, captured=Captures())
    positions = torch.arange(P, device=prompts.device)[None].expand(n, P)
    hidden = backbone.hidden_states(inputs_embeds=prompts, position_ids=positions, ctx=ctx)
    layers = range(backbone.num_layers)
    return [ctx.captured.keys[i] for i in layers], [ctx.captured.values[i] for i in layers], hidden[:, -1]


def entry_kv(backbone, parts: SourceEntries, backend: str | None = None):
    """(keys, values, last_hidden) of the entries on a causal backbone: per-layer [n_entries, Hkv, P, D] in the
    backbone's dtype, and the last virtual token's final hidden state [n_entries, d] (None for prefix tuning,
    whose keys/values are its parameters; virtual-token methods' come from `prompt_pass`)."""
    if parts[0][0].kind == "kv":
        return (*stacked_kv(parts, backbone.dtype), None)
    return prompt_pass(backbone, entry_prompts(parts, backbone.dtype, backend), backend)


class PrefixBank:
    """Named groups of entries (an adapter's), their prefixes packed per layer for prefix attention.

    keys, values: per layer [n_entries, Hkv, P, D], views of buffers with spare rows (None when empty);
    offsets: name -> its first row; entry_lengths: int64 [n_entries], each entry's P_e on the device;
    prefix_bias: fp32 [n_entries, P] or None (every P_e == P); version: bumps on every change.
    `add` writes into the next free rows (capacity doubles when full); only a prefix wider than the bank
    re-pads the rest, and `remove` re-packs. Callers add and remove between reads, never during one.
    """

    def __init__(self):
        self.groups: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.offsets: dict[str, int] = {}
        self.keys: list[torch.Tensor] | None = None
        self.values: list[torch.Tensor] | None = None
        self._buffers: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # [capacity, Hkv, P, D]
        self.entry_lengths: torch.Tensor | None = None
        self.prefix_bias: torch.Tensor | None = None
        self.version = 0

    @property
    def num_entries(self) -> int:
        return sum(keys[0].shape[0] for keys, _ in self.groups.values())

    @property
    def num_virtual_tokens(self) -> int | None:
        """The bank's width P: the longest group's prefix (None when empty)."""
        return max((keys[0].shape[2] for keys, _ in self.groups.values()), default=None)

    def add(self, name: str, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Hold group `name`'s per-layer keys/values [n, Hkv, P_e, D] (kept as given: pass contiguous
        tensors nothing else writes) in the bank's next rows. On failure (tensors that do not fit the bank)
        the bank reads as before the call."""
        if name in self.groups:
            raise ValueError(f"{name!r} is already in the bank")
        n = self.num_entries
        self.groups[name] = keys, values
        try:
            if self._buffers is None or keys[0].shape[2] > self._buffers[0][0].shape[2]:
                self._repack()
            else:
                self._write_rows(n, keys, values)
        except BaseException:
            del self.groups[name]  # nothing was published: the views, offsets and bias are the old ones
            raise

    def _write_rows(self, n: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Write a group into rows n.. of the buffers (grown when full) and publish them."""
        buffers_k, buffers_v = self._buffers
        capacity, P = buffers_k[0].shape[0], buffers_k[0].shape[2]
        rows = keys[0].shape[0]
        if n + rows > capacity:
            grown = max(n + rows, 2 * capacity)
            self._buffers = buffers_k, buffers_v = ([_with_rows(t[:n], grown) for t in buffers_k],
                                                    [_with_rows(t[:n], grown) for t in buffers_v])
        for buffers, parts in ((buffers_k, keys), (buffers_v, values)):
            for buffer, part in zip(buffers, parts):
                buffer[n:n + rows] = pad_prefix(part, P)
        self._publish()

    def remove(self, name: str) -> None:
        del self.groups[name]
        self._repack()

    def _repack(self) -> None:
        """Every group packed into fresh buffers, exactly as wide as the longest prefix."""
        groups = list(self.groups.values())
        if not groups:
            self._buffers = None
        else:
            P = self.num_virtual_tokens
            layers = range(len(groups[0][0]))
            self._buffers = tuple([torch.cat([pad_prefix(group[side][i], P) for group in groups]) for i in layers]
                                  for side in (0, 1))
        self._publish()

    def _publish(self) -> None:
        """Point the bank at the buffers' used rows, with the groups' offsets, lengths and bias."""
        offsets, offset = {}, 0
        for name, (keys, _) in self.groups.items():
            offsets[name] = offset
            offset += keys[0].shape[0]
        self.offsets = offsets  # one assignment: other threads validating requests never see it half-built
        if self._buffers is None:
            self.keys = self.values = self.entry_lengths = self.prefix_bias = None
        else:
            self.keys = [t[:offset] for t in self._buffers[0]]
            self.values = [t[:offset] for t in self._buffers[1]]
            P, device = self.keys[0].shape[2], self.keys[0].device
            lengths = [keys[0].shape[2] for keys, _ in self.groups.values() for _ in range(keys[0].shape[0])]
            self.entry_lengths = torch.tensor(lengths, device=device)
            padded = torch.arange(P, device=device)[None] >= self.entry_lengths[:, None]
            self.prefix_bias = (padded.float() * PREFIX_PAD_BIAS) if padded.any() else None
        self.version += 1


def _with_rows(prefix: torch.Tensor, rows: int) -> torch.Tensor:
    """A new buffer of `rows` entries holding `prefix` [n, Hkv, P, D] in its first n (the rest unwritten)."""
    buffer = prefix.new_empty((rows, *prefix.shape[1:]))
    buffer[:len(prefix)] = prefix
    return buffer


def pad_prefix(prefix: torch.Tensor, P: int) -> torch.Tensor:
    """[n, Hkv, P_e, D] -> [n, Hkv, P, D], zeros after the real positions (finite: their weight is 0)."""
    return torch.nn.functional.pad(prefix, (0, 0, 0, P - prefix.shape[2]))
