"""Public op: attention over a per-row prefix read from a bank, then the row's own keys.

One module holds the op: its checks (run once per call, shape checks cached per new shape), the route
between the Triton kernel and SDPA on concatenated keys (`attention_route`), the SDPA path (also the
`backend="torch"` path), and the registration of the kernel as the custom ops
`fastprompt::prefix_attention_fwd` / `fastprompt::prefix_attention_bwd` with their autograd, so that
`torch.compile(fullgraph=True)` takes a step through the op without a graph break (eager calls run the same
functions through an autograd.Function: `fastprompt.ops._registry`). The jit functions and
launchers are in `fastprompt.kernels.prefix_attention`; the definition of correct is
`fastprompt.ops.reference.prefix_attention`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right

from fastprompt.kernels.decode_shapes import DECODE_MAX_T
from fastprompt.ops._checks import (
    cached, check_float, check_index_dtype, check_index_values, check_rank, check_same_device, spec)
from fastprompt.ops._dispatch import resolve_backend
from fastprompt.ops._registry import autograd_op, plain_op, public_op
from fastprompt.ops.reference import rows_of

# SDPA on keys that include a prefix needs lower-right causal alignment: torch's CausalBias, which takes
# `enable_gqa` only in newer releases; without it, grouped-query calls with a prefix stay on the kernel.
_CAUSAL_BIAS_GQA = "enable_gqa" in inspect.signature(CausalBias._dispatch).parameters


@public_op
def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    bank_rows: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q·[prefix_k[bank_rows[b]] ; k]ᵀ·scale + bias + mask)·[prefix_v[bank_rows[b]] ; v], per batch row b.

    Shapes: q [B, Hq, T, D]; k, v [B, Hkv, S, D] with S >= T when causal (S > T when decoding against a
    cache; any S when not causal, e.g. cross-attention);
    prefix_k, prefix_v [n_bank, Hkv, P, D], the prefix bank (P = 0 is plain attention);
    bank_rows [B] int64 (or int32): for each batch row, the row of the prefix bank it reads, in
    [0, n_bank) (checked on CPU tensors; on CUDA the caller vouches for it, as a check would sync);
    key_padding_mask [B, S] bool, True = attend. Hq is a multiple of Hkv. Dtypes: fp32, bf16 or fp16,
    the same for q, k, v and the prefix; accumulation is fp32. Causal masking is aligned to the end
    (query i sees own keys j <= i + S - T); the prefix is always visible; nothing is ever NaN.
    scale defaults to 1/sqrt(D) (T5 passes 1.0).
    bias: optional additive bias on the scaled scores, e.g. a relative position bias: a finite float
    tensor (any float dtype, read as fp32) of shape [B or 1, Hq or 1, T or 1, P + S], whose last axis
    is the row's keys in the op's order (its P prefix keys, then its S own keys). Size-1 dimensions
    broadcast without a copy. Masks win: a masked key stays unseen whatever its bias. The bias is a
    frozen input: no gradient flows to it (one that requires grad raises ValueError while grad mode is
    on).
    backend: "triton" | "torch" | "auto" (see `fastprompt.ops._dispatch`). On CUDA the Triton backend
    still takes SDPA on concatenated keys where that is measured faster (`attention_route`).
    Returns [B, Hq, T, D] in q's dtype. Differentiable in q, k, v, prefix_k and prefix_v.

    Example::

        out = prefix_attention(q, k, v, bank_k, bank_v, bank_rows=torch.tensor([0, 2, 2]))
        # T5-style: unscaled scores plus a relative position bias rel [1, Hq, T, P + S]
        out = prefix_attention(q, k, v, bank_k, bank_v, bank_rows, causal=False, scale=1.0, bias=rel)
    """
    _check_layout(spec("q", q, "[B, Hq, T, D]"), spec("k", k, "[B, Hkv, S, D]"), spec("v", v, "[B, Hkv, S, D]"),
                  spec("prefix_k", prefix_k, "[n_bank, Hkv, P, D]"),
                  spec("prefix_v", prefix_v, "[n_bank, Hkv, P, D]"), spec("bank_rows", bank_rows, "[B]"),
                  spec("key_padding_mask", key_padding_mask, "[B, S]"),
                  spec("bias", bias, "[B or 1, Hq or 1, T or 1, P + S]"), bool(causal))
    check_index_values("bank_rows", bank_rows, 0, prefix_k.shape[0], "rows of the prefix bank")
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        raise ValueError("bias must not require grad: prefix_attention takes it as a frozen input and returns "
                         "no gradient for it; pass bias.detach() (or compute it under torch.no_grad())")
    route = prefix_attention_route(resolve_backend(backend, q), q.is_cuda, T=q.shape[2], S=k.shape[2],
                                   P=prefix_k.shape[2], grouped=q.shape[1] != k.shape[1], causal=causal,
                                   has_padding_mask=key_padding_mask is not None, has_bias=bias is not None)
    return _on_route(q, k, v, prefix_k, prefix_v, bank_rows, route, causal, key_padding_mask, scale, bias)


