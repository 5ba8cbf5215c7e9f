"""The forward plan of a causal PromptModel: what a forward decides before the backbone runs, decided once
per shape and cached (`ForwardPlanner`).

A forward resolves its routing first (`fastprompt/routing.py`: which bank entry each row reads, validated
and cached per routing), then asks the planner for the rest. Those decisions depend on sizes alone (the
method's kind, B, T, P, the number n of distinct prompts, the path asked for, whether keys are padded, the
device, the backend, and whether torch.compile is tracing), so a plan is made on the first forward of a
shape and read back on every later one:
- `path`: "concat" or "shared_prefix" (path="auto" by `path_costs`; prefix tuning always reads the bank);
- `backend`: "triton" or "torch" (`resolve_backend`, once a forward instead of once an op call);
- `packed_form`: the packed pass's attention, "split" or "masked" (`packed_attention_form`), or None;
- `row_route`, `prompt_route`: what each prefix-attention call of a layer runs, "kernel" or "sdpa"
  (`prefix_attention_route`). The backbone's attention finds them in its `AttentionContext` and calls
  `prefix_attention_unchecked`: no layer repeats the op's layout checks, its read of the bank rows' range,
  its backend or its route (2·L calls a forward in the split form, for arguments the model built itself);
- `position_ids` of the pass, and the masked form's block mask where it depends on the shape alone (one
  prompt, no padding; otherwise the forward builds it from its rows, `needs_packed_mask`).
The public ops keep their checks for every other caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastprompt.backbones.attention import packed_attention_mask
from fastprompt.ops import prefix_attention_route, resolve_backend
from fastprompt.path_choice import PATHS, packed_attention_form, path_costs
from fastprompt.routing import BankPlan


@dataclass(frozen=True)
class ForwardPlan:
    """One shape's decisions (see the module docstring); tensors on the model's device."""

    path: str                                # "concat" or "shared_prefix"
    backend: str                             # "triton" or "torch"
    packed_form: str | None = None           # "split" or "masked" (the packed pass of virtual tokens), else None
    row_route: str | None = None             # the rows' prefix-attention call a layer: "kernel" or "sdpa"
    prompt_route: str | None = None          # the split form's call of the prompts among themselves
    position_ids: torch.Tensor | None = None  # [1, n·P + B·T] packed, [1, T] prefix (rows at P..P+T-1)
    packed_mask: torch.Tensor | None = None   # the masked form's [N, N] fp32 block mask, when shape-only

    @property
    def needs_packed_mask(self) -> bool:
        """Whether the forward builds the masked form's mask itself (it reads the rows' prompts)."""
        return self.packed_form == "masked" and self.packed_mask is None


class ForwardPlanner:
    """A causal PromptModel's plans by shape: `plan` makes one on a miss (at most MAX_PLANS kept; a full
    cache is emptied, as varying shapes would otherwise grow it without bound)."""

    MAX_PLANS = 256

    def __init__(self, backbone):
        self.backbone = backbone
        self.plans: dict[tuple, ForwardPlan] = {}

    def plan(self, routing: BankPlan, seq_len: int, path: str, padded: bool, backend: str | None) -> ForwardPlan:
        """The plan of a forward of routing's rows (B = its bank_rows' length), seq_len tokens each, on
        `path` ("auto", "shared_prefix" or "concat"), with padded keys or not, on `backend` (None: the
        default, `resolve_backend`). Raises ValueError for an unknown path."""
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        bank_rows = routing.bank_rows
        n_prompts = sum(len(entries) for _, entries in routing.sources)
        backend = resolve_backend(backend, bank_rows)
        key = (routing.kind, bank_rows.shape[0], seq_len, routing.num_virtual_tokens, n_prompts, path, padded,
               bank_rows.device, backend, torch.compiler.is_compiling())
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= self.MAX_PLANS:
                self.plans.clear()
            # _make takes the key less its last field (compiling: read again where it matters, only kept apart)
            plan = self.plans[key] = self._make(*key[:-1])
        return plan

    def _make(self, kind: str, B: int, T: int, P: int, n: int, path: str, padded: bool, device: torch.device,
              backend: str) -> ForwardPlan:
        backbone = self.backbone
        if kind == "kv":  # prefix tuning: the bank's keys/values are its parameters, no prompt pass
            path = "shared_prefix"
        elif path == "auto":
            costs = path_costs(backbone, B, T, P, n, device.type)
            path = min(costs, key=costs.get)
        if path == "concat":
            return ForwardPlan(path, backend)

        def route(T_q: int, P_prefix: int, has_padding_mask: bool) -> str:
            return prefix_attention_route(backend, device.type == "cuda", T=T_q, S=T_q, P=P_prefix,
                                          grouped=backbone.num_heads != backbone.num_kv_heads, causal=True,
                                          has_padding_mask=has_padding_mask, has_bias=False)
        if kind == "kv":
            return ForwardPlan(path, backend, row_route=route(T, P, padded),
                               position_ids=_positions(0, P, 1, T, device))
        form = packed_attention_form(backbone, B, T, P, n, device.type) if backend == "torch" else "split"
        positions = _positions(n, P, B, T, device)
        if form == "split":
            return ForwardPlan(path, backend, "split", row_route=route(T, P, padded), prompt_route=route(P, 0, False),
                               position_ids=positions)
        mask = None
        if n == 1 and not padded:  # one prompt, every row reads it: the mask is the shape's alone
            mask = packed_attention_mask(n, P, B, T, torch.zeros(B, dtype=torch.long, device=device), None,
                                         torch.float32)
        return ForwardPlan(path, backend, "masked", position_ids=positions, packed_mask=mask)


def _positions(n: int, P: int, B: int, T: int, device: torch.device) -> torch.Tensor:
    """Position ids [1, n·P + B·T] of a packed pass: n prompts at 0..P-1, then B rows at P..P+T-1 (n = 0,
    B = 1: one row's [1, T], broadcast over the rows as HF's own default)."""
    return torch.cat([torch.arange(P, device=device).repeat(n), torch.arange(P, P + T, device=device).repeat(B)])[None]
