"""Fused linear + cross-entropy for a frozen LM head: the [N, V] logits are never materialised.

Kernels:
- `_lce_fwd_kernel`: one program per block of BLOCK_N tokens walks the vocabulary in tiles of BLOCK_V. Each
  logits tile [BLOCK_N, BLOCK_V] = hidden @ weight[tile].T (+ bias) is computed with tl.dot over d in
  BLOCK_K steps (fp32 accumulation), folded into an online log-sum-exp (running max and rescaled sum), and
  the target logit is picked up in the tile that holds the label. Writes lse [N] fp32 and the per-token
  loss [N] fp32 (lse - logit[label]; 0 where label == ignore_index).
- `_lce_bwd_kernel`: d hidden = g_n * sum_v (softmax[n, v] - [v == label_n]) * weight[v]. One program per
  (token block, vocabulary tile) recomputes its logits tile, turns it into d logits with the saved lse,
  and adds d logits @ weight[tile] into an fp32 [N, d] buffer with atomic adds, d in BLOCK_K steps. No
  gradient for weight or bias is ever computed (the head is frozen). The fp32 atomic sum over vocabulary
  tiles is not bitwise deterministic run to run (order of additions), only to fp32 rounding.

Memory: forward O(N) besides its inputs; backward one fp32 [N, d] buffer (the gradient itself, before the
cast to hidden's dtype). Launchers (tensors in, tensors out; no autograd): `lce_fwd`, `lce_bwd`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastprompt.kernels._guards import FLOAT_DTYPES, check_tensor

# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b in fp32. PRECISION: "ieee" (fp32), "tf32" (ignored for bf16/fp16), or "upcast": bf16
    operands cast to fp32 first (Triton's interpreter multiplies bf16 in tl.dot as raw integers)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, vcols, v_ok, D,
                 HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 logits [BLOCK_N, BLOCK_V] of tokens `rows` against vocabulary entries `vcols` (int64)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        h = tl.load(h_ptr + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + vcols[:, None] * D + ks[None, :], mask=v_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(h, tl.trans(w), acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + vcols, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit(do_not_specialize=["N", "ignore_index"])
def _lce_fwd_kernel(
    h_ptr,          # [N, D]  hidden states (same dtype as weight)
    w_ptr,          # [V, D]  frozen LM-head weight
    b_ptr,          # [V]     bias (read only when HAS_BIAS)
    labels_ptr,     # [N]     int64/int32 targets
    loss_ptr,       # [N]     fp32 per-token loss out
    lse_ptr,        # [N]     fp32 log-sum-exp out
    N, V, D, ignore_index,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    label = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    target = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        vcols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        v_ok = vcols < V
        logits = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, vcols, v_ok, D,
                              HAS_BIAS, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        logits = tl.where(v_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))          # finite from the first tile on
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
        target += tl.sum(tl.where(vcols[None, :] == label[:, None], logits, 0.0), axis=1)
    lse = m + tl.log(s)
    valid = row_ok & (label != ignore_index)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, tl.where(valid, lse - target, 0.0), mask=row_ok)


@triton.jit(do_not_specialize=["N", "ignore_index"])
def _lce_bwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr,
    lse_ptr,        # [N]    fp32 from the forward
    g_ptr,          # [N]    fp32 gradient of each token's loss
    dh_ptr,         # [N, D] fp32 accumulator (zeroed by the launcher)
    N, V, D, ignore_index,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    vcols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    v_ok = vcols < V
    label = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (label != ignore_index)
    g = tl.where(valid, tl.load(g_ptr + rows, mask=row_ok, other=0.0), 0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    logits = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, vcols, v_ok, D,
                          HAS_BIAS, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    p = tl.where(v_ok[None, :], tl.exp(logits - lse[:, None]), 0.0)
    p = p - tl.where(vcols[None, :] == label[:, None], 1.0, 0.0)
    dlogits = (p * g[:, None]).to(w_ptr.dtype.element_ty)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        w = tl.load(w_ptr + vcols[:, None] * D + ks[None, :], mask=v_ok[:, None] & k_ok[None, :], other=0.0)
        part = _dot(dlogits, w, tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32), PRECISION)   # fp32
        tl.atomic_add(dh_ptr + rows[:, None] * D + ks[None, :], part, mask=row_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# block-size heuristic (larger tiles under the interpreter, which runs each program in Python)
# ----------------------------------------------------------------------------------------------------------
def _config(N: int, V: int, D: int, device: torch.device, backward: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages). tl.dot needs every tile dimension >= 16."""
    if device.type != "cuda":
        return (max(16, min(64, triton.next_power_of_2(N))), max(16, min(512, triton.next_power_of_2(V))),
                max(16, min(128, triton.next_power_of_2(D))), 4, 1)
    block_k = 64 if D >= 64 else max(16, triton.next_power_of_2(D))
    # 128 tokens x 128 vocabulary entries per tile: the forward walks all of V per token block (W streamed
    # through L2 by all programs in step); the backward has one program per (token block, vocab tile).
    # Untuned: no GPU was available when this was written (see the module docstring).
    return 128, 128, block_k, 8, 3