@public_op
def prefix_attention_unchecked(q, k, v, prefix_k, prefix_v, bank_rows, *, route: str, causal: bool = True,
                               key_padding_mask=None, scale: float | None = None, bias=None) -> torch.Tensor:
    """`prefix_attention` on a route decided beforehand ("kernel" or "sdpa", `prefix_attention_route`), with
    no checks: for callers that planned the call and validated its arguments once for many calls (a
    PromptModel forward's plan, `fastprompt/planner.py`, serves every layer). Arguments and result as in
    `prefix_attention`; an argument it would have refused is undefined behaviour here."""
    return _on_route(q, k, v, prefix_k, prefix_v, bank_rows, route, causal, key_padding_mask, scale, bias)


def _on_route(q, k, v, prefix_k, prefix_v, bank_rows, route, causal, key_padding_mask, scale, bias):
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if route == "kernel":
        out, _ = _kernel_fwd(q, k, v, prefix_k, prefix_v, bank_rows, key_padding_mask, bias, bool(causal),
                             float(scale))
        return out
    return sdpa_on_concatenated_keys(q, k, v, prefix_k, prefix_v, bank_rows, causal=causal,
                                     key_padding_mask=key_padding_mask, scale=scale, bias=bias)


def prefix_attention_route(backend: str, cuda: bool, *, T: int, S: int, P: int, grouped: bool, causal: bool,
                           has_padding_mask: bool, has_bias: bool) -> str:
    """What `prefix_attention` runs for a call of these sizes: "kernel" (the Triton kernel) or "sdpa" (the
    PyTorch path, SDPA on concatenated keys). backend: "triton" or "torch", already resolved; cuda: whether
    q is a CUDA tensor. The torch backend is always SDPA; Triton off CUDA (the interpreter) always the
    kernel; on CUDA, `attention_route` (by measurement). Reads whether torch.compile is tracing."""
    if backend != "triton":
        return "sdpa"
    if not cuda:
        return "kernel"
    return attention_route(T=T, S=S, P=P, grouped=grouped, causal=causal, has_padding_mask=has_padding_mask,
                           has_bias=has_bias, compiling=torch.compiler.is_compiling())


def attention_route(*, T: int, S: int, P: int, grouped: bool, causal: bool, has_padding_mask: bool,
                    has_bias: bool, compiling: bool = False) -> str:
    """On CUDA, with the Triton backend: "kernel" (the Triton kernel) or "sdpa" (SDPA on keys concatenated
    with each row's prefix, `sdpa_on_concatenated_keys`), whichever the measurements say is faster.

    Evidence: bench/bench_prefix_attention.py on one H200, bf16, D=64, causal, fwd+bwd
    (shared/measurements/2026-12-04-h200/README.md), kernel vs SDPA (flash/cuDNN) on keys concatenated
    beforehand vs SDPA with a boolean mask:

        B64 H32 T512  P0              2.24 ms   1.24 ms   2.23 ms
        B64 H32 T512  P100, 16 tasks  2.91 ms   2.76 ms   2.89 ms
        B16 H32 T2048 P0              5.75 ms   2.82 ms   7.07 ms
        B16 H32 T2048 P100, 16 tasks  6.32 ms   4.99 ms   8.44 ms
        B4  H32 T8192 P0              19.9 ms   9.31 ms   28.8 ms

    So SDPA wins by 1.8-2.1x without a prefix (no copy then: the keys are k itself) and by 1.27x at
    T=2048 with P=100; at T=512 with P=100 its 5% lead is within the cost of the copy that
    concatenation adds (not timed above). The rule keeps the kernel wherever SDPA was not measured
    faster or would lose its fused path:
    - a bias or a key padding mask: SDPA would need a dense [B, H, T, P + S] mask, no flash kernel (the
      masked column is 1.0-1.34x the kernel's time);
    - T <= DECODE_MAX_T (decoding): the kernel's split-KV forward reads the bank in place, where SDPA
      would copy the whole cache with the prefix every step;
    - not causal: not measured;
    - a prefix (P > 0) with T < 2048; or where SDPA cannot take the prefix's lower-right causal mask on
      its fused path: while torch.compile traces (CausalBias breaks the graph; a dense mask would lose
      flash: the masked column), or with grouped-query heads on a torch whose CausalBias lacks enable_gqa.
    """
    if has_bias or has_padding_mask or T <= DECODE_MAX_T or not causal:
        return "kernel"
    if P == 0:
        return "sdpa"
    lower_right_fused = not compiling and (_CAUSAL_BIAS_GQA or not grouped)
    return "sdpa" if T >= 2048 and lower_right_fused else "kernel"


