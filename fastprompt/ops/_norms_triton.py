"""Autograd Functions of `fastprompt.ops.norms`: input gradients only, for frozen weights.

`NormFunction` and `ActFunction` take an implementation (`TRITON` here; `fastprompt.ops.norms.TORCH` for
the PyTorch path) with four functions: norm_fwd, norm_bwd, act_fwd, act_bwd, all with the signatures of
the launchers in `fastprompt.kernels.norms`. Both save only what the input gradient needs: a norm keeps its
input x and weight (statistics are recomputed), SwiGLU keeps gate and up, GELU keeps x.
"""

from __future__ import annotations

import types

import torch
from torch.autograd.function import once_differentiable

from fastprompt.kernels import norms as _k

TRITON = types.SimpleNamespace(norm_fwd=_k.norm_fwd, norm_bwd=_k.norm_bwd, act_fwd=_k.act_fwd,
                               act_bwd=_k.act_bwd)


class NormFunction(torch.autograd.Function):
    """(x [M, d], weight [d], bias [d] | None, eps, rms, impl) -> y [M, d]; gradient for x only."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms, impl):
        y = impl.norm_fwd(x, weight, bias, eps, rms)
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.rms, ctx.impl = eps, rms, impl
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        dx = ctx.impl.norm_bwd(grad_y.contiguous(), x, weight, ctx.eps, ctx.rms) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None, None


class ActFunction(torch.autograd.Function):
    """(kind, a, b | None, impl) -> y; gradients for a (and b for SwiGLU)."""

    @staticmethod
    def forward(ctx, kind, a, b, impl):
        y = impl.act_fwd(kind, a, b)
        ctx.save_for_backward(a, b)
        ctx.kind, ctx.impl = kind, impl
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        a, b = ctx.saved_tensors
        da, db = ctx.impl.act_bwd(ctx.kind, grad_y.contiguous(), a, b)
        return None, da, db, None
