"""Every Triton kernel natively on a CUDA device, at model-like sizes, in fp32, bf16 and fp16.

Skipped without CUDA (tests/conftest.py). Outputs and gradients come from the launchers into NaN-filled
buffers where the launcher takes one, so an element a kernel never writes fails; each is compared with the
fp32 reference on the same inputs upcast (tests/helpers.py tolerances: fp32 1e-4, bf16/fp16 2e-2).
The CPU suite runs the same kernels in Triton's interpreter at small shapes; here the compiled code, the
GPU block-size heuristics (larger tiles, split-KV decode from the SM count) and int offsets at size run.
Cases already covered natively in tests/ops (prefix attention bf16/fp32 causal right-padded through the
op, bf16 decode; bf16 prompt embedding through the op) are not repeated.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fastprompt import ops
from fastprompt.kernels import linear_cross_entropy as LCE
from fastprompt.kernels import norms as NORMS
from fastprompt.ops import reference
from tests.helpers import DEVICE, RTOL, assert_close, nan_like
from tests.ops.test_linear_cross_entropy import _case as lce_case
from tests.ops.test_linear_cross_entropy import _reference as lce_reference
from tests.ops.test_compile import _cases as op_cases
from tests.ops.test_prefix_attention import _check_against_reference, _launcher_check, _padding_mask, _shape
from tests.ops.test_prompt_embed import _template
from tests.ops.test_prompt_embed import check_launchers as check_prompt_embed_launchers

pytestmark = pytest.mark.gpu
LCE_OP = importlib.import_module("fastprompt.ops.linear_cross_entropy")   # fastprompt.ops re-exports the function

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]


def _randn(shape, dtype, seed, scale=1.0, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale + shift).to(DEVICE, dtype)


# ----------------------------------------------------------------------------------------------------
# prefix attention: forward and backward launchers (NaN-filled out and five gradients), decode
# ----------------------------------------------------------------------------------------------------
# (B, Hq, Hkv, T, S, P, D): T >= 1000 spans many 128-row tiles; P 0 / 20 / 100; head dims 64 and 128.
TRAIN_SHAPES = [
    _shape(2, 8, 2, 1031, 1031, 100, 128),   # Llama-like GQA, prefix over one 64-key tile
    _shape(3, 4, 4, 1000, 1000, 20, 64),
    _shape(1, 6, 3, 1537, 1537, 0, 64),      # plain attention
    _shape(2, 4, 1, 1009, 1200, 100, 128),   # MQA, S > T (a cache longer than the new tokens)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", TRAIN_SHAPES)
def test_prefix_attention_causal_left_padded(dims, dtype):
    _launcher_check(dims, dtype, causal=True, mask=_padding_mask(dims[0], dims[4], "left"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", TRAIN_SHAPES[:2])
def test_prefix_attention_bidirectional(dims, dtype):
    _launcher_check(dims, dtype, causal=False, mask=None)


def _decode_mask(B, S):
    """Per-row valid cache lengths from S // 8 to S (right padded), as a serving batch has."""
    lengths = torch.linspace(S // 8, S, B).round().long()
    return (torch.arange(S)[None, :] < lengths[:, None]).to(DEVICE)


@pytest.mark.parametrize("num_splits", [None, 1], ids=["split", "nosplit"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("dims", [_shape(16, 16, 4, 1, 2053, 100, 64), _shape(9, 32, 8, 1, 4099, 0, 128),
                                  _shape(4, 8, 8, 5, 3001, 20, 128)])
def test_prefix_attention_decode(dims, dtype, num_splits):
    _launcher_check(dims, dtype, causal=True, mask=_decode_mask(dims[0], dims[4]), num_splits=num_splits,
                    backward=False)


@pytest.mark.parametrize("dims", [_shape(2, 8, 2, 2048, 2048, 100, 64),    # SDPA with a lower-right CausalBias
                                  _shape(2, 8, 8, 600, 600, 0, 128)])     # SDPA is_causal
def test_prefix_attention_sdpa_route(dims):
    """Training shapes the route sends to SDPA on concatenated keys (flash / efficient kernels here): equal
    to the fp32 reference, outputs and all five gradients, in bf16."""
    from fastprompt.ops.prefix_attention import attention_route

    B, Hq, Hkv, T, S, P, D = dims
    assert attention_route(T=T, S=S, P=P, grouped=Hq != Hkv, causal=True, has_padding_mask=False,
                           has_bias=False) == "sdpa"
    _check_against_reference(dims, torch.bfloat16, causal=True, mask=None, mask_kind=None)


def test_ops_never_sync_with_the_host():
    """Every op's forward and backward, after a first call has filled the shape caches, under
    torch.cuda.set_sync_debug_mode("error"): a host sync anywhere in them raises."""
    for name, (fn, inputs) in op_cases("triton").items():
        fn(*inputs).sum().backward()
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        grad = torch.ones_like(fn(*leaves))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn(*leaves).backward(grad)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------------
# prompt embedding: prompt tuning, MPT, MPT prompts alone, the prompt gradient; prefix and template layouts
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["prefix", "template"])
@pytest.mark.parametrize("P", [20, 100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prompt_embed_launchers(dtype, P, layout):
    check_prompt_embed_launchers(B=6, T=509, P=P, d=4096, vocab=32000, n_tasks=5, rank=3,
                                 row_tasks=[0, 3, 3, 1, 0, 3], dtype=dtype, layouts=(layout,), seed=P)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
def test_mpt_prompt_embed_op_gradients(dtype):
    """The autograd path of MPT (d shared, d task_cols, d task_rows) at size, in the dtypes tests/ops'
    native bf16 case leaves out."""
    B, T, P, d, n_tasks, rank = 5, 301, 100, 2048, 4, 2
    gen = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, 32000, (B, T), generator=gen).to(DEVICE)
    weight = torch.randn(32000, d, generator=gen).to(DEVICE, dtype)
    task_ids = torch.tensor([3, 0, 3, 1, 3], device=DEVICE)
    params = [torch.randn(*s, generator=gen).to(DEVICE, dtype).requires_grad_()
              for s in ((P, d), (n_tasks, P, rank), (n_tasks, rank, d))]
    positions = _template(B, T, P)
    out = ops.mpt_prompt_embed(input_ids, weight, *params, task_ids, positions=positions, backend="triton")
    ref_params = [p.detach().float().requires_grad_() for p in params]
    ref = ops.mpt_prompt_embed(input_ids, weight.float(), *ref_params, task_ids, positions=positions,
                               backend="torch")
    assert_close("out", out, ref, RTOL[dtype])
    grad_out = torch.randn(B, T + P, d, generator=gen).to(DEVICE, dtype)
    out.backward(grad_out)
    ref.backward(grad_out.float())
    for name, p, rp in zip(("d shared", "d task_cols", "d task_rows"), params, ref_params):
        assert_close(name, p.grad, rp.grad, RTOL[dtype])


# ----------------------------------------------------------------------------------------------------
# linear cross-entropy: cuBLAS logits of a real vocabulary (32000, 50257, 128256), the chunk kernel with
# its own GPU block sizes (NaN-filled loss, d logits in place), the op through several chunks, no syncs
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("N, V, d", [pytest.param(2047, 32000, 2048, id="N2047-V32000-d2048"),
                                     pytest.param(1001, 128256, 2048, id="N1001-V128256-d2048"),
                                     pytest.param(515, 50257, 1024, id="N515-V50257-d1024")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy_chunk_kernel(dtype, N, V, d, bias):
    hidden, weight, b, labels, _ = lce_case(N, V, d, dtype, bias, ignore=(0, 3, N // 2))
    logits = hidden @ weight.T
    x = logits.float() + (0 if b is None else b.float())
    valid = labels != -100
    safe = torch.where(valid, labels, 0)
    want_loss = torch.where(valid, torch.logsumexp(x, -1) - x.gather(1, safe[:, None])[:, 0], 0.0)
    want_dlogits = (torch.softmax(x, -1) - torch.nn.functional.one_hot(safe, V).float()) * valid[:, None]
    del x
    loss = LCE.lce_chunk(logits, labels, nan_like((N,), torch.float32), b, -100, True)
    assert_close("loss", loss, want_loss, RTOL[dtype])
    assert_close("d logits", logits, want_dlogits.to(dtype), RTOL[dtype])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy_op(dtype, reduction, monkeypatch):
    """The public op as the LM loss uses it: [B, T, d] hidden, [B, T] labels, a reduction, d hidden; a
    16 MiB chunk budget, so that the 999 tokens take several chunks (the last partial)."""
    monkeypatch.setitem(LCE_OP.CHUNK_BYTES, "cuda", 16 << 20)
    LCE_OP.chunk_rows.cache_clear()
    B, T, V, d = 3, 333, 32000, 1024
    hidden, weight, _, labels, grad = lce_case(B * T, V, d, dtype, ignore=(5, 6, 7))
    grad = grad if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    leaf = hidden.view(B, T, d).clone().requires_grad_(True)
    loss = ops.linear_cross_entropy(leaf, weight, labels.view(B, T), reduction=reduction, backend="triton")
    ref, ref_grad = lce_reference(hidden, weight, None, labels, grad, reduction)
    assert_close("loss", loss, ref, RTOL[dtype])
    loss.backward(grad.view(loss.shape))
    assert_close("d hidden", leaf.grad.view(-1, d), ref_grad, RTOL[dtype])
    LCE_OP.chunk_rows.cache_clear()


def test_linear_cross_entropy_no_host_sync():
    """Forward and backward of the op on CUDA never wait for the device (no .item(), nonzero, bool(t))."""
    hidden, weight, _, labels, _ = lce_case(1000, 32000, 1024, torch.bfloat16, ignore=(5,))
    leaf = hidden.clone().requires_grad_(True)
    ops.linear_cross_entropy(leaf, weight, labels).backward()        # warm: compile, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.linear_cross_entropy(leaf, weight, labels).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------------
# norms and activations: model widths (GPT-2 medium 1024, Llama 2048 / 4096, a non-power-of-two width)
# ----------------------------------------------------------------------------------------------------
WIDTHS = [1024, 2048, 4096, 5000]


def _input_grad(fn, inputs, grad_out):
    leaves = [t.detach().float().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.float())
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("rms", [True, False], ids=["rms_norm", "layer_norm"])
@pytest.mark.parametrize("D", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_launchers(dtype, D, rms):
    M = 4099
    x, dy = _randn((M, D), dtype, 0, 2.0, 0.5), _randn((M, D), dtype, 1)
    w, b = _randn((D,), dtype, 2, 0.3, 1.0), (None if rms else _randn((D,), dtype, 3))
    y = NORMS.norm_fwd(x, w, b, 1e-5, rms, out=nan_like((M, D), dtype))
    if rms:
        fn = lambda x_: reference.rms_norm(x_, w.float(), 1e-5)                       # noqa: E731
    else:
        fn = lambda x_: reference.layer_norm(x_, w.float(), b.float(), 1e-5)          # noqa: E731
    ref, (ref_dx,) = _input_grad(fn, [x], dy)
    assert_close("y", y, ref, RTOL[dtype])
    dx = NORMS.norm_bwd(dy, x, w, 1e-5, rms, out=nan_like((M, D), dtype))
    assert_close("dx", dx, ref_dx, RTOL[dtype])


@pytest.mark.parametrize("kind", ["swiglu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_launchers(dtype, kind):
    shape = (4099, 8192 + 3)   # Llama-3.2-1B's MLP width, plus an odd tail beyond the last block
    a, b, dy = _randn(shape, dtype, 0, 3.0), _randn(shape, dtype, 1), _randn(shape, dtype, 2)
    if kind == "swiglu":
        inputs, fn = [a, b], reference.swiglu
    else:
        inputs = [a]
        fn = lambda x_: reference.gelu(x_, "tanh" if kind == "gelu_tanh" else "none")   # noqa: E731
    y = NORMS.act_fwd(kind, *inputs, out=nan_like(shape, dtype))
    ref, ref_grads = _input_grad(fn, inputs, dy)
    assert_close(f"{kind} y", y, ref, RTOL[dtype])
    grads = NORMS.act_bwd(kind, dy, *inputs)
    for i, ref_grad in enumerate(ref_grads):
        assert_close(f"{kind} d input {i}", grads[i], ref_grad, RTOL[dtype])
