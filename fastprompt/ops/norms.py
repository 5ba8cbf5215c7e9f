"""Public ops: norms and activations of a frozen backbone whose backward computes only input gradients.

`rms_norm`, `layer_norm`, `swiglu`, `gelu`: the forward equals the HF module's (LlamaRMSNorm, nn.LayerNorm,
silu(gate) * up of Llama's MLP, gelu_new / GELU); the backward returns the gradient of the input(s) and None
for the weight and bias, and keeps only the inputs (no fp32 copies, no normalised activations) for it.
With a weight or bias that requires a gradient (and grad mode on), the reference runs instead, with
ordinary autograd, so that it gets one.

Example::

    y = rms_norm(hidden, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
"""

from __future__ import annotations

import types

import torch

from fastprompt.ops import reference
from fastprompt.ops._checks import check_float, check_same_device
from fastprompt.ops._dispatch import resolve_backend
from fastprompt.ops._norms_triton import ActFunction, NormFunction

GELU_APPROXIMATIONS = ("tanh", "none")


# ----------------------------------------------------------------------------------------------------------
# the PyTorch path: the reference's forward, an input-gradient-only backward (same formulas as the kernels)
# ----------------------------------------------------------------------------------------------------------
def _torch_norm_fwd(x, weight, bias, eps, rms):
    return reference.rms_norm(x, weight, eps) if rms else reference.layer_norm(x, weight, bias, eps)


def _torch_norm_bwd(grad_y, x, weight, eps, rms):
    xf, g = x.float(), grad_y.float() * weight.float()
    xc = xf if rms else xf - xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xc * rstd
    inner = g - xhat * (g * xhat).mean(-1, keepdim=True)
    if not rms:
        inner = inner - g.mean(-1, keepdim=True)
    return (rstd * inner).to(x.dtype)


def _torch_act_fwd(kind, a, b):
    return reference.swiglu(a, b) if kind == "swiglu" else reference.gelu(a, "tanh" if kind == "gelu_tanh" else "none")


def _torch_act_bwd(kind, grad_y, a, b):
    dy, af = grad_y.float(), a.float()
    if kind == "swiglu":
        s = torch.sigmoid(af)
        return (dy * b.float() * s * (1 + af * (1 - s))).to(a.dtype), (dy * af * s).to(a.dtype)
    if kind == "gelu_tanh":
        t = torch.tanh(0.7978845608028654 * (af + 0.044715 * af.pow(3)))
        d_inner = 0.7978845608028654 * (1 + 3 * 0.044715 * af * af)
        return (dy * (0.5 * (1 + t) + 0.5 * af * (1 - t * t) * d_inner)).to(a.dtype), None
    cdf = 0.5 * (1 + torch.erf(af * 0.7071067811865476))
    return (dy * (cdf + af * 0.3989422804014327 * torch.exp(-0.5 * af * af))).to(a.dtype), None


TORCH = types.SimpleNamespace(norm_fwd=_torch_norm_fwd, norm_bwd=_torch_norm_bwd, act_fwd=_torch_act_fwd,
                              act_bwd=_torch_act_bwd)


def _impl(backend, *tensors):
    if resolve_backend(backend, *tensors) == "triton":
        from fastprompt.ops._norms_triton import TRITON

        return TRITON
    return TORCH


def _wants_grad(*params) -> bool:
    return torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)


# ----------------------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------------------
def _check_norm(x, weight, bias):
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_float(name, t)
    if x.dim() < 1:
        raise ValueError("x must have shape [..., d]")
    d = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (d,):
            raise ValueError(f"{name} must have shape [d={d}], got {tuple(t.shape)}")
    check_same_device(x=x, weight=weight, bias=bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """LlamaRMSNorm (Llama, Mistral, Qwen2, Qwen3 and its q/k norms): x [..., d], weight [d] (frozen).

    weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype), in the dtype of weight * x.
    Differentiable in x.
    """
    _check_norm(x, weight, None)
    if _wants_grad(weight):
        return reference.rms_norm(x, weight, eps)
    d = x.shape[-1]
    impl = _impl(backend, x, weight)
    y = NormFunction.apply(x.reshape(-1, d).contiguous(), weight.detach().contiguous(), None, float(eps), True, impl)
    return y.view(*x.shape[:-1], d)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5, *,
               backend: str | None = None) -> torch.Tensor:
    """nn.LayerNorm over the last dimension (GPT-2's ln_1, ln_2, ln_f): x [..., d]; weight, bias [d]
    (frozen). Statistics in fp32; returns x's dtype. Differentiable in x."""
    _check_norm(x, weight, bias)
    if _wants_grad(weight, bias):
        return reference.layer_norm(x, weight, bias, eps)
    d = x.shape[-1]
    impl = _impl(backend, x, weight)
    y = NormFunction.apply(x.reshape(-1, d).contiguous(), weight.detach().contiguous(),
                           None if bias is None else bias.detach().contiguous(), float(eps), False, impl)
    return y.view(x.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, as Llama's MLP (silu rounded to the input dtype, then the product): gate and up of
    one shape and dtype. Differentiable in both."""
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_float(name, t)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must have one shape and dtype, got {tuple(gate.shape)} {gate.dtype} and "
                         f"{tuple(up.shape)} {up.dtype}")
    check_same_device(gate=gate, up=up)
    return ActFunction.apply("swiglu", gate.contiguous(), up.contiguous(), _impl(backend, gate, up))


def gelu(x: torch.Tensor, approximate: str = "tanh", *, backend: str | None = None) -> torch.Tensor:
    """GELU of x (any shape), in x's dtype. approximate="tanh" (the default): GPT-2's gelu_new,
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); "none": the exact 0.5 x (1 + erf(x / sqrt(2)))."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_float("x", x)
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    kind = "gelu_tanh" if approximate == "tanh" else "gelu"
    return ActFunction.apply(kind, x.contiguous(), None, _impl(backend, x))
