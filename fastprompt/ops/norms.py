"""Public ops: norms and activations of a frozen backbone whose backward computes only input gradients.

`rms_norm`, `layer_norm`, `swiglu`, `gelu`: the forward equals the HF module's (LlamaRMSNorm, nn.LayerNorm,
silu(gate) * up of Llama's MLP, gelu_new / GELU); the backward returns the gradient of the input(s) and None
for the weight and bias, and keeps only the inputs (no fp32 copies, no normalised activations) for it.
With a weight or bias that requires a gradient (and grad mode on), the reference runs instead, with
ordinary autograd, so that it gets one.

One module holds the ops: their checks (cached per new shape, see `fastprompt.ops._checks`), the PyTorch
formulas of the input-gradient backward, and the custom ops `fastprompt::norm`, `fastprompt::norm_backward`,
`fastprompt::activation` and `fastprompt::activation_backward` (torch.library, with fake kernels and
autograd; `fastprompt.ops._registry`: an autograd.Function over the same functions in eager mode), whose
`triton` flag picks the Triton launchers (`fastprompt.kernels.norms`) or the PyTorch formulas, so that both
backends keep the input-only backward and torch.compile(fullgraph=True) traces them.

Example::

    y = rms_norm(hidden, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
"""

from __future__ import annotations

from typing import Optional

import torch

from fastprompt.ops import reference
from fastprompt.ops._checks import cached, check_float, check_same_device, spec
from fastprompt.ops._dispatch import resolve_backend
from fastprompt.ops._registry import autograd_op, plain_op, public_op

GELU_APPROXIMATIONS = ("tanh", "none")
ACTIVATIONS = ("swiglu", "gelu_tanh", "gelu")


# ----------------------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------------------
@public_op
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """LlamaRMSNorm (Llama, Mistral, Qwen2, Qwen3 and its q/k norms): x [..., d], weight [d] (frozen).

    weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype), in the dtype of weight * x.
    fp32, bf16 or fp16. Differentiable in x.
    """
    _check_norm(spec("x", x, "[..., d]"), spec("weight", weight, "[d]"), None)
    if _wants_grad(weight):
        return reference.rms_norm(x, weight, eps)
    # x of any shape goes in as it is (the op normalises its last dimension): no view nodes in the graph
    return _norm(x, _frozen(weight), None, float(eps), True, _use_triton(backend, x, weight))


@public_op
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5, *,
               backend: str | None = None) -> torch.Tensor:
    """nn.LayerNorm over the last dimension (GPT-2's ln_1, ln_2, ln_f): x [..., d]; weight, bias [d]
    (frozen); fp32, bf16 or fp16. Statistics in fp32; returns x's dtype. Differentiable in x."""
    _check_norm(spec("x", x, "[..., d]"), spec("weight", weight, "[d]"), spec("bias", bias, "[d]"))
    if _wants_grad(weight, bias):
        return reference.layer_norm(x, weight, bias, eps)
    return _norm(x, _frozen(weight), None if bias is None else _frozen(bias), float(eps), False,
                 _use_triton(backend, x, weight))