# ----------------------------------------------------------------------------------------------------------
# guards and launchers
# ----------------------------------------------------------------------------------------------------------


def _check_inputs(hidden, weight, bias, labels) -> tuple[int, int, int]:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a torch.Tensor [V, d]")
    V, D = weight.shape
    device = weight.device
    check_tensor("weight", weight, None, FLOAT_DTYPES, device)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError("hidden must be a torch.Tensor [N, d]")
    N = hidden.shape[0]
    check_tensor("hidden", hidden, (N, D), (weight.dtype,), device)
    check_tensor("labels", labels, (N,), (torch.int64, torch.int32), device)
    if bias is not None:
        check_tensor("bias", bias, (V,), FLOAT_DTYPES, device)
    return N, V, D


def _precision(dtype: torch.dtype) -> str:
    # fp32 models: IEEE dots, as cuBLAS does by default (torch.backends.cuda.matmul.allow_tf32 is False)
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return "upcast"
    return "tf32"


def lce_fwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
            ignore_index: int = -100, loss: torch.Tensor | None = None, lse: torch.Tensor | None = None,
            blocks: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy of hidden @ weight.T (+ bias) against labels; returns (loss, lse).

    hidden: [N, d] and weight: [V, d] in one of fp32/bf16/fp16 (the same); bias: optional [V] float;
    labels: [N] int64/int32, each in [0, V) or == ignore_index (not range-checked here). loss, lse:
    optional [N] fp32 outputs (loss is 0 for ignored tokens; lse is written for every token). All
    contiguous on one device. blocks: optional (BLOCK_N, BLOCK_V, BLOCK_K) override, powers of two >= 16.
    """
    N, V, D = _check_inputs(hidden, weight, bias, labels)
    loss = torch.empty(N, dtype=torch.float32, device=weight.device) if loss is None else loss
    lse = torch.empty(N, dtype=torch.float32, device=weight.device) if lse is None else lse
    check_tensor("loss", loss, (N,), (torch.float32,), weight.device)
    check_tensor("lse", lse, (N,), (torch.float32,), weight.device)
    if N == 0:
        return loss, lse
    if V == 0 or D == 0:
        raise ValueError(f"weight must have V >= 1 and d >= 1, got {tuple(weight.shape)}")
    block_n, block_v, block_k, warps, stages = _config(N, V, D, weight.device, backward=False)
    if blocks is not None:
        _check_blocks(blocks)
        block_n, block_v, block_k = blocks
    _lce_fwd_kernel[(triton.cdiv(N, block_n),)](
        hidden, weight, bias if bias is not None else weight, labels, loss, lse, N, V, D, ignore_index,
        HAS_BIAS=bias is not None, PRECISION=_precision(weight.dtype),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return loss, lse


def lce_bwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
            grad_loss: torch.Tensor, bias: torch.Tensor | None = None, ignore_index: int = -100,
            out: torch.Tensor | None = None,
            blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """d hidden [N, d] (hidden's dtype, or `out`'s) of sum_n grad_loss[n] * loss[n].

    hidden, weight, bias, labels as in `lce_fwd`; lse: [N] fp32 from `lce_fwd`; grad_loss: [N] fp32
    (ignored tokens contribute nothing whatever their grad_loss). out: optional [N, d] buffer of hidden's
    dtype. The sum over vocabulary tiles is an fp32 atomic accumulation into a [N, d] scratch buffer.
    """
    N, V, D = _check_inputs(hidden, weight, bias, labels)
    check_tensor("lse", lse, (N,), (torch.float32,), weight.device)
    check_tensor("grad_loss", grad_loss, (N,), (torch.float32,), weight.device)
    if out is not None:
        check_tensor("out", out, (N, D), (hidden.dtype,), weight.device)
    acc = torch.zeros(N, D, dtype=torch.float32, device=weight.device)
    if N > 0:
        block_n, block_v, block_k, warps, stages = _config(N, V, D, weight.device, backward=True)
        if blocks is not None:
            _check_blocks(blocks)
            block_n, block_v, block_k = blocks
        _lce_bwd_kernel[(triton.cdiv(N, block_n), triton.cdiv(V, block_v))](
            hidden, weight, bias if bias is not None else weight, labels, lse, grad_loss, acc,
            N, V, D, ignore_index,
            HAS_BIAS=bias is not None, PRECISION=_precision(weight.dtype),
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
        )
    if out is None:
        return acc if hidden.dtype == torch.float32 else acc.to(hidden.dtype)
    return out.copy_(acc)


def _check_blocks(blocks) -> None:
    if len(blocks) != 3 or any(b < 16 or b & (b - 1) for b in blocks):
        raise ValueError(f"blocks must be three powers of two >= 16, got {blocks}")
