"""Public op: cross-entropy of a frozen LM head's logits at the cost of two vocabulary matmuls.

`linear_cross_entropy(hidden, weight, labels)` walks the tokens in chunks. Per chunk: logits =
hidden_chunk @ weight.T (one matmul over the vocabulary), the per-token loss from the logits' fp32
log-sum-exp, and, when hidden needs a gradient, d loss / d logits = softmax - onehot(label) formed from the
same logits and multiplied straight away by the weight: G_chunk = d logits @ weight (the second matmul),
d loss_i / d hidden_i for each token of the chunk. The loss is the graph's last op and each token's loss
depends on its own hidden state only, so G [N, d] is the whole backward: the backward scales G's rows by
the incoming gradient. Two vocabulary matmuls per token, as unfused autograd (logits forward, d hidden
backward), not three (a fused kernel that recomputes the logits in its backward); no weight gradient.

Backends (the same structure; `fastprompt.ops._dispatch`):
- "triton": both matmuls on cuBLAS (torch.mm into one reused [chunk, V] buffer of the model's dtype), then
  one Triton kernel per chunk (`fastprompt.kernels.linear_cross_entropy.lce_chunk`) computes the fp32
  log-sum-exp, the loss and overwrites the buffer with d logits in place.
- "torch": the same per chunk in PyTorch (logits upcast to fp32; ATen's log_softmax, nll_loss,
  nll_loss_backward and _log_softmax_backward_data, the pieces F.cross_entropy runs).
Reductions are inside the op: for "mean" the count of non-ignored tokens stays on the device and scales
d logits (no host read); the backward multiplies G by the incoming scalar (or per row for "none").

Chunking: `chunk_rows` picks the number of tokens per chunk from a memory budget for the [chunk, V] block
(CHUNK_BYTES: 256 MiB of the model's dtype on CUDA; on the CPU, 128 MiB of fp32), cached per (N, V,
dtype size, device type). Memory beyond the inputs: the loss, G [N, d] (hidden's dtype; the backward
returns G scaled) and, on CUDA, the one reused block (Llama-3.2-1B's head, V 128256 bf16: 1024 tokens per
chunk, 250 MiB). The PyTorch path holds up to three fp32 blocks of a chunk at once (log-probabilities,
nll_loss's gradient, d logits).

The op is the custom op `fastprompt::linear_cross_entropy` (torch.library, fake kernel and autograd;
`fastprompt.ops._registry`: an autograd.Function over the same functions in eager mode), so that
torch.compile(fullgraph=True) traces it. Input checks run once, here (cached per new shape); the kernel
launcher does not re-check.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from fastprompt.ops import reference
from fastprompt.ops._checks import cached, check_float, check_index_dtype, check_same_device, spec
from fastprompt.ops._dispatch import resolve_backend
from fastprompt.ops._registry import autograd_op, public_op

REDUCTIONS = ("mean", "sum", "none")
_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}      # as ATen's nll_loss numbers them
# bytes of one [chunk, V] logits block: the model's dtype on CUDA (cuBLAS writes it), fp32 on the CPU
CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 128 << 20}


@public_op
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of hidden @ weight.T (+ bias) against labels, the [N, V] logits never held.

    Shapes: hidden [N, d] or [B, T, d] (flattened); weight [V, d] and bias [V] frozen (no gradient: pass
    them with requires_grad=False; if either requires a gradient, the unchunked reference runs instead so
    that it gets one); labels [N] (or [B, T]) int64/int32, each in [0, V) or == ignore_index. hidden and
    weight share one dtype (fp32, bf16 or fp16). Differentiable in hidden.

    reduction: "mean" over the tokens whose label is not ignore_index, "sum", or "none" ([N], 0 at ignored
    tokens). A batch in which every label is ignored gives 0 for "mean" (F.cross_entropy gives NaN) and
    for "sum", with a zero gradient. The loss is fp32 whatever the input dtype (log-sum-exp in fp32 of the
    logits as the matmul returns them, the bias added in fp32).

    Cost: two matmuls over the vocabulary (see the module docstring); d hidden is formed in the forward
    when hidden requires a gradient (and grad mode is on), and not at all otherwise.

    Example::

        loss = linear_cross_entropy(hidden[:, :-1], model.lm_head.weight, labels[:, 1:])
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_shapes(spec("hidden", hidden, "[N, d]"), spec("weight", weight, "[V, d]"), spec("labels", labels, "[N]"),
           spec("bias", bias, "[V]"))
    V, d = weight.shape
    labels1d = labels.reshape(-1)
    _check(labels1d, V, ignore_index)
    grad_mode = torch.is_grad_enabled()
    if grad_mode and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return reference.linear_cross_entropy(hidden, weight, labels1d, bias=bias, ignore_index=ignore_index,
                                              reduction=reduction)
    triton = resolve_backend(backend, hidden, weight) == "triton"
    # hidden goes in unflattened (the op flattens it: no view node in the autograd graph)
    loss, _ = _lce(hidden, weight.detach(), None if bias is None else bias.detach(), labels1d.contiguous(),
                   int(ignore_index), _REDUCTION_CODES[reduction], 0, grad_mode and hidden.requires_grad, triton)
    return loss


def chunked_linear_cross_entropy_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                        bias: torch.Tensor | None = None, ignore_index: int = -100,
                                        chunk_size: int | None = None, backend: str = "torch",
                                        reduction: str = "none") -> torch.Tensor:
    """The op on hidden [N, d], a frozen weight [V, d] and labels [N], unchecked, in chunks of `chunk_size`
    tokens (default: `chunk_rows`): per-token losses [N] fp32, or their mean / sum. Differentiable in
    hidden only."""
    with_grad = torch.is_grad_enabled() and hidden.requires_grad
    loss, _ = _lce(hidden, weight.detach(), None if bias is None else bias.detach(), labels.contiguous(),
                   int(ignore_index), _REDUCTION_CODES[reduction], int(chunk_size or 0), with_grad,
                   backend == "triton")
    return loss


@functools.lru_cache(maxsize=256)
def chunk_rows(N: int, V: int, itemsize: int, device_type: str) -> int:
    """Tokens per chunk: as many [., V] rows as CHUNK_BYTES holds (at least 1, at most N). On CUDA the
    buffer has the model's dtype (`itemsize` bytes) and the count is rounded down to a multiple of 128
    (whole cuBLAS tiles) when that leaves at least 128; on the CPU the block is fp32."""
    if device_type == "cuda":
        rows = CHUNK_BYTES["cuda"] // (V * itemsize)
        rows = rows // 128 * 128 if rows >= 256 else rows
    else:
        rows = CHUNK_BYTES["cpu"] // (V * 4)
    return max(1, min(N, rows))


# ----------------------------------------------------------------------------------------------------------
# checks (once per new shape; label values on CPU tensors only: a host read)
# ----------------------------------------------------------------------------------------------------------
@cached
def _check_shapes(hidden, weight, labels, bias) -> None:
    if len(weight.shape) != 2:
        raise ValueError(f"weight must have shape [V, d], got {weight.shape}")
    V, d = weight.shape
    if len(hidden.shape) not in (2, 3) or hidden.shape[-1] != d:
        raise ValueError(f"hidden must have shape [N, d={d}] or [B, T, d={d}], got {hidden.shape}")
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden must have weight's dtype {weight.dtype}, got {hidden.dtype}")
    check_index_dtype("labels", labels)
    N = 1
    for n in hidden.shape[:-1]:
        N *= n
    numel = 1
    for n in labels.shape:
        numel *= n
    if numel != N or len(labels.shape) not in (1, len(hidden.shape) - 1):
        raise ValueError(f"labels must have shape {hidden.shape[:-1]} or [{N}], got {labels.shape}")
    if bias is not None:
        if bias.shape != (V,):
            raise ValueError(f"bias must have shape [V={V}], got {bias.shape}")
        check_float("bias", bias)
    if V == 0 or d == 0:
        raise ValueError(f"weight must have V >= 1 and d >= 1, got {weight.shape}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)


def _check(labels: torch.Tensor, V: int, ignore_index: int) -> None:
    """labels in [0, V) or == ignore_index: one aminmax over the labels (and when some lie outside [0, V),
    one more with ignore_index read as 0); CPU tensors only and not while compiling (`fastprompt.ops._checks`:
    a host read)."""
    if labels.is_cuda or labels.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = (int(t) for t in torch.aminmax(labels))
    if lo < 0 or hi >= V:
        lo, hi = (int(t) for t in torch.aminmax(labels.masked_fill(labels == ignore_index, 0)))
    if lo < 0 or hi >= V:
        raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}, got "
                         f"{lo if lo < 0 else hi}")


# ----------------------------------------------------------------------------------------------------------
# the custom op: hidden [..., d] (N tokens), labels [N] -> (loss, G): loss [N] fp32 per token ("none") or the
# fp32 scalar ("mean", "sum"); G (hidden's shape) the gradient of that loss (for "none": of each token's
# loss) in hidden, or [0, d] without a gradient
# ----------------------------------------------------------------------------------------------------------
def _lce_impl(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
              ignore_index: int, reduction: int, chunk: int, with_grad: bool,
              triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    d = hidden.shape[-1]
    flat = hidden.reshape(-1, d)
    N = flat.shape[0]
    chunk = chunk or chunk_rows(N, weight.shape[0], weight.element_size(), hidden.device.type)
    run = _chunks_triton if triton else _chunks_torch
    loss, grad = run(flat, weight, bias, labels, ignore_index, reduction, max(chunk, 1), with_grad)
    return loss, (grad.view(hidden.shape) if grad is not None else hidden.new_empty(0, d))


def _count(labels, ignore_index):
    """Non-ignored tokens as an fp32 0-d tensor, at least 1 (the mean's divisor; no host read)."""
    return (labels != ignore_index).sum(dtype=torch.float32).clamp_min_(1)


def _chunks_triton(hidden, weight, bias, labels, ignore_index, reduction, chunk, with_grad):
    """cuBLAS logits into one [chunk, V] buffer, the kernel turns them into d logits in place, cuBLAS G."""
    from fastprompt.kernels import linear_cross_entropy as kernels

    N, d = hidden.shape
    losses = torch.empty(N, dtype=torch.float32, device=hidden.device)
    grad = torch.empty(N, d, dtype=hidden.dtype, device=hidden.device) if with_grad else None
    count = _count(labels, ignore_index) if reduction == 1 else None
    scale = count.reciprocal() if with_grad and count is not None else None
    bias = None if bias is None else bias.contiguous()
    buffer = torch.empty(min(chunk, N), weight.shape[0], dtype=weight.dtype, device=weight.device)
    weight_t = weight.t()
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        logits = buffer[: e - s]
        torch.mm(hidden[s:e], weight_t, out=logits)
        kernels.lce_chunk(logits, labels[s:e], losses[s:e], bias, ignore_index, with_grad, scale)
        if with_grad:
            torch.mm(logits, weight, out=grad[s:e])
    if reduction == 0:
        return losses, grad
    total = losses.sum()
    return (total if count is None else total / count), grad


_NLL = torch.ops.aten.nll_loss_forward.default             # (loss, total weight = non-ignored count)
_NLL_BACKWARD = torch.ops.aten.nll_loss_backward.default


def _chunks_torch(hidden, weight, bias, labels, ignore_index, reduction, chunk, with_grad):
    """The same in PyTorch, with ATen's own cross-entropy pieces per chunk: fp32 logits, log_softmax,
    nll_loss, and (with a gradient) nll_loss_backward + _log_softmax_backward_data, which give
    (softmax - onehot) of the non-ignored tokens (divided by their count for "mean") in one pass each."""
    N, d = hidden.shape
    target = labels.long()
    one = torch.ones((), dtype=torch.float32, device=hidden.device)
    bias32 = None if bias is None else bias.float()
    summed = 0 if reduction == 0 else 2                         # a mean is a sum divided by the count
    if N <= chunk:                  # one chunk: a mean's count comes with the loss (nll_loss's total weight)
        lsm = _log_probs(hidden, weight, bias32)
        loss, count = _NLL(lsm, target, None, summed, ignore_index)
        if reduction == 1:
            count = count.clamp_min(1)
            loss = loss / count
        grad = _torch_grad(lsm, target, weight, ignore_index, reduction, one, count) if with_grad else None
        return loss, grad
    count = _count(target, ignore_index) if reduction == 1 else None
    losses = torch.empty(N if reduction == 0 else 0, dtype=torch.float32, device=hidden.device)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad = torch.empty(N, d, dtype=hidden.dtype, device=hidden.device) if with_grad else None
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        lsm = _log_probs(hidden[s:e], weight, bias32)
        loss, _ = _NLL(lsm, target[s:e], None, summed, ignore_index)
        if reduction == 0:
            losses[s:e] = loss
        else:
            total += loss
        if with_grad:
            _torch_grad(lsm, target[s:e], weight, ignore_index, reduction, one, count, out=grad[s:e])
        del lsm
    return (losses if reduction == 0 else total if count is None else total / count), grad


def _log_probs(hidden, weight, bias32):
    """fp32 log-softmax of the chunk's logits (the matmul in the model's dtype, then fp32)."""
    logits = torch.mm(hidden, weight.t()).float()
    if bias32 is not None:
        logits = logits + bias32
    return torch.log_softmax(logits, 1)


def _torch_grad(lsm, target, weight, ignore_index, reduction, one, count, out=None):
    """d loss / d hidden of the chunk: (softmax - onehot) @ weight, 0 for ignored tokens; for a mean
    divided by `count` (nll_loss_backward divides by its total weight)."""
    upstream = one.expand(target.shape[0]) if reduction == 0 else one
    d_nll = _NLL_BACKWARD(upstream, lsm, target, None, reduction, ignore_index, count if reduction == 1 else one)
    d_logits = torch._log_softmax_backward_data(d_nll, lsm, 1, torch.float32).to(weight.dtype)
    return torch.mm(d_logits, weight) if out is None else torch.mm(d_logits, weight, out=out)


def _lce_fake(hidden, weight, bias, labels, ignore_index, reduction, chunk, with_grad, triton):
    loss = hidden.new_empty(labels.shape[0] if reduction == 0 else (), dtype=torch.float32)
    return loss, (hidden.new_empty(hidden.shape) if with_grad else hidden.new_empty(0, hidden.shape[-1]))


def _lce_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])      # G is for this backward only: no gradient flows into it
    ctx.save_for_backward(output[1])


def _lce_grad(ctx, grad_loss, _grad_g):
    """d hidden = G scaled by the incoming gradient: per row ("none") or by the scalar."""
    (g,) = ctx.saved_tensors
    d_hidden = None
    if grad_loss is not None and g.numel():
        scale = grad_loss.to(g.dtype)
        d_hidden = g * (scale.view(*g.shape[:-1], 1) if scale.dim() else scale)
    return d_hidden, None, None, None, None, None, None, None, None


_lce = autograd_op("fastprompt::linear_cross_entropy", _lce_impl, fake=_lce_fake, setup=_lce_setup,
                   backward=_lce_grad)