def sdpa_on_concatenated_keys(q, k, v, prefix_k, prefix_v, bank_rows, *, causal=True, key_padding_mask=None,
                              scale=None, bias=None, lower_right_bias: bool | None = None) -> torch.Tensor:
    """`prefix_attention` by `F.scaled_dot_product_attention` on [prefix_k[bank_rows] ; k] (arguments and
    result as there, already checked): the `backend="torch"` path, and the CUDA route `attention_route`
    picks. Plain autograd, traceable by torch.compile; gradients reach the bank through the gather.

    Without a padding mask or bias, causal masking needs no dense mask: `is_causal` when there is no
    prefix and S == T, else torch's lower-right CausalBias (SDPA keeps its fused kernels) where
    `lower_right_bias` (default: on CUDA, except while torch.compile traces, which CausalBias breaks, and
    with grouped-query heads on a torch whose CausalBias lacks enable_gqa), else a boolean [T, P + S] mask.
    With padding or a bias, one boolean (or float) mask [B or 1, 1, T, P + S]. CPU computes half dtypes
    in fp32, as the reference does; CUDA computes in q's dtype (fp32 accumulation inside SDPA).
    """
    B, Hq, T, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], prefix_k.shape[2]
    L = P + S
    out_dtype, dtype = q.dtype, (q.dtype if q.is_cuda else torch.float32)
    # An empty prefix is skipped (no copy of k and v), unless it requires grad: then it stays in the graph
    # and gets its (empty) gradient, as from the kernel.
    if P or prefix_k.requires_grad or prefix_v.requires_grad:
        k = torch.cat([rows_of(prefix_k, bank_rows), k], dim=2)
        v = torch.cat([rows_of(prefix_v, bank_rows), v], dim=2)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    gqa = Hq != Hkv
    if lower_right_bias is None:
        lower_right_bias = q.is_cuda and not torch.compiler.is_compiling() and (_CAUSAL_BIAS_GQA or not gqa)
    sees = None  # [B, 1, T, 1]: whether a query sees any key (only P == 0 with padding can see none)
    if key_padding_mask is None and bias is None:
        if not causal or T == 1:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
        elif L == T:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        elif lower_right_bias:
            lower_right = causal_lower_right(T, L)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=lower_right, scale=scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=_lower_right_mask(T, L, q.device, dtype),
                                                 scale=scale, enable_gqa=gqa)
        return out.to(out_dtype)
    visible = None
    if causal:
        visible = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
    if key_padding_mask is not None:
        keys = key_padding_mask[:, None, None, :]
        if P:
            keys = torch.cat([keys.new_ones(B, 1, 1, P), keys], dim=-1)
        visible = keys if visible is None else visible & keys
        if P == 0:
            sees = visible.any(dim=-1, keepdim=True)
            visible = visible | ~sees  # a query that sees nothing attends anywhere; its output is zeroed
    mask = visible
    if bias is not None:
        mask = bias.to(dtype) if visible is None else torch.where(visible, bias.to(dtype), float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if sees is not None:
        out = out * sees
    return out.to(out_dtype)


def _lower_right_mask(T: int, L: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[T, L] additive mask (0 / -inf) of end-aligned causal attention: query i sees keys j <= i + L - T.
    On the CPU, outside torch.compile, cached per shape (`_cached_lower_right_mask`): a training step asks
    for the same one at every layer, and SDPA would turn a boolean mask into this one at every call. Not
    on a GPU, where this path is rare (CUDA takes torch's CausalBias) and a cache would hold device memory."""
    if torch.compiler.is_compiling() or device.type != "cpu":
        return _build_lower_right_mask(T, L, device, dtype)
    return _cached_lower_right_mask(T, L, device, dtype)


def _build_lower_right_mask(T, L, device, dtype):
    visible = torch.ones(T, L, dtype=torch.bool, device=device).tril(L - T)
    return torch.zeros(T, L, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))


_cached_lower_right_mask = functools.lru_cache(maxsize=16)(_build_lower_right_mask)


@cached
def _check_layout(q, k, v, prefix_k, prefix_v, bank_rows, key_padding_mask, bias, causal) -> None:
    """Raise ValueError naming the argument that `prefix_attention` cannot take (Specs, see its docstring);
    runs before either backend, so both reject the same inputs the same way."""
    check_rank("q", q, 4, "[B, Hq, T, D]")
    check_rank("k", k, 4, "[B, Hkv, S, D]")
    check_rank("v", v, 4, "[B, Hkv, S, D]")
    check_rank("prefix_k", prefix_k, 4, "[n_bank, Hkv, P, D]")
    check_rank("prefix_v", prefix_v, 4, "[n_bank, Hkv, P, D]")
    check_rank("bank_rows", bank_rows, 1, "[B]")
    if bias is not None:
        check_rank("bias", bias, 4, "[B or 1, Hq or 1, T or 1, P + S]")
    check_same_device(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, bank_rows=bank_rows,
                      key_padding_mask=key_padding_mask, bias=bias)
    B, Hq, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must have shape [B={B}, Hkv, S, D={D}], got {k.shape} and {v.shape}")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"k must have at least one head and q's heads ({Hq}) must be a multiple of k's heads "
                         f"(Hkv), got Hkv={Hkv}")
    if causal and S < T:
        raise ValueError(f"k must have at least as many positions as q when causal (S={S} >= T={T})")
    if not 1 <= D <= 256:
        raise ValueError(f"q must have a head dim D in [1, 256], got D={D}")
    if prefix_k.shape != prefix_v.shape or prefix_k.shape[1] != Hkv or prefix_k.shape[3] != D:
        raise ValueError(f"prefix_k and prefix_v must have shape [n_bank, Hkv={Hkv}, P, D={D}], got "
                         f"{prefix_k.shape} and {prefix_v.shape}")
    if bank_rows.shape[0] != B:
        raise ValueError(f"bank_rows must have shape [B={B}], got {bank_rows.shape}")
    for name, s in (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        check_float(name, s)
        if s.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {s.dtype}")
    check_index_dtype("bank_rows", bank_rows)
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor (True = attend), got {key_padding_mask.dtype}")
        if key_padding_mask.shape != (B, S):
            raise ValueError(f"key_padding_mask must have shape [B={B}, S={S}], got {key_padding_mask.shape}")
    if bias is not None:
        check_float("bias", bias)
        L = prefix_k.shape[2] + S
        if bias.shape[3] != L or any(n not in (1, want) for n, want in zip(bias.shape[:3], (B, Hq, T))):
            raise ValueError(f"bias must have shape [B={B} or 1, Hq={Hq} or 1, T={T} or 1, P + S={L}] (its last "
                             f"axis: the row's prefix keys, then its own keys), got {bias.shape}")


# ----------------------------------------------------------------------------------------------------------
# The Triton kernel as custom ops. The forward returns (out, lse); the backward reads both. Deterministic:
# per-row fp32 partials of d prefix_k / d prefix_v ([B, Hkv, P, D] each) are summed per bank row in a
# fixed order (see `fastprompt.kernels.prefix_attention.prefix_attention_bwd`). No gradient to the bias.
# ----------------------------------------------------------------------------------------------------------
def _kernel_fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                     prefix_v: torch.Tensor, bank_rows: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from fastprompt.kernels import prefix_attention as kernels

    return kernels.prefix_attention_fwd(q, k, v, prefix_k, prefix_v, bank_rows, causal=causal,
                                        key_padding_mask=key_padding_mask, scale=scale, bias=bias)


def _kernel_bwd_impl(d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                     prefix_v: torch.Tensor, bank_rows: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                     key_padding_mask: Optional[torch.Tensor], bias: Optional[torch.Tensor], causal: bool,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastprompt.kernels import prefix_attention as kernels

    return kernels.prefix_attention_bwd(d_out, q, k, v, prefix_k, prefix_v, bank_rows, out, lse, causal=causal,
                                        key_padding_mask=key_padding_mask, scale=scale, bias=bias)


def _like(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, bank_rows, key_padding_mask, bias, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, bank_rows, key_padding_mask, bias, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, d_out, _d_lse):
    q, k, v, prefix_k, prefix_v, bank_rows, key_padding_mask, bias, out, lse = ctx.saved_tensors
    grads = _kernel_bwd(d_out, q, k, v, prefix_k, prefix_v, bank_rows, out, lse, key_padding_mask, bias,
                        ctx.causal, ctx.scale)
    return (*grads, None, None, None, None, None)


_kernel_fwd = autograd_op(
    "fastprompt::prefix_attention_fwd", _kernel_fwd_impl, setup=_setup, backward=_backward,
    fake=lambda q, *_: (_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)))
_kernel_bwd = plain_op("fastprompt::prefix_attention_bwd", _kernel_bwd_impl,
                       fake=lambda d_out, q, k, v, prefix_k, prefix_v, *_: tuple(map(_like, (q, k, v, prefix_k,
                                                                                           prefix_v))))
