"""Norms and activations with input-only gradients: kernels and the PyTorch path vs the references, and
the references vs the HF modules they replace (LlamaRMSNorm, nn.LayerNorm, gelu_new, silu(gate) * up)."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from fastprompt import ops
from fastprompt.audit import saved_bytes
from fastprompt.kernels import norms as K
from fastprompt.ops import reference
from tests.helpers import DEVICE, RTOL, assert_close, nan_like

SHAPES = [pytest.param((3, 7, 40), id="3x7x40"), pytest.param((5, 72), id="5x72"),
          pytest.param((2, 3, 5, 20), id="2x3x5x20-qk-norm")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["triton", "torch"]


def _randn(shape, dtype, seed, scale=1.0, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale + shift).to(DEVICE, dtype)


def _check_op(name, op, ref_fn, inputs, dtype, seed=9):
    """op(*inputs) against ref_fn on the inputs upcast: output and each input's gradient."""
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    out = op(*leaves)
    ref_leaves = [t.detach().float().requires_grad_(True) for t in inputs]
    ref = ref_fn(*ref_leaves)
    assert out.shape == ref.shape
    assert_close(f"{name} out", out, ref, RTOL[dtype])
    grad = _randn(out.shape, out.dtype, seed)
    out.backward(grad)
    ref.backward(grad.float())
    for i, (leaf, ref_leaf) in enumerate(zip(leaves, ref_leaves)):
        assert leaf.grad.dtype == leaf.dtype
        assert_close(f"{name} d input {i}", leaf.grad, ref_leaf.grad, RTOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(shape, dtype, backend):
    weight = _randn(shape[-1:], dtype, 1, 0.3, 1.0)
    _check_op("rms_norm", lambda x: ops.rms_norm(x, weight, 1e-6, backend=backend),
              lambda x: reference.rms_norm(x, weight.float(), 1e-6), [_randn(shape, dtype, 0, 2.0, 0.5)], dtype)
    assert weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_layer_norm(shape, dtype, bias, backend):
    weight = _randn(shape[-1:], dtype, 1, 0.3, 1.0)
    b = _randn(shape[-1:], dtype, 2) if bias else None
    _check_op("layer_norm", lambda x: ops.layer_norm(x, weight, b, 1e-5, backend=backend),
              lambda x: reference.layer_norm(x, weight.float(), None if b is None else b.float(), 1e-5),
              [_randn(shape, dtype, 0, 2.0, 0.5)], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_swiglu(shape, dtype, backend):
    _check_op("swiglu", lambda g, u: ops.swiglu(g, u, backend=backend), reference.swiglu,
              [_randn(shape, dtype, 0, 3.0), _randn(shape, dtype, 1)], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_gelu(shape, dtype, approximate, backend):
    _check_op("gelu", lambda x: ops.gelu(x, approximate, backend=backend),
              lambda x: reference.gelu(x, approximate), [_randn(shape, dtype, 0, 3.0)], dtype)


def test_extreme_values_finite():
    """Large |x| (exp overflow inside tanh / sigmoid) stays finite and matches the reference."""
    x = torch.tensor([-1e4, -80.0, -20.0, -1e-6, 0.0, 1e-6, 20.0, 80.0, 1e4], device=DEVICE)
    for approximate in ("tanh", "none"):
        leaf = x.clone().requires_grad_(True)
        y = ops.gelu(leaf, approximate, backend="triton")
        ref_leaf = x.clone().requires_grad_(True)
        ref = reference.gelu(ref_leaf, approximate)
        assert_close("gelu", y, ref, RTOL[torch.float32])
        y.sum().backward()
        ref.sum().backward()
        assert_close("d gelu", leaf.grad, ref_leaf.grad, RTOL[torch.float32])
    g = x.clamp(-80.0, 80.0)      # sigmoid(-1e4) overflows exp in the interpreter's numpy (a warning only)
    y = ops.swiglu(g, torch.ones_like(g), backend="triton")
    assert_close("swiglu", y, reference.swiglu(g, torch.ones_like(g)), RTOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_launchers_nan_prefilled(dtype):
    """Outputs pre-filled with NaN; rows and elements beyond one program (block_m=2, block=64)."""
    M, D = 7, 40
    x, dy = _randn((M, D), dtype, 0), _randn((M, D), dtype, 1)
    w, b = _randn((D,), dtype, 2, 0.3, 1.0), _randn((D,), dtype, 3)
    for rms in (True, False):
        bias = None if rms else b
        y = K.norm_fwd(x, w, bias, 1e-5, rms, out=nan_like((M, D), dtype), block_m=2)
        ref = reference.rms_norm(x.float(), w.float(), 1e-5) if rms else reference.layer_norm(
            x.float(), w.float(), b.float(), 1e-5)
        assert_close(f"norm rms={rms}", y, ref, RTOL[dtype])
        dx = K.norm_bwd(dy, x, w, 1e-5, rms, out=nan_like((M, D), dtype), block_m=2)
        assert torch.isfinite(dx).all()
    for kind in ("swiglu", "gelu_tanh", "gelu"):
        y = K.act_fwd(kind, x, dy if kind == "swiglu" else None, out=nan_like((M, D), dtype), block=64)
        assert torch.isfinite(y).all(), kind


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_references_match_hf_modules(dtype):
    d = 40
    x = _randn((3, 7, d), dtype, 0, 2.0, 0.5)
    hf_rms = LlamaRMSNorm(d, eps=1e-6).to(DEVICE, dtype)
    hf_rms.weight.data.copy_(_randn((d,), dtype, 1, 0.3, 1.0))
    # the reference is LlamaRMSNorm's arithmetic, operation by operation: bitwise equal
    assert torch.equal(reference.rms_norm(x, hf_rms.weight, 1e-6), hf_rms(x))
    assert_close("rms_norm vs LlamaRMSNorm", ops.rms_norm(x, hf_rms.weight.detach(), 1e-6, backend="triton"),
                 hf_rms(x).float(), RTOL[dtype])

    ln = torch.nn.LayerNorm(d, eps=1e-5).to(DEVICE, dtype)
    ln.weight.data.copy_(_randn((d,), dtype, 1, 0.3, 1.0))
    ln.bias.data.copy_(_randn((d,), dtype, 2))
    expected = ln(x)
    assert_close("layer_norm vs nn.LayerNorm", reference.layer_norm(x, ln.weight, ln.bias, 1e-5), expected,
                 RTOL[dtype] if dtype != torch.float32 else 1e-6)

    g, u = _randn((3, 7, d), dtype, 3, 3.0), _randn((3, 7, d), dtype, 4)
    assert_close("swiglu vs silu * up", reference.swiglu(g, u), ACT2FN["silu"](g) * u, 1e-6)
    assert_close("gelu vs gelu_new", reference.gelu(g, "tanh"), ACT2FN["gelu_new"](g),
                 RTOL[dtype] if dtype != torch.float32 else 1e-6)
    assert_close("gelu vs nn.GELU", reference.gelu(g, "none"), torch.nn.functional.gelu(g),
                 RTOL[dtype] if dtype != torch.float32 else 1e-6)
    if dtype == torch.float32:   # Qwen3's q/k norm: the same class over [B, H, T, head_dim]
        qk = _randn((2, 3, 5, 20), dtype, 5)
        w = _randn((20,), dtype, 6, 0.3, 1.0)
        assert_close("qk norm", ops.rms_norm(qk, w, 1e-6, backend="triton"), reference.rms_norm(qk, w, 1e-6), 1e-5)


def test_trainable_weight_gets_gradient_through_reference():
    x = _randn((5, 40), torch.float32, 0)
    w = _randn((40,), torch.float32, 1).requires_grad_(True)
    w_ref = w.detach().clone().requires_grad_(True)
    ops.rms_norm(x, w, backend="triton").pow(2).sum().backward()
    reference.rms_norm(x, w_ref).pow(2).sum().backward()
    assert_close("d weight", w.grad, w_ref.grad, RTOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_inputs_only(backend):
    """The ops keep their inputs (x and the weight; gate and up); the references keep fp32 intermediates."""
    x = _randn((16, 64), torch.bfloat16, 0).requires_grad_(True)
    u = _randn((16, 64), torch.bfloat16, 1).requires_grad_(True)
    w = _randn((64,), torch.bfloat16, 2)
    x_bytes = x.numel() * x.element_size()
    for op, ref in ((lambda: ops.rms_norm(x, w, backend=backend), lambda: reference.rms_norm(x, w)),
                    (lambda: ops.layer_norm(x, w, w, backend=backend), lambda: reference.layer_norm(x, w, w)),
                    (lambda: ops.gelu(x, backend=backend), lambda: reference.gelu(x)),
                    (lambda: ops.swiglu(x, u, backend=backend), lambda: reference.swiglu(x, u))):
        fused = saved_bytes(lambda: op().sum().backward(), exclude=[w])
        unfused = saved_bytes(lambda: ref().sum().backward(), exclude=[w])
        assert fused.activation_bytes <= 2 * x_bytes < unfused.activation_bytes, (fused, unfused)
