"""Public op: cross-entropy of a frozen LM head's logits without materialising the [N, V] logits."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastprompt.ops import reference
from fastprompt.ops._checks import check_float, check_same_device
from fastprompt.ops._dispatch import resolve_backend

REDUCTIONS = ("mean", "sum", "none")
# elements of one fp32 [chunk, V] logits block in the PyTorch path (128 MiB)
CHUNK_ELEMENTS = 1 << 25


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
    for "sum", with a zero gradient. The loss is fp32 whatever the input dtype (logits are accumulated in
    fp32).

    Backends: the Triton kernel walks the vocabulary in tiles with an online log-sum-exp and recomputes
    the logits tile by tile in the backward; the PyTorch path processes the tokens in chunks of
    CHUNK_ELEMENTS // V (one fp32 [chunk, V] block at a time) and, when hidden requires a gradient, forms
    d loss / d hidden [N, d] in the forward from the same block, so its backward is a row scaling.

    Example::

        loss = linear_cross_entropy(hidden[:, :-1], model.lm_head.weight, labels[:, 1:])
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    hidden2d, labels1d = _check(hidden, weight, labels, bias, ignore_index)
    frozen = not (torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)))
    if not frozen:
        return reference.linear_cross_entropy(hidden2d, weight, labels1d, bias=bias, ignore_index=ignore_index,
                                              reduction=reduction)
    if resolve_backend(backend, hidden2d, weight) == "triton":
        from fastprompt.ops._linear_cross_entropy_triton import linear_cross_entropy_losses_triton

        losses = linear_cross_entropy_losses_triton(hidden2d, weight, labels1d, bias, ignore_index)
    else:
        losses = chunked_linear_cross_entropy_losses(hidden2d, weight, labels1d, bias, ignore_index)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (labels1d != ignore_index).sum().clamp_min(1)


def chunked_linear_cross_entropy_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                        bias: torch.Tensor | None = None, ignore_index: int = -100,
                                        chunk_size: int | None = None) -> torch.Tensor:
    """The PyTorch path: per-token losses [N] fp32 of hidden [N, d] against a frozen weight [V, d], in
    chunks of `chunk_size` tokens (default CHUNK_ELEMENTS // V). Differentiable in hidden only."""
    V = weight.shape[0]
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // max(V, 1))
    return _ChunkedLinearCrossEntropy.apply(hidden, weight.detach(), None if bias is None else bias.detach(),
                                            labels, int(ignore_index), int(chunk))


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # the matmul in the model's dtype (fp32 accumulation on GPU), the logits then in fp32
    return torch.nn.functional.linear(h, weight, bias.to(weight.dtype) if bias is not None else None).float()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token losses; the gradient is formed in the forward, from the same logits block.

    The loss is the graph's last op and each token's loss depends on its hidden state alone, so
    d loss_i / d hidden_i = (softmax_i - onehot_i) @ weight can be computed while the chunk's logits are at
    hand and kept as G [N, d]; the backward only scales G's rows by the incoming gradient. Two matmuls
    over the vocabulary per token (as unfused autograd), not three (forward, recomputed logits, d hidden).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk):
        N = hidden.shape[0]
        with_grad = ctx.needs_input_grad[0]
        losses = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        per_token_grad = torch.empty_like(hidden) if with_grad else None
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0).long()
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            logits = _chunk_logits(hidden[s:e], weight, bias)
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, safe[s:e, None])[:, 0]
            losses[s:e] = torch.where(valid[s:e], lse - target, 0.0)
            if with_grad:
                p = torch.exp_(logits.sub_(lse[:, None]))                                  # softmax, in place
                p.scatter_add_(1, safe[s:e, None], -torch.ones_like(lse)[:, None])           # - one-hot
                p.mul_(valid[s:e, None])
                per_token_grad[s:e] = (p.to(weight.dtype) @ weight).to(hidden.dtype)
            del logits
        ctx.save_for_backward(per_token_grad)
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses):
        (per_token_grad,) = ctx.saved_tensors
        d_hidden = per_token_grad * grad_losses.to(per_token_grad.dtype)[:, None]
        return d_hidden, None, None, None, None, None


def _check(hidden, weight, labels, bias, ignore_index):
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, d], got {tuple(weight.shape)}")
    V, d = weight.shape
    if hidden.dim() not in (2, 3) or hidden.shape[-1] != d:
        raise ValueError(f"hidden must have shape [N, d={d}] or [B, T, d={d}], got {tuple(hidden.shape)}")
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden must have weight's dtype {weight.dtype}, got {hidden.dtype}")
    hidden2d = hidden.reshape(-1, d)
    N = hidden2d.shape[0]
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an int64 (or int32) tensor, got {labels.dtype}")
    if labels.numel() != N or labels.dim() not in (1, hidden.dim() - 1):
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} or [{N}], got {tuple(labels.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (V,):
            raise ValueError(f"bias must be a torch.Tensor [V={V}], got {getattr(bias, 'shape', type(bias))}")
        check_float("bias", bias)
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    labels1d = labels.reshape(-1)
    if not labels1d.is_cuda and N:       # as check_index: no host sync on CUDA
        bad = (labels1d != ignore_index) & ((labels1d < 0) | (labels1d >= V))
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}, got "
                             f"{int(labels1d[bad][0])}")
    return hidden2d, labels1d