@public_op
def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, as Llama's MLP (silu rounded to the input dtype, then the product): gate and up of
    one shape and dtype (fp32, bf16 or fp16). Differentiable in both."""
    _check_swiglu(spec("gate", gate, "[...]"), spec("up", up, "[...]"))
    return _activation("swiglu", gate, up, _use_triton(backend, gate, up))


@public_op
def gelu(x: torch.Tensor, approximate: str = "tanh", *, backend: str | None = None) -> torch.Tensor:
    """GELU of x (any shape; fp32, bf16 or fp16), in x's dtype. approximate="tanh" (the default): GPT-2's
    gelu_new, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); "none": the exact 0.5 x (1 + erf(x / sqrt(2)))."""
    check_float("x", spec("x", x, "[...]"))
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    kind = "gelu_tanh" if approximate == "tanh" else "gelu"
    return _activation(kind, x, None, _use_triton(backend, x))


def _use_triton(backend, *tensors) -> bool:
    return resolve_backend(backend, *tensors) == "triton"


def _frozen(param: torch.Tensor) -> torch.Tensor:
    """param detached when it requires grad (grad mode off); as it is otherwise (a detach is an op)."""
    return param.detach() if param.requires_grad else param


def _wants_grad(*params) -> bool:
    return torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)


@cached
def _check_norm(x, weight, bias) -> None:
    for name, s in (("x", x), ("weight", weight), ("bias", bias)):
        if s is not None:
            check_float(name, s)
    if len(x.shape) < 1:
        raise ValueError("x must have shape [..., d], got a 0-d tensor")
    d = x.shape[-1]
    for name, s in (("weight", weight), ("bias", bias)):
        if s is not None and s.shape != (d,):
            raise ValueError(f"{name} must have shape [d={d}], got {s.shape}")
    check_same_device(x=x, weight=weight, bias=bias)


@cached
def _check_swiglu(gate, up) -> None:
    check_float("gate", gate)
    check_float("up", up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must have one shape and dtype, got {gate.shape} {gate.dtype} and "
                         f"{up.shape} {up.dtype}")
    check_same_device(gate=gate, up=up)


# ----------------------------------------------------------------------------------------------------------
# the PyTorch formulas of the input-gradient backward (the same as the kernels')
# ----------------------------------------------------------------------------------------------------------
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
        return [(dy * b.float() * s * (1 + af * (1 - s))).to(a.dtype), (dy * af * s).to(a.dtype)]
    if kind == "gelu_tanh":
        t = torch.tanh(0.7978845608028654 * (af + 0.044715 * af.pow(3)))
        d_inner = 0.7978845608028654 * (1 + 3 * 0.044715 * af * af)
        return [(dy * (0.5 * (1 + t) + 0.5 * af * (1 - t * t) * d_inner)).to(a.dtype)]
    cdf = 0.5 * (1 + torch.erf(af * 0.7071067811865476))
    return [(dy * (cdf + af * 0.3989422804014327 * torch.exp(-0.5 * af * af))).to(a.dtype)]


# ----------------------------------------------------------------------------------------------------------
# custom ops: the norm takes x [..., d]; each saves only its inputs for the backward (statistics recomputed)
# ----------------------------------------------------------------------------------------------------------
_KERNELS = []


def _kernels():
    """fastprompt.kernels.norms, imported on first use (Triton is imported lazily), then held: a function
    -level import costs a sys.modules lookup per call."""
    if not _KERNELS:
        from fastprompt.kernels import norms

        _KERNELS.append(norms)
    return _KERNELS[0]


def _norm_out_dtype(x_dtype, weight_dtype, rms):
    """RMSNorm returns weight * (normalised in x's dtype): the promoted dtype; LayerNorm returns x's dtype."""
    return torch.promote_types(x_dtype, weight_dtype) if rms else x_dtype


def _norm_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float, rms: bool,
               triton: bool) -> torch.Tensor:
    if triton:
        return _kernels().norm_fwd(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
                                   eps, rms)
    return reference.rms_norm(x, weight, eps) if rms else reference.layer_norm(x, weight, bias, eps)


def _norm_backward_impl(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, rms: bool,
                        triton: bool) -> torch.Tensor:
    if triton:
        return _kernels().norm_bwd(grad_y.contiguous(), x.contiguous(), weight.contiguous(), eps, rms)
    return _torch_norm_bwd(grad_y, x, weight, eps, rms)


def _norm_setup(ctx, inputs, output):
    x, weight, _, eps, rms, triton = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.rms, ctx.triton = eps, rms, triton


def _norm_grad(ctx, grad_y):
    x, weight = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0]:
        dx = _norm_backward(grad_y, x, weight, ctx.eps, ctx.rms, ctx.triton)
    return dx, None, None, None, None, None


def _activation_impl(kind: str, a: torch.Tensor, b: Optional[torch.Tensor], triton: bool) -> torch.Tensor:
    if triton:
        return _kernels().act_fwd(kind, a.contiguous(), None if b is None else b.contiguous())
    return _torch_act_fwd(kind, a, b)


def _activation_backward_impl(kind: str, grad_y: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor],
                              triton: bool) -> list[torch.Tensor]:
    """[d a] for GELU, [d gate, d up] for SwiGLU."""
    if triton:
        da, db = _kernels().act_bwd(kind, grad_y.contiguous(), a.contiguous(), None if b is None else b.contiguous())
        return [da] if db is None else [da, db]
    return _torch_act_bwd(kind, grad_y, a, b)


def _activation_setup(ctx, inputs, output):
    kind, a, b, triton = inputs
    ctx.save_for_backward(a, b)
    ctx.kind, ctx.triton = kind, triton


def _activation_grad(ctx, grad_y):
    a, b = ctx.saved_tensors
    grads = _activation_backward(ctx.kind, grad_y, a, b, ctx.triton)
    return None, grads[0], grads[1] if len(grads) > 1 else None, None


def _like(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


_norm = autograd_op(
    "fastprompt::norm", _norm_impl, setup=_norm_setup, backward=_norm_grad,
    fake=lambda x, weight, bias, eps, rms, triton: x.new_empty(x.shape, dtype=_norm_out_dtype(x.dtype, weight.dtype,
                                                                                              rms)))
_norm_backward = plain_op("fastprompt::norm_backward", _norm_backward_impl,
                          fake=lambda grad_y, x, weight, eps, rms, triton: _like(x))
_activation = autograd_op("fastprompt::activation", _activation_impl, setup=_activation_setup,
                          backward=_activation_grad, fake=lambda kind, a, b, triton: _like(a))
_activation_backward = plain_op(
    "fastprompt::activation_backward", _activation_backward_impl,
    fake=lambda kind, grad_y, a, b, triton: [_like(a) for _ in range(2 if kind == "swiglu" else 1)])
