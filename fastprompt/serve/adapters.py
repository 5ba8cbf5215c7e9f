"""The adapter store: which adapters a server holds, their limits, and the bank of their prefixes.

Every soft-prompt method on a causal decoder becomes a prefix (ARCHITECTURE.md, "One idea"): prompt tuning,
P-tuning and MPT through one prompt pass, prefix tuning straight from its parameters
(`fastprompt.bank.entry_kv`, the model's own). An adapter contributes `num_entries` bank rows (MPT: one per
task, otherwise one), held by a `fastprompt.bank.PrefixBank` (per layer `[n_entries, Hkv, P, D]` on the
model's device, grown in place, shorter prefixes padded and hidden by a bias); a row reads entry
`offset[adapter] + task`. An adapter loaded from a folder is its prompt source alone, run once through the
frozen backbone: no model is built around it. `ServeLimits` bounds the number of adapters and each one's
num_virtual_tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from fastprompt.bank import PrefixBank, entry_kv
from fastprompt.methods import load_source
from fastprompt.model import PromptModel
from fastprompt.serve.limits import ServeLimits
from fastprompt.serve.sampling import InvalidRequest

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-:/]{0,127}$")


@dataclass
class StoredAdapter:
    name: str
    peft_type: str
    num_virtual_tokens: int
    num_entries: int              # MPT: num_tasks; otherwise 1
    source: str | None = None     # the folder it came from


class AdapterStore:
    """name -> StoredAdapter, and `bank`, the PrefixBank of their prefixes (the engine changes it only between
    steps). backbone: the served model's (`fastprompt.backbones.get_backbone`); limits: ServeLimits
    (max_adapters, max_virtual_tokens)."""

    def __init__(self, backbone, backend: str | None = None, limits: ServeLimits | None = None):
        self.backbone = backbone
        self.backend = backend
        self.limits = limits or ServeLimits()
        self.adapters: dict[str, StoredAdapter] = {}
        self.bank = PrefixBank()

    def names(self) -> list[str]:
        return list(self.adapters)

    def check_name(self, name, field: str = "adapter_name") -> None:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise InvalidRequest(field, f"must be 1-128 characters of letters, digits and ._-:/ (starting with a "
                                        f"letter or digit), got {name!r}")

    @torch.no_grad()
    def add_from_dir(self, name: str, adapter_dir) -> StoredAdapter:
        """Load a PEFT or fastprompt adapter folder and store its prefixes."""
        self._check_room(name)
        try:
            config, source = load_source(adapter_dir, self.backbone)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise InvalidRequest("adapter_path", f"could not load an adapter from {str(adapter_dir)!r}: "
                                                 f"{error}") from error
        return self._store(name, config, source, str(adapter_dir))

    @torch.no_grad()
    def add_from_model(self, name: str, model: PromptModel, adapter_name: str | None = None, *,
                       source: str | None = None) -> StoredAdapter:
        """Store the prefixes of `model`'s adapter `adapter_name` (default: its active one) under `name`."""
        self._check_room(name)
        adapter_name = adapter_name or model.active_adapter
        model._check_adapter(adapter_name, "adapter_name")
        return self._store(name, model.peft_config[adapter_name], model.prompt_sources[adapter_name], source)

    def _store(self, name: str, config, prompt_source, source: str | None) -> StoredAdapter:
        """Run `prompt_source`'s entries through the backbone (one prompt pass) and add their prefixes."""
        field = "adapter_path" if source else "adapter_name"
        P = config.num_virtual_tokens
        if P > self.limits.max_virtual_tokens:
            raise InvalidRequest(field, f"adapter {name!r} has num_virtual_tokens={P}; this server takes at most "
                                        f"{self.limits.max_virtual_tokens} (--max-virtual-tokens)")
        n = prompt_source.num_entries
        entries = torch.arange(n, device=self.backbone.device)
        keys, values, _ = entry_kv(self.backbone, [(prompt_source, entries)], self.backend)
        # A finite prompt can still overflow in the backbone; what is refused here never reaches the bank.
        if not all(bool(torch.isfinite(t).all()) for t in (*keys, *values)):
            raise InvalidRequest(field, f"adapter {name!r} gives non-finite (NaN or inf) prefix keys/values; refused")
        stored = StoredAdapter(name, config.peft_type, P, n, source)
        self.bank.add(name, [k.detach().contiguous() for k in keys], [v.detach().contiguous() for v in values])
        self.adapters[name] = stored
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
        self.bank.remove(name)

    def num_virtual_tokens_of(self, name: str) -> int:
        """P_e of adapter `name`: its rows' positions start there, as with the adapter alone."""
        return self.adapters[name].num_virtual_tokens

    def entry(self, name: str, task: int = 0) -> int:
        """The bank row for (adapter, task); InvalidRequest naming the field when there is none."""
        adapter, offsets = self.adapters.get(name), self.bank.offsets
        if adapter is None or name not in offsets:
            raise InvalidRequest("model", f"{name!r} is not a loaded adapter; loaded: {self.names()}")
        if not 0 <= task < adapter.num_entries:
            raise InvalidRequest("task_id", f"{task} is out of range for adapter {name!r} with "
                                            f"{adapter.num_entries} task(s)")
        return offsets[name] + task
