"""Norms and activations of a frozen backbone: forward, and a backward that computes the input gradient only.

Kernels (each parametrised by constexprs, one body per family):
- `_norm_fwd_kernel` (IS_RMS: RMSNorm as Llama's LlamaRMSNorm / LayerNorm as nn.LayerNorm; HAS_BIAS):
  BLOCK_M rows of length d per program, the whole row in registers (BLOCK_D = next_power_of_2(d)), fp32
  statistics. RMSNorm rounds the normalised row to the input dtype before the weight multiplies it, exactly
  as `weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)` does.
- `_norm_bwd_kernel` (IS_RMS): dx from dy, x and the weight, statistics recomputed from x (nothing but x
  and the weight is kept between forward and backward). No weight or bias gradient.
- `_act_fwd_kernel`, `_act_bwd_kernel` (ACT: SWIGLU = silu(gate) * up, rounding silu(gate) to the input
  dtype before the product as HF's MLP does; GELU_TANH = gelu_new / gelu(approximate="tanh");
  GELU_ERF = exact gelu): elementwise over flat tensors in BLOCK elements per program, int64 offsets.

Launchers (tensors in, tensors out; no autograd): `norm_fwd`, `norm_bwd`, `act_fwd`, `act_bwd`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


SWIGLU, GELU_TANH, GELU_ERF = 0, 1, 2
ACTIVATIONS = {"swiglu": SWIGLU, "gelu_tanh": GELU_TANH, "gelu": GELU_ERF}


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _row_stats(x, mask, D, eps, IS_RMS: tl.constexpr):
    """(centred x, rstd) of fp32 rows x [BLOCK_M, BLOCK_D]; RMSNorm does not centre."""
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    return xc, 1.0 / tl.sqrt(var + eps)


@triton.jit(do_not_specialize=["M"])
def _norm_fwd_kernel(
    x_ptr,          # [M, D] input
    w_ptr,          # [D]    frozen weight
    b_ptr,          # [D]    frozen bias (read only when HAS_BIAS)
    y_ptr,          # [M, D] output
    M, D, eps,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = (rows < M)[:, None] & col_ok[None, :]
    offs = rows[:, None] * D + cols[None, :]
    x_raw = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    xc, rstd = _row_stats(x, mask, D, eps, IS_RMS)
    xhat = xc * rstd[:, None]
    if IS_RMS:  # LlamaRMSNorm: the normalised row is cast back to the input dtype, then scaled
        xhat = xhat.to(x_raw.dtype).to(tl.float32)
    y = xhat * w[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _norm_bwd_kernel(
    dy_ptr,         # [M, D] output gradient
    x_ptr,          # [M, D] input of the forward
    w_ptr,          # [D]    frozen weight
    dx_ptr,         # [M, D] input gradient out
    M, D, eps,
    IS_RMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = (rows < M)[:, None] & col_ok[None, :]
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    xc, rstd = _row_stats(x, mask, D, eps, IS_RMS)
    xhat = xc * rstd[:, None]
    g = dy * w[None, :]                                     # d xhat
    proj = tl.sum(g * xhat, axis=1) / D
    if IS_RMS:
        dx = rstd[:, None] * (g - xhat * proj[:, None])
    else:
        dx = rstd[:, None] * (g - (tl.sum(g, axis=1) / D)[:, None] - xhat * proj[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tanh(z):
    # 1 - 2 / (exp(2z) + 1) on z clamped to [-15, 15] (tanh(15) rounds to 1 in fp32): no exp overflow
    z = tl.minimum(tl.maximum(z, -15.0), 15.0)
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit(do_not_specialize=["n"])
def _act_fwd_kernel(
    a_ptr,          # [n] gate (SWIGLU) or x (GELU)
    b_ptr,          # [n] up (SWIGLU only)
    y_ptr,          # [n] output
    n,
    ACT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    a_raw = tl.load(a_ptr + offs, mask=ok, other=0.0)
    a = a_raw.to(tl.float32)
    if ACT == 0:    # SWIGLU: silu(gate) in the input dtype (as nn.SiLU returns it), then times up
        silu = (a * tl.sigmoid(a)).to(a_raw.dtype).to(tl.float32)
        y = silu * tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    elif ACT == 1:  # GELU_TANH
        y = 0.5 * a * (1.0 + _tanh(0.7978845608028654 * (a + 0.044715 * a * a * a)))
    else:           # GELU_ERF
        y = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["n"])
def _act_bwd_kernel(
    dy_ptr,         # [n] output gradient
    a_ptr,          # [n] gate / x
    b_ptr,          # [n] up (SWIGLU only)
    da_ptr,         # [n] d gate / d x out
    db_ptr,         # [n] d up out (SWIGLU only)
    n,
    ACT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if ACT == 0:
        up = tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        da = dy * up * s * (1.0 + a * (1.0 - s))
        tl.store(db_ptr + offs, (dy * a * s).to(db_ptr.dtype.element_ty), mask=ok)
    elif ACT == 1:
        inner = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        t = _tanh(inner)
        d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)
        da = dy * (0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * d_inner)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        da = dy * (cdf + a * 0.3989422804014327 * tl.exp(-0.5 * a * a))
    tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------
# block-size heuristics (larger tiles under the interpreter, which runs each program in Python)
# ----------------------------------------------------------------------------------------------------------
def _norm_config(M: int, D: int, cuda: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps): whole rows, about 4096 elements per program on a GPU."""
    block_d = triton.next_power_of_2(D)
    if not cuda:
        return max(1, min(triton.next_power_of_2(max(M, 1)), 16384 // block_d, 128)), block_d, 4
    block_m = max(1, min(16, 4096 // block_d))
    return block_m, block_d, min(16, max(1, block_m * block_d // 512))


def _act_config(n: int, cuda: bool) -> tuple[int, int]:
    """(BLOCK, num_warps)."""
    if not cuda:
        return min(1 << 16, triton.next_power_of_2(max(n, 1))), 4
    return 1024, 4


@functools.lru_cache(maxsize=1024)
def _norm_plan(M: int, D: int, cuda: bool, block_m: int | None) -> tuple[tuple[int], int, int, int]:
    """(grid, BLOCK_M, BLOCK_D, num_warps) of a norm over M rows of D, once per shape."""
    bm, bd, warps = _norm_config(M, D, cuda)
    bm = block_m or bm
    return (triton.cdiv(M, bm),), bm, bd, warps


@functools.lru_cache(maxsize=1024)
def _act_plan(n: int, cuda: bool, block: int | None) -> tuple[tuple[int], int, int]:
    """(grid, BLOCK, num_warps) of an activation over n elements, once per size."""
    bs, warps = _act_config(n, cuda)
    bs = block or bs
    return (triton.cdiv(n, bs),), bs, warps


# ----------------------------------------------------------------------------------------------------------
# launchers: no argument checks (fastprompt.ops.norms checks once per call); `out` buffers are the caller's
# ----------------------------------------------------------------------------------------------------------
def _out(out, shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device) if out is None else out


@functools.lru_cache(maxsize=64)
def norm_out_dtype(x_dtype: torch.dtype, weight_dtype: torch.dtype, rms: bool) -> torch.dtype:
    """RMSNorm returns weight * (normalised in x's dtype): the promoted dtype; LayerNorm returns x's dtype."""
    return torch.promote_types(x_dtype, weight_dtype) if rms else x_dtype


def norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, rms: bool,
             out: torch.Tensor | None = None, block_m: int | None = None) -> torch.Tensor:
    """RMSNorm (rms=True, bias must be None) or LayerNorm of the rows of x.

    x: [..., d] (M rows of d) fp32/bf16/fp16; weight, bias: [d] fp32/bf16/fp16. Returns out of x's shape in
    `norm_out_dtype(x.dtype, weight.dtype, rms)`. All contiguous on one device. block_m: rows per program
    (a power of two), overriding the heuristic.
    """
    D = x.shape[-1]
    out = _out(out, x.shape, norm_out_dtype(x.dtype, weight.dtype, rms), x.device)
    M = x.numel() // D if D else 0
    if M == 0:
        return out
    grid, bm, bd, warps = _norm_plan(M, D, x.is_cuda, block_m)
    _norm_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, out, M, D, float(eps),
        IS_RMS=rms, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps)
    return out


def norm_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, rms: bool,
             out: torch.Tensor | None = None, block_m: int | None = None) -> torch.Tensor:
    """dx (x's shape and dtype) of RMSNorm / LayerNorm; grad_out: x's shape, any float dtype; x, weight as
    in `norm_fwd`. The bias does not enter the input gradient."""
    D = x.shape[-1]
    out = _out(out, x.shape, x.dtype, x.device)
    M = x.numel() // D if D else 0
    if M == 0:
        return out
    grid, bm, bd, warps = _norm_plan(M, D, x.is_cuda, block_m)
    _norm_bwd_kernel[grid](
        grad_out, x, weight, out, M, D, float(eps), IS_RMS=rms, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps)
    return out


def act_fwd(kind: str, a: torch.Tensor, b: torch.Tensor | None = None, out: torch.Tensor | None = None,
            block: int | None = None) -> torch.Tensor:
    """kind "swiglu": silu(a) * b (a = gate, b = up, same shape and dtype); "gelu_tanh" / "gelu": gelu of a.
    Any shape, contiguous; returns out of a's shape and dtype."""
    n = a.numel()
    out = _out(out, a.shape, a.dtype, a.device)
    if n == 0:
        return out
    grid, bs, warps = _act_plan(n, a.is_cuda, block)
    _act_fwd_kernel[grid](a, b if b is not None else a, out, n, ACT=ACTIVATIONS[kind], BLOCK=bs, num_warps=warps)
    return out


def act_bwd(kind: str, grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None,
            block: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(d a, d b) of `act_fwd` (d b is None unless kind == "swiglu"), in a's dtype; grad_out: a's shape,
    any float dtype, contiguous."""
    n = a.numel()
    da = torch.empty_like(a)
    db = torch.empty_like(a) if kind == "swiglu" else None
    if n == 0:
        return da, db
    grid, bs, warps = _act_plan(n, a.is_cuda, block)
    _act_bwd_kernel[grid](grad_out, a, b if b is not None else a, da, db if db is not None else da, n,
                          ACT=ACTIVATIONS[kind], BLOCK=bs, num_warps=warps)
    return da, db
