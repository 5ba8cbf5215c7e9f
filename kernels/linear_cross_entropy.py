"""Cross-entropy of one chunk of LM-head logits, with d loss / d logits written over the logits.

The fused loss (`fastprompt.ops.linear_cross_entropy`) leaves both vocabulary products to cuBLAS: per
chunk of tokens, logits = hidden @ weight.T (torch.mm into one reused [chunk, V] buffer), this kernel, then
d hidden = d logits @ weight (torch.mm). The kernel is the only part that is not a matmul:

- `_lce_chunk_kernel`: one program per BLOCK_N rows of the chunk. Pass 1 walks the row in BLOCK_V tiles,
  adds the bias (fp32) and folds each tile into an online log-sum-exp (running max, rescaled sum, in
  fp32) while picking up the target logit; it writes the per-token loss (lse - logit[label]; 0 where
  label == ignore_index). Pass 2 (WITH_GRAD) re-reads the row and overwrites it in place with
  d loss / d logits = softmax - onehot(label) (0 for an ignored row), times an optional scale read from
  the device (1 / count of the non-ignored tokens for a mean), in the buffer's dtype.

Memory: nothing besides the loss [rows] it writes; it reads the chunk twice and writes it once.
Launcher (tensors in, tensors out; no autograd, no argument checks: the public op checks once):
`lce_chunk`. Block sizes are cached per (V, dtype, device type) in `_config`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


# ----------------------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["n_rows", "ignore_index"])
def _lce_chunk_kernel(
    logits_ptr,     # [n_rows, V] logits of the chunk (contiguous; fp32/bf16/fp16); d logits out if WITH_GRAD
    b_ptr,          # [V]         bias (read only when HAS_BIAS)
    labels_ptr,     # [n_rows]    int64/int32 targets
    loss_ptr,       # [n_rows]    fp32 per-token loss out
    scale_ptr,      # []          fp32 factor of d logits (read only when HAS_SCALE: 1 / count for a mean)
    n_rows, V, ignore_index,
    HAS_BIAS: tl.constexpr, WITH_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    label = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (label != ignore_index)
    base = logits_ptr + rows[:, None] * V
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    target = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        x = tl.load(base + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        x = tl.where(col_ok[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))            # finite from the first tile on
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
        target += tl.sum(tl.where(cols[None, :] == label[:, None], x, 0.0), axis=1)
    lse = m + tl.log(s)
    tl.store(loss_ptr + rows, tl.where(valid, lse - target, 0.0), mask=row_ok)
    if WITH_GRAD:
        if HAS_SCALE:
            factor = tl.load(scale_ptr)
        else:
            factor = 1.0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            ok = row_ok[:, None] & col_ok[None, :]
            x = tl.load(base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            p = tl.exp(x - lse[:, None]) - tl.where(cols[None, :] == label[:, None], 1.0, 0.0)
            p = tl.where(valid[:, None], p * factor, 0.0)
            tl.store(base + cols[None, :], p.to(logits_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------
# block sizes, once per (V, dtype, device type)
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _config(V: int, dtype: torch.dtype, cuda: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, num_warps). CUDA: one row per program, the row streamed in tiles of up to
    4096 entries by 8 warps (16 fp32 values per thread; untuned: no GPU was available when this was
    written). The interpreter runs each program in Python: 16 rows x up to 1024 entries per step."""
    if cuda:
        return 1, min(4096, triton.next_power_of_2(V)), 8
    return 16, min(1024, triton.next_power_of_2(V)), 4


# ----------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------
def lce_chunk(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, bias: torch.Tensor | None = None,
              ignore_index: int = -100, with_grad: bool = True, scale: torch.Tensor | None = None,
              blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-token cross-entropy of a chunk of logits; with_grad: the logits become d loss / d logits.

    logits: [n, V] contiguous, fp32/bf16/fp16 (the fp32 loss and softmax are computed from its values, the
    bias added in fp32); labels: [n] int64/int32 contiguous, each in [0, V) or == ignore_index; loss: [n]
    fp32 output (0 at ignored tokens); bias: optional [V]. All on one device; not checked here (the
    public op checks its inputs once). scale: optional 0-d fp32 tensor multiplying d logits (1 / count
    for a mean: read on the device, no host sync). blocks: optional (BLOCK_N, BLOCK_V) override, powers of two.
    Returns loss. d logits = softmax(logits + bias) - onehot(label), zero rows where ignored, unscaled
    (the caller scales d hidden by the incoming gradient).
    """
    n, V = logits.shape
    if n == 0:
        return loss
    block_n, block_v, warps = _config(V, logits.dtype, logits.is_cuda)
    if blocks is not None:
        block_n, block_v = blocks
    _lce_chunk_kernel[(triton.cdiv(n, block_n),)](
        logits, bias if bias is not None else logits, labels, loss, scale if scale is not None else loss,
        n, V, ignore_index,
        HAS_BIAS=bias is not None, WITH_GRAD=with_grad, HAS_SCALE=scale is not None, BLOCK_N=block_n, BLOCK_V=block_v, num_warps=warps,
    )
    return loss
