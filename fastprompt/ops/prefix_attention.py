"""Public op: attention over a per-row task prefix read from a bank, then the row's own keys."""

from __future__ import annotations

import torch

from fastprompt.ops import reference
from fastprompt.ops._checks import check_float, check_index, check_rank, check_same_device
from fastprompt.ops._dispatch import resolve_backend


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    task_ids: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q·[prefix_k[task] ; k]ᵀ·scale + bias + mask)·[prefix_v[task] ; v], per batch row.

    Shapes: q [B, Hq, T, D]; k, v [B, Hkv, S, D] with S >= T when causal (S > T when decoding against a
    cache; any S when not causal, e.g. cross-attention);
    prefix_k, prefix_v [n_tasks, Hkv, P, D] (P = 0 is plain attention); task_ids [B] int64;
    key_padding_mask [B, S] bool, True = attend. Hq is a multiple of Hkv. Dtypes: fp32, bf16 or fp16,
    the same for q, k, v and the prefix; accumulation is fp32. Causal masking is aligned to the end
    (query i sees own keys j <= i + S - T); the prefix is always visible; nothing is ever NaN.
    scale defaults to 1/sqrt(D) (T5 passes 1.0).
    bias: optional additive bias on the scaled scores, e.g. a relative position bias: a finite float
    tensor (any float dtype, read as fp32) of shape [B or 1, Hq or 1, T or 1, P + S], whose last axis
    is the row's keys in the op's order (its task's P prefix keys, then its S own keys). Size-1
    dimensions broadcast without a copy. Masks win: a masked key stays unseen whatever its bias. The
    bias is a frozen input: no gradient flows to it (one that requires grad raises ValueError while grad
    mode is on).
    Returns [B, Hq, T, D] in q's dtype. Differentiable in q, k, v, prefix_k and prefix_v.

    Example::

        out = prefix_attention(q, k, v, bank_k, bank_v, task_ids=torch.tensor([0, 2, 2]))
        # T5-style: unscaled scores plus a relative position bias rel [1, Hq, T, P + S]
        out = prefix_attention(q, k, v, bank_k, bank_v, task_ids, causal=False, scale=1.0, bias=rel)
    """
    check_prefix_attention_args(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, bias)
    if resolve_backend(backend, q) == "triton":
        from fastprompt.ops._prefix_attention_triton import prefix_attention_triton

        return prefix_attention_triton(q, k, v, prefix_k, prefix_v, task_ids, causal=causal,
                                       key_padding_mask=key_padding_mask, scale=scale, bias=bias)
    return reference.prefix_attention(q, k, v, prefix_k, prefix_v, task_ids, causal=causal,
                                      key_padding_mask=key_padding_mask, scale=scale, bias=bias)


def check_prefix_attention_args(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask,
                                causal: bool = True, bias: torch.Tensor | None = None) -> None:
    """Raise ValueError naming the argument that `prefix_attention` cannot take (shapes and dtypes as in
    its docstring); runs before either backend, so both reject the same inputs the same way."""
    check_rank("q", q, 4, "[B, Hq, T, D]")
    check_rank("k", k, 4, "[B, Hkv, S, D]")
    check_rank("v", v, 4, "[B, Hkv, S, D]")
    check_rank("prefix_k", prefix_k, 4, "[n_tasks, Hkv, P, D]")
    check_rank("prefix_v", prefix_v, 4, "[n_tasks, Hkv, P, D]")
    check_rank("task_ids", task_ids, 1, "[B]")
    if bias is not None:
        check_rank("bias", bias, 4, "[B or 1, Hq or 1, T or 1, P + S]")
    check_same_device(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, task_ids=task_ids,
                      key_padding_mask=key_padding_mask, bias=bias)
    B, Hq, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must have shape [B={B}, Hkv, S, D={D}], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"k must have at least one head and q's heads ({Hq}) must be a multiple of k's heads "
                         f"(Hkv), got Hkv={Hkv}")
    if causal and S < T:
        raise ValueError(f"k must have at least as many positions as q when causal (S={S} >= T={T})")
    if prefix_k.shape != prefix_v.shape or prefix_k.shape[1] != Hkv or prefix_k.shape[3] != D:
        raise ValueError(f"prefix_k and prefix_v must have shape [n_tasks, Hkv={Hkv}, P, D={D}], got "
                         f"{tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}")
    if task_ids.shape[0] != B:
        raise ValueError(f"task_ids must have shape [B={B}], got {tuple(task_ids.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        check_float(name, t)
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    check_index("task_ids", task_ids, prefix_k.shape[0], "rows of the prefix bank")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor (True = attend), got {key_padding_mask.dtype}")
        if key_padding_mask.shape != (B, S):
            raise ValueError(f"key_padding_mask must have shape [B={B}, S={S}], got "
                             f"{tuple(key_padding_mask.shape)}")
    if bias is not None:
        _check_bias(bias, B, Hq, T, prefix_k.shape[2] + S)


def _check_bias(bias: torch.Tensor, B: int, Hq: int, T: int, L: int) -> None:
    check_float("bias", bias)
    expected = (B, Hq, T, L)
    if bias.shape[3] != L or any(n not in (1, want) for n, want in zip(bias.shape[:3], expected)):
        raise ValueError(f"bias must have shape [B={B} or 1, Hq={Hq} or 1, T={T} or 1, P + S={L}] (its last "
                         f"axis: the task's prefix keys, then the row's own keys), got {tuple(bias.shape)}")
    if bias.requires_grad and torch.is_grad_enabled():
        raise ValueError("bias must not require grad: prefix_attention takes it as a frozen input and returns "
                         "no gradient for it; pass bias.detach() (or compute it under torch.no_grad())")
