"""The adapter store: each adapter's per-layer prefix keys/values, computed once, and the bank built from them.

Every soft-prompt method on a causal decoder becomes a prefix (ARCHITECTURE.md, "One idea"): prompt tuning,
P-tuning and MPT through one prompt pass (`PromptModel.bank_kv`), prefix tuning straight from its
parameters. An adapter contributes `num_entries` bank rows (MPT: one per task, otherwise one); the bank
is the concatenation over adapters, per layer `[n_entries, Hkv, P, D]` on the model's device, and a row
reads entry `offset[adapter] + task`.

Adapters may differ in `num_virtual_tokens`. The bank is as wide as the longest prefix, P = max P_e: a
shorter prefix is zero-padded after its P_e real positions, and `prefix_bias` [n_entries, P] (0 on real
positions, PREFIX_PAD_BIAS on padding) hides the padding from every query through prefix attention's
additive bias. A finite bias rather than a mask: a row always sees its own latest key, so the padding's
softmax weight is exactly 0 in fp32 (exp(-1e9)), and the kernels need no per-entry prefix length. With
one prefix length the bias is None and costs nothing.

Growth costs what the new adapter costs: the bank lives in per-layer buffers with spare rows (capacity
doubles when full), and an added adapter is written into the next free rows; only an adapter wider than the
bank (its P larger than every loaded one's) re-pads the rest. Removing an adapter re-packs the bank.
`ServeLimits` bounds the number of adapters and each one's num_virtual_tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from fastprompt.config import MULTITASK_PROMPT_TUNING
from fastprompt.model import PromptModel
from fastprompt.serve.limits import ServeLimits
from fastprompt.serve.sampling import InvalidRequest

PREFIX_PAD_BIAS = -1e9  # added to the scores of a padded prefix position (fp32 in the kernels)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-:/]{0,127}$")


@dataclass
class StoredAdapter:
    name: str
    peft_type: str
    num_virtual_tokens: int
    num_entries: int              # MPT: num_tasks; otherwise 1
    keys: list[torch.Tensor]      # per layer [num_entries, Hkv, P, D]
    values: list[torch.Tensor]
    source: str | None = None     # the folder it came from


class AdapterStore:
    """name -> StoredAdapter, and the bank tensors (grown in place on add, re-packed on remove; the engine
    calls these only between steps). limits: ServeLimits (max_adapters, max_virtual_tokens)."""

    def __init__(self, base_model: torch.nn.Module, backend: str | None = None, limits: ServeLimits | None = None):
        self.base_model = base_model
        self.backend = backend
        self.limits = limits or ServeLimits()
        self.adapters: dict[str, StoredAdapter] = {}
        self.offsets: dict[str, int] = {}
        self.bank_k: list[torch.Tensor] | None = None   # per layer [n_entries, Hkv, P, D]: views of _buffers
        self.bank_v: list[torch.Tensor] | None = None
        self._buffers: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # [capacity, Hkv, P, D]
        self.entry_lengths: torch.Tensor | None = None  # int64 [n_entries]: each entry's P_e, on the device
        self.prefix_bias: torch.Tensor | None = None    # fp32 [n_entries, P], None when every P_e == P
        self.version = 0  # bumps on every change, so the engine knows to re-index its rows

    @property
    def num_virtual_tokens(self) -> int | None:
        """The bank's prefix width P: the longest adapter's num_virtual_tokens (None when empty)."""
        return max((a.num_virtual_tokens for a in self.adapters.values()), default=None)

    def names(self) -> list[str]:
        return list(self.adapters)

    def check_name(self, name, field: str = "adapter_name") -> None:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise InvalidRequest(field, f"must be 1-128 characters of letters, digits and ._-:/ (starting with a "
                                        f"letter or digit), got {name!r}")

    @torch.no_grad()
    def add_from_dir(self, name: str, adapter_dir) -> StoredAdapter:
        """Load a PEFT or fastprompt adapter folder (PromptModel.load_adapter) and store its prefixes."""
        self._check_room(name)
        model = PromptModel(self.base_model, backend=self.backend)
        try:
            model.load_adapter(adapter_dir, name)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise InvalidRequest("adapter_path", f"could not load an adapter from {str(adapter_dir)!r}: "
                                                 f"{error}") from error
        return self.add_from_model(name, model, name, source=str(adapter_dir))

    @torch.no_grad()
    def add_from_model(self, name: str, model: PromptModel, adapter_name: str | None = None, *,
                       source: str | None = None) -> StoredAdapter:
        """Store the prefixes of `model`'s adapter `adapter_name` (default: its active one) under `name`."""
        self._check_room(name)
        adapter_name = adapter_name or model.active_adapter
        config = model.peft_config[adapter_name]
        P = config.num_virtual_tokens
        if P > self.limits.max_virtual_tokens:
            raise InvalidRequest("adapter_path" if source else "adapter_name",
                                 f"adapter {name!r} has num_virtual_tokens={P}; this server takes at most "
                                 f"{self.limits.max_virtual_tokens} (--max-virtual-tokens)")
        mpt = config.peft_type == MULTITASK_PROMPT_TUNING
        n = config.num_tasks if mpt else 1
        plan = model.plan(n, task_ids=torch.arange(n) if mpt else None, adapter_names=[adapter_name] * n)
        assert plan.bank_rows.tolist() == list(range(n))
        keys, values, _ = model.bank_kv(plan)
        # A finite prompt can still overflow in the backbone; what is refused here never reaches the bank.
        if not all(bool(torch.isfinite(t).all()) for t in (*keys, *values)):
            raise InvalidRequest("adapter_path" if source else "adapter_name",
                                 f"adapter {name!r} gives non-finite (NaN or inf) prefix keys/values; refused")
        stored = StoredAdapter(name, config.peft_type, P, n, [k.detach().contiguous() for k in keys],
                               [v.detach().contiguous() for v in values], source)
        self.adapters[name] = stored
        self._append(stored)
        return stored

    def _check_room(self, name: str) -> None:
        self.check_name(name)
        if name in self.adapters:
            raise InvalidRequest("adapter_name", f"{name!r} is already loaded")
        if len(self.adapters) >= self.limits.max_adapters:
            raise InvalidRequest("adapter_name", f"this server holds at most {self.limits.max_adapters} adapters "
                                                 f"(--max-adapters); unload one first")

    def remove(self, name: str) -> None:
        if name not in self.adapters:
            raise InvalidRequest("adapter_name", f"{name!r} is not loaded; loaded: {self.names()}")
        del self.adapters[name]
        self._rebuild()

    def num_virtual_tokens_of(self, name: str) -> int:
        """P_e of adapter `name`: its rows' positions start there, as with the adapter alone."""
        return self.adapters[name].num_virtual_tokens

    def entry(self, name: str, task: int = 0) -> int:
        """The bank row for (adapter, task); InvalidRequest naming the field when there is none."""
        adapter, offsets = self.adapters.get(name), self.offsets
        if adapter is None or name not in offsets:
            raise InvalidRequest("model", f"{name!r} is not a loaded adapter; loaded: {self.names()}")
        if not 0 <= task < adapter.num_entries:
            raise InvalidRequest("task_id", f"{task} is out of range for adapter {name!r} with "
                                            f"{adapter.num_entries} task(s)")
        return offsets[name] + task

    def _append(self, stored: StoredAdapter) -> None:
        """Write `stored` into the bank's next free rows (growing the buffers if full); a prefix wider than
        the bank re-pads every entry (`_rebuild`)."""
        n = sum(a.num_entries for a in self.adapters.values()) - stored.num_entries
        if self._buffers is None or stored.num_virtual_tokens > self.bank_k[0].shape[2]:
            self._rebuild()
            return
        keys, values = self._buffers
        capacity, P = keys[0].shape[0], keys[0].shape[2]
        if n + stored.num_entries > capacity:
            grown = max(n + stored.num_entries, 2 * capacity)
            keys, values = ([_with_rows(t[:n], grown) for t in keys], [_with_rows(t[:n], grown) for t in values])
            self._buffers = keys, values
        for buffers, parts in ((keys, stored.keys), (values, stored.values)):
            for buffer, part in zip(buffers, parts):
                buffer[n:n + stored.num_entries] = _pad_prefix(part, P)
        self._publish(n + stored.num_entries)

    def _rebuild(self) -> None:
        """Every adapter packed into fresh buffers, exactly as wide as the longest prefix."""
        adapters = list(self.adapters.values())
        if not adapters:
            self._buffers = None
        else:
            P = self.num_virtual_tokens
            layers = range(len(adapters[0].keys))
            self._buffers = ([torch.cat([_pad_prefix(a.keys[i], P) for a in adapters]) for i in layers],
                             [torch.cat([_pad_prefix(a.values[i], P) for a in adapters]) for i in layers])
        self._publish(sum(a.num_entries for a in adapters))

    def _publish(self, n_entries: int) -> None:
        """Point the bank at the first n_entries rows of the buffers, with their offsets, lengths and bias."""
        offsets, offset = {}, 0
        for name, adapter in self.adapters.items():
            offsets[name] = offset
            offset += adapter.num_entries
        self.offsets = offsets  # one assignment: other threads validating requests never see it half-built
        if self._buffers is None:
            self.bank_k = self.bank_v = self.entry_lengths = self.prefix_bias = None
        else:
            self.bank_k = [t[:n_entries] for t in self._buffers[0]]
            self.bank_v = [t[:n_entries] for t in self._buffers[1]]
            P, device = self.bank_k[0].shape[2], self.bank_k[0].device
            lengths = [a.num_virtual_tokens for a in self.adapters.values() for _ in range(a.num_entries)]
            self.entry_lengths = torch.tensor(lengths, device=device)
            padded = torch.arange(P, device=device)[None] >= self.entry_lengths[:, None]
            self.prefix_bias = (padded.float() * PREFIX_PAD_BIAS) if padded.any() else None
        self.version += 1


def _with_rows(prefix: torch.Tensor, rows: int) -> torch.Tensor:
    """A new buffer of `rows` entries holding `prefix` [n, Hkv, P, D] in its first n (the rest unwritten)."""
    buffer = prefix.new_empty((rows, *prefix.shape[1:]))
    buffer[:len(prefix)] = prefix
    return buffer


def _pad_prefix(prefix: torch.Tensor, P: int) -> torch.Tensor:
    """[n, Hkv, P_e, D] -> [n, Hkv, P, D], zeros after the real positions (finite: their weight is 0)."""
    return torch.nn.functional.pad(prefix, (0, 0, 0, P - prefix.shape[2]))
