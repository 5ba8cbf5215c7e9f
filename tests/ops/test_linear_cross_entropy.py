"""Fused LM-head cross-entropy: the Triton path (cuBLAS matmuls + the chunk kernel, through the interpreter)
and the chunked PyTorch path vs the unchunked reference.

Losses and d hidden are compared with the reference run in fp32 on the same inputs upcast; the frozen
weight and bias must get no gradient. Vocabulary sizes are not multiples of the tile (1000, 997).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from fastprompt import ops
from fastprompt.audit import saved_bytes
from fastprompt.kernels import linear_cross_entropy as K
from fastprompt.ops import reference
from fastprompt.ops.linear_cross_entropy import chunked_linear_cross_entropy_losses
from tests.helpers import DEVICE, RTOL, assert_close, nan_like

SHAPES = [  # (N, V, d)
    pytest.param(37, 1000, 40, id="N37-V1000-d40"),
    pytest.param(19, 997, 72, id="N19-V997-d72"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["triton", "torch"]


def _case(N, V, d, dtype, bias=False, ignore=(3,), ignore_index=-100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(V, d, generator=gen) * 0.3).to(DEVICE, dtype)
    b = torch.randn(V, generator=gen).to(DEVICE, dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=gen).to(DEVICE)
    labels[list(ignore)] = ignore_index
    labels[-1] = V - 1                                   # the last (partial) vocabulary tile
    grad = torch.randn(N, generator=gen).to(DEVICE)
    return hidden, weight, b, labels, grad


def _reference(hidden, weight, bias, labels, grad, reduction="none", ignore_index=-100):
    leaf = hidden.detach().float().requires_grad_(True)
    ref = reference.linear_cross_entropy(leaf, weight.float(), labels,
                                         bias=None if bias is None else bias.float(),
                                         ignore_index=ignore_index, reduction=reduction)
    ref.backward(grad)
    return ref.detach(), leaf.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, V, d", SHAPES)
def test_losses_and_hidden_grad(N, V, d, dtype, bias, backend):
    hidden, weight, b, labels, grad = _case(N, V, d, dtype, bias)
    leaf = hidden.clone().requires_grad_(True)
    losses = ops.linear_cross_entropy(leaf, weight, labels, bias=b, reduction="none", backend=backend)
    ref, ref_grad = _reference(hidden, weight, b, labels, grad)
    assert losses.shape == (N,) and losses.dtype == torch.float32
    assert losses[3] == 0
    assert_close("losses", losses, ref, RTOL[dtype])
    losses.backward(grad)
    assert leaf.grad.dtype == dtype
    assert_close("d hidden", leaf.grad, ref_grad, RTOL[dtype])
    assert weight.grad is None and (b is None or b.grad is None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions_and_batched_shape(reduction, backend):
    """[B, T, d] hidden with [B, T] labels; mean over the non-ignored tokens only; custom ignore_index."""
    B, T, V, d = 3, 7, 997, 40
    hidden, weight, _, labels, _ = _case(B * T, V, d, torch.float32, ignore=(0, 5, 9), ignore_index=-1)
    leaf = hidden.view(B, T, d).clone().requires_grad_(True)
    loss = ops.linear_cross_entropy(leaf, weight, labels.view(B, T), ignore_index=-1, reduction=reduction,
                                    backend=backend)
    ref, ref_grad = _reference(hidden, weight, None, labels, None, reduction, ignore_index=-1)
    expected = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-1, reduction=reduction)
    assert_close("reference vs F.cross_entropy", ref, expected, RTOL[torch.float32])
    assert loss.dim() == 0
    assert_close("loss", loss, ref, RTOL[torch.float32])
    loss.backward()
    assert_close("d hidden", leaf.grad.view(-1, d), ref_grad, RTOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_is_zero(backend):
    """Every label ignored: "mean" and "sum" are 0 (F.cross_entropy's mean is NaN), the gradient is 0."""
    N, V, d = 5, 997, 40
    hidden, weight, _, labels, _ = _case(N, V, d, torch.float32, ignore=range(N))
    labels[:] = -100
    assert torch.isnan(F.cross_entropy(hidden @ weight.T, labels))
    for reduction in ("mean", "sum"):
        leaf = hidden.clone().requires_grad_(True)
        loss = ops.linear_cross_entropy(leaf, weight, labels, reduction=reduction, backend=backend)
        assert float(loss.detach()) == 0.0
        loss.backward()
        assert torch.equal(leaf.grad, torch.zeros_like(hidden))
        assert float(reference.linear_cross_entropy(hidden, weight, labels, reduction=reduction)) == 0.0


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_paths(chunk, backend, reduction):
    """Several chunks (the last one partial), a bias, both backends, each reduction (a mean's divisor
    counts the whole batch's tokens): the Triton path's logits buffer is reused from chunk to chunk."""
    N, V, d = 19, 997, 40
    hidden, weight, b, labels, grad = _case(N, V, d, torch.float32, bias=True, ignore=(3, 4, 11))
    grad = grad if reduction == "none" else torch.tensor(0.7)
    leaf = hidden.clone().requires_grad_(True)
    losses = chunked_linear_cross_entropy_losses(leaf, weight, labels, b, chunk_size=chunk, backend=backend,
                                                 reduction=reduction)
    ref, ref_grad = _reference(hidden, weight, b, labels, grad, reduction)
    assert_close("losses", losses, ref, RTOL[torch.float32])
    losses.backward(grad)
    assert_close("d hidden", leaf.grad, ref_grad, RTOL[torch.float32])


def _dlogits_reference(logits, bias, labels, ignore_index=-100):
    x = logits.float() + (0 if bias is None else bias.float())
    valid = labels != ignore_index
    p = torch.softmax(x, -1) - F.one_hot(torch.where(valid, labels, 0).long(), x.shape[1]).float()
    loss = torch.where(valid, torch.logsumexp(x, -1) - x.gather(1, torch.where(valid, labels, 0).long()[:, None])[:, 0],
                       0.0)
    return loss, p * valid[:, None]


@pytest.mark.parametrize("with_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunk_kernel_small_tiles_nan_prefilled(dtype, bias, with_grad):
    """The kernel alone on 21 rows x 1000 logits in 4 x 64 tiles (partial row block and vocabulary tile),
    int32 labels with ignored rows and the last vocabulary entry: the loss into a NaN-filled buffer, every
    logit overwritten with d loss / d logits in place (or left alone without a gradient)."""
    N, V = 21, 1000
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(N, V, generator=gen) * 3).to(DEVICE, dtype)
    b = torch.randn(V, generator=gen).to(DEVICE, dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=gen).to(DEVICE, torch.int32)
    labels[[0, 7, 20]] = -100
    labels[5] = V - 1
    want_loss, want_dlogits = _dlogits_reference(logits, b, labels)
    original = logits.clone()
    loss = K.lce_chunk(logits, labels, nan_like((N,), torch.float32), b, -100, with_grad, blocks=(4, 64))
    assert_close("loss", loss, want_loss, RTOL[dtype])
    assert loss[0] == 0 and loss[20] == 0
    if with_grad:
        assert_close("d logits", logits, want_dlogits.to(dtype), RTOL[dtype])
        assert torch.equal(logits[7], torch.zeros_like(logits[7]))
    else:
        assert torch.equal(logits, original)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunk_kernel_default_blocks(dtype):
    """The launcher's own block sizes; 3 rows, V not a power of two; d logits sum to 0 over each row."""
    N, V = 3, 997
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(N, V, generator=gen).to(DEVICE, dtype)
    labels = torch.tensor([4, 996, 0], device=DEVICE)
    want_loss, want_dlogits = _dlogits_reference(logits, None, labels)
    loss = K.lce_chunk(logits, labels, nan_like((N,), torch.float32))
    assert_close("loss", loss, want_loss, RTOL[dtype])
    assert_close("d logits", logits, want_dlogits.to(dtype), RTOL[dtype])


def test_chunk_rows_rule():
    """Tokens per chunk from the memory budget: Llama-3.2-1B's head in bf16 on CUDA takes 1024-token
    chunks (256 MiB of logits), never more tokens than there are, at least one."""
    from fastprompt.ops.linear_cross_entropy import CHUNK_BYTES, chunk_rows
    assert chunk_rows(4096, 128256, 2, "cuda") == 1024
    assert chunk_rows(4096, 128256, 2, "cuda") * 128256 * 2 <= CHUNK_BYTES["cuda"]
    assert chunk_rows(100, 128256, 2, "cuda") == 100
    assert chunk_rows(64, 1000, 4, "cpu") == 64
    assert chunk_rows(10**6, 1000, 4, "cpu") * 1000 * 4 <= CHUNK_BYTES["cpu"]
    assert chunk_rows(5, 10**9, 4, "cpu") == 1


def test_trainable_weight_falls_back_to_reference():
    N, V, d = 7, 997, 40
    hidden, weight, _, labels, _ = _case(N, V, d, torch.float32)
    w = weight.clone().requires_grad_(True)
    w_ref = weight.clone().requires_grad_(True)
    ops.linear_cross_entropy(hidden, w, labels, backend="triton").backward()
    reference.linear_cross_entropy(hidden, w_ref, labels).backward()
    assert_close("d weight", w.grad, w_ref.grad, RTOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_no_logits(backend):
    """The fused op keeps at most one [N, d] tensor (and scalars) for its backward, beyond the inputs; the
    reference keeps [N, V] fp32 logits/probabilities."""
    N, V, d = 16, 997, 40
    hidden, weight, _, labels, _ = _case(N, V, d, torch.float32)
    leaf = hidden.clone().requires_grad_(True)
    fused = saved_bytes(lambda: ops.linear_cross_entropy(leaf, weight, labels, backend=backend).backward(),
                        exclude=[weight, labels, leaf])
    unfused = saved_bytes(lambda: reference.linear_cross_entropy(leaf, weight, labels).backward(),
                          exclude=[weight, labels, leaf])
    assert fused.activation_bytes <= N * d * 4 + 64 < N * V * 4 <= unfused.activation_bytes, (fused, unfused)


def test_errors():
    hidden, weight, _, labels, _ = _case(5, 97, 40, torch.float32, ignore=())
    with pytest.raises(ValueError, match="labels"):
        ops.linear_cross_entropy(hidden, weight, torch.full_like(labels, 97))
    with pytest.raises(ValueError, match="hidden"):
        ops.linear_cross_entropy(hidden.half(), weight, labels)
    with pytest.raises(ValueError, match="reduction"):
        ops.linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="labels"):
        ops.linear_cross_entropy(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="bias"):
        ops.linear_cross_entropy(hidden, weight, labels, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        ops.linear_cross_entropy(hidden, weight, torch.full_like(labels, -5))
    with pytest.raises(ValueError, match="labels"):
        ops.linear_cross_entropy(hidden, weight, labels[:4])
    with pytest.raises(ValueError, match="weight"):
        ops.linear_cross_entropy(hidden, weight[0], labels)


def test_label_range_around_ignore_index():
    """An ignore_index outside [0, V) on either side is accepted where it occurs; any other label outside
    [0, V) is refused, beside it or alone."""
    hidden, weight, _, labels, _ = _case(6, 97, 40, torch.float32, ignore=())
    for ignore_index in (-100, 97, 200):
        marked = labels.clone()
        marked[[1, 4]] = ignore_index
        loss = ops.linear_cross_entropy(hidden, weight, marked, ignore_index=ignore_index, reduction="none")
        assert torch.equal(loss[[1, 4]], torch.zeros(2)) and (loss[[0, 2, 3, 5]] > 0).all()
        for bad in (-5, 97, 300):
            if bad == ignore_index:
                continue
            wrong = marked.clone()
            wrong[0] = bad
            with pytest.raises(ValueError, match="labels must lie in"):
                ops.linear_cross_entropy(hidden, weight, wrong, ignore_index=ignore_index)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_equals_eager(backend):
    """torch.compile(fullgraph=True) of a function calling the op (the custom op's fake kernel and
    registered autograd; aot_eager: no Inductor C++ build on the CPU): each reduction, with a bias, the
    same loss and d hidden as eager. backend="triton": the chunk kernel through the interpreter."""
    torch._dynamo.reset()
    B, T, V, d = 2, 9, 997, 40
    hidden, weight, b, labels, _ = _case(B * T, V, d, torch.float32, bias=True, ignore=(1, 4))
    for reduction in ("mean", "sum", "none"):
        def fn(h, reduction=reduction):
            return ops.linear_cross_entropy(h.tanh(), weight, labels.view(B, T), bias=b, reduction=reduction,
                                            backend=backend) * 1.5
        results = []
        for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
            leaf = hidden.view(B, T, d).clone().requires_grad_(True)
            out = f(leaf)
            out.backward(torch.linspace(0.5, 1.5, out.numel()).view(out.shape).to(DEVICE))
            results.append((out.detach(), leaf.grad))
        (want, want_grad), (got, got_grad) = results
        assert_close(f"{reduction} loss", got, want, RTOL[torch.float32])
        assert_close(f"{reduction} d hidden", got_grad, want_grad, RTOL[torch.float32])


@pytest.mark.parametrize("triton", [False, True], ids=["torch", "triton"])
def test_custom_op_registration_passes_opcheck(triton):
    """Schema, fake kernel and autograd registration of fastprompt::linear_cross_entropy."""
    op = importlib.import_module("fastprompt.ops.linear_cross_entropy")._lce.op
    hidden, weight, b, labels, _ = _case(6, 97, 24, torch.float32, bias=True, ignore=(2,))
    leaf = hidden.clone().requires_grad_(True)
    for reduction in (0, 1, 2):
        torch.library.opcheck(op, (leaf, weight, b, labels, -100, reduction, 4, True, triton),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        torch.library.opcheck(op, (hidden, weight, None, labels, -100, reduction, 0, False, triton),
                              test_utils=("test_schema", "test_faketensor"))
