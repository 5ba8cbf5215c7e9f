"""Bank routing: which bank entries a batch needs and which entry each of its rows reads (`BankPlan`).

A PromptModel holds its adapters' prompt sources as one bank: every adapter owns `num_entries` entries (1,
or one per task for MPT). A batch's rows pick adapters by `adapter_names` or `task_ids`; `BankRouting.plan`
validates that routing, resolves it to the distinct entries the batch reads and each row's index among
them, and caches the result, so a repeated routing builds no tensor and reads nothing on the host.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class BankPlan:
    """Which bank entries a batch needs and which entry each row reads."""

    kind: str                                   # "tokens" or "kv"
    num_virtual_tokens: int
    sources: list[tuple[str, torch.Tensor]]     # (adapter name, its local entry ids), in bank order
    bank_rows: torch.Tensor                     # [B] int64 index into the concatenated entries


class BankRouting:
    """`plan` and its cache, mixed into PromptModel. The host class provides `active_adapter`,
    `peft_config` (adapter name → resolved config), `prompt_sources` (adapter name → prompt source, in load
    order), `adapter_names`, `backbone`, `_check_adapter(name, argument)` and `_plans` (a dict, emptied
    whenever the adapters change)."""

    def plan(self, batch_size: int, task_ids=None, adapter_names=None) -> BankPlan:
        """Resolve each row to a bank entry; raises ValueError naming the bad argument.

        A step's routing rarely changes, so plans are cached by their routing inputs (batch size, adapter
        names, task ids) and a repeated call builds no tensor. Multitask prompt tuning with one adapter and
        no more tasks than rows never reads `task_ids` on the host (a sync on CUDA, a graph break under
        torch.compile): the bank holds every task's prompt and row i reads entry task_ids[i].
        """
        if self.active_adapter is None:
            raise ValueError("no adapter is loaded: add_adapter or load_adapter first")
        if adapter_names is not None:
            if isinstance(adapter_names, str) or len(adapter_names) != batch_size:
                raise ValueError(f"adapter_names must be a list of {batch_size} adapter names (one per row), "
                                 f"got {adapter_names!r}")
            for i, name in enumerate(adapter_names):
                self._check_adapter(name, f"adapter_names[{i}]")
        routing = tuple(adapter_names) if adapter_names is not None else self.active_adapter
        if task_ids is None:
            return self._cached_plan((batch_size, routing, None), batch_size, None, adapter_names)
        task_ids = torch.as_tensor(task_ids)
        if task_ids.shape != (batch_size,) or task_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"task_ids must be an int64 tensor of shape [{batch_size}], got "
                             f"{task_ids.dtype} {tuple(task_ids.shape)}")
        source = self.prompt_sources[self.active_adapter]
        if adapter_names is None and source.routes_by_task and source.num_entries <= batch_size:
            if not task_ids.is_cuda and not torch.compiler.is_compiling():  # a free check on the host
                self._check_task_range(task_ids.tolist(), [self.active_adapter] * batch_size)
            every_task = self._cached_plan((batch_size, routing, "every task"), batch_size, None, None,
                                           every_task=True)
            return dataclasses.replace(every_task, bank_rows=task_ids.to(self.backbone.device, torch.long))
        task_list = task_ids.tolist()
        return self._cached_plan((batch_size, routing, tuple(task_list)), batch_size, task_list, adapter_names)

    def _cached_plan(self, key, batch_size: int, task_list, adapter_names, every_task: bool = False) -> BankPlan:
        device = self.backbone.device
        cached = self._plans.get(key)
        if cached is not None and cached.bank_rows.device == device:
            return cached
        plan = self._build_plan(batch_size, task_list, adapter_names, every_task)
        if len(self._plans) >= self.MAX_CACHED_PLANS:  # routing that varies every step: keep the newest
            self._plans.clear()
        self._plans[key] = plan
        return plan

    MAX_CACHED_PLANS = 256

    def _check_task_range(self, task_list: list[int], names: list[str]) -> None:
        for i, (t, name) in enumerate(zip(task_list, names)):
            num_tasks = self.prompt_sources[name].num_entries
            if not 0 <= t < num_tasks:
                raise ValueError(f"task_ids[{i}]={t} is out of range for adapter {name!r} with "
                                 f"num_tasks={num_tasks}")

    def _build_plan(self, batch_size: int, task_list: list[int] | None, adapter_names,
                    every_task: bool = False) -> BankPlan:
        """The plan of `plan`'s validated routing (task_list: the task ids read on the host, or None)."""
        names = list(adapter_names) if adapter_names is not None else [self.active_adapter] * batch_size
        configs = [self.peft_config[n] for n in names]
        by_task = self.prompt_sources[names[0]].routes_by_task
        device = self.backbone.device
        if every_task:
            entries = torch.arange(self.prompt_sources[names[0]].num_entries, device=device)
            return BankPlan("tokens", configs[0].num_virtual_tokens, [(names[0], entries)],
                            torch.zeros(batch_size, dtype=torch.long, device=device))
        if task_list is not None and adapter_names is None and not by_task:
            # Mixing adapters by index: task id k is the k-th loaded adapter.
            for i, t in enumerate(task_list):
                if not 0 <= t < len(self.adapter_names):
                    raise ValueError(f"task_ids[{i}]={t} is out of range: {len(self.adapter_names)} adapters "
                                     f"are loaded ({self.adapter_names})")
            names = [self.adapter_names[t] for t in task_list]
            configs = [self.peft_config[n] for n in names]
        first = configs[0]
        for name, cfg in zip(names, configs):
            if (cfg.peft_type, cfg.num_virtual_tokens) != (first.peft_type, first.num_virtual_tokens):
                raise ValueError(f"adapters of one batch must share method and num_virtual_tokens: "
                                 f"{names[0]!r} is {first.peft_type} with {first.num_virtual_tokens} tokens, "
                                 f"{name!r} is {cfg.peft_type} with {cfg.num_virtual_tokens}")
        if by_task:
            if task_list is None:
                raise ValueError("task_ids is required for multitask prompt tuning: an int64 tensor [B] of "
                                 "task indices")
            self._check_task_range(task_list, names)
            local = task_list
        else:
            local = [0] * batch_size
        index: dict[tuple[str, int], int] = {}
        per_source: dict[str, list[int]] = {}
        for name, entry in sorted(set(zip(names, local)), key=lambda p: (self.adapter_names.index(p[0]), p[1])):
            index[(name, entry)] = len(index)
            per_source.setdefault(name, []).append(entry)
        sources = [(n, torch.tensor(e, dtype=torch.long, device=device)) for n, e in per_source.items()]
        bank_rows = torch.tensor([index[p] for p in zip(names, local)], dtype=torch.long, device=device)
        return BankPlan(self.prompt_sources[names[0]].kind, first.num_virtual_tokens, sources, bank_rows)
