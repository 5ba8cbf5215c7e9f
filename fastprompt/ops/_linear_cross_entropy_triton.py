"""Autograd Function of the Triton path of `fastprompt.ops.linear_cross_entropy`: per-token losses."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastprompt.kernels import linear_cross_entropy as _k


class _LinearCrossEntropy(torch.autograd.Function):
    """(hidden [N, d], frozen weight [V, d], frozen bias [V] | None, labels [N]) -> losses [N] fp32.

    Saves hidden, weight, bias, labels (inputs, alive anyway) and lse [N] fp32; the backward recomputes
    the logits tile by tile and returns d hidden only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index):
        losses, lse = _k.lce_fwd(hidden, weight, labels, bias, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.ignore_index = ignore_index
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        d_hidden = None
        if ctx.needs_input_grad[0]:
            d_hidden = _k.lce_bwd(hidden, weight, labels, lse, grad_losses.float().contiguous(), bias,
                                  ctx.ignore_index)
        return d_hidden, None, None, None, None


def linear_cross_entropy_losses_triton(hidden, weight, labels, bias, ignore_index):
    """Per-token losses [N] fp32 (0 at ignored tokens); arguments validated by the public op."""
    return _LinearCrossEntropy.apply(hidden.contiguous(), weight.detach().contiguous(),
                                     None if bias is None else bias.detach().contiguous(),
                                     labels.contiguous(), int(ignore_index))
