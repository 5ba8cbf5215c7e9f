"""Fused LM-head cross-entropy: Triton kernels and the chunked PyTorch path vs the unchunked reference.

Losses and d hidden are compared with the reference run in fp32 on the same inputs upcast; the frozen
weight and bias must get no gradient. Vocabulary sizes are not multiples of the tile (1000, 997).
"""

from __future__ import annotations

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
    ref.backward(grad if reduction == "none" else None)
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


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_torch_path(chunk):
    N, V, d = 19, 997, 40
    hidden, weight, b, labels, grad = _case(N, V, d, torch.float32, bias=True)
    leaf = hidden.clone().requires_grad_(True)
    losses = chunked_linear_cross_entropy_losses(leaf, weight, labels, b, chunk_size=chunk)
    ref, ref_grad = _reference(hidden, weight, b, labels, grad)
    assert_close("losses", losses, ref, RTOL[torch.float32])
    losses.backward(grad)
    assert_close("d hidden", leaf.grad, ref_grad, RTOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_launchers_small_tiles_nan_prefilled(dtype):
    """Several vocabulary and d tiles (16 x 64 x 16) and NaN-filled outputs: every element written."""
    N, V, d = 21, 1000, 40
    hidden, weight, b, labels, grad = _case(N, V, d, dtype, bias=True)
    loss, lse = K.lce_fwd(hidden, weight, labels, b, loss=nan_like((N,), torch.float32),
                          lse=nan_like((N,), torch.float32), blocks=(16, 64, 16))
    ref, ref_grad = _reference(hidden, weight, b, labels, grad)
    assert_close("loss", loss, ref, RTOL[dtype])
    ref_lse = torch.logsumexp(hidden.float() @ weight.float().T + b.float(), -1)
    assert_close("lse", lse, ref_lse, RTOL[dtype])
    dh = K.lce_bwd(hidden, weight, labels, lse, grad, b, out=nan_like((N, d), dtype), blocks=(16, 64, 16))
    assert_close("d hidden", dh, ref_grad, RTOL[dtype])


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
