"""The fused loss costs two vocabulary matmuls, forward and backward together: N x d x V for the logits and
N x V x d for d hidden (formed in the forward), none recomputed in the backward, on both backends (the
Triton path's matmuls are torch.mm on cuBLAS; on the CPU its kernel runs in Triton's interpreter, the
matmuls as on the GPU path). FlopCounterMode counts every matmul-like aten op (mm, addmm, bmm, ...), so
its total must equal exactly 2 * (2 N d V): nothing else large.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastprompt import ops
from fastprompt.ops import reference
from tests.helpers import DEVICE

LCE = importlib.import_module("fastprompt.ops.linear_cross_entropy")
N, V, d = 23, 997, 40
MATMUL = 2 * N * d * V     # FLOPs of one [N, d] x [d, V] product


def _inputs(dtype=torch.float32, bias=False):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, d, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    weight = (torch.randn(V, d, generator=gen) * 0.3).to(DEVICE, dtype)
    b = torch.randn(V, generator=gen).to(DEVICE, dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=gen).to(DEVICE)
    labels[[2, 9]] = -100
    return hidden, weight, b, labels


def _count(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_forward_and_backward_cost_two_matmuls(backend, bias, reduction):
    hidden, weight, b, labels = _inputs(bias=bias)

    def step():
        loss = ops.linear_cross_entropy(hidden, weight, labels, bias=b, reduction=reduction, backend=backend)
        loss.backward(torch.ones_like(loss))

    total, by_op = _count(step)
    assert total == 2 * MATMUL, by_op
    assert set(by_op) == {"aten.mm"}, by_op
    assert hidden.grad is not None and weight.grad is None


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_several_chunks_cost_the_same(backend):
    """Chunks of 5 tokens (5 chunks, the last partial): still two matmuls' worth in all."""
    hidden, weight, b, labels = _inputs(bias=True)
    total, by_op = _count(lambda: LCE.chunked_linear_cross_entropy_losses(
        hidden, weight, labels, b, chunk_size=5, backend=backend, reduction="mean").backward())
    assert total == 2 * MATMUL, by_op


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_without_a_gradient_one_matmul(backend):
    """No d hidden is formed under no_grad or for a hidden that does not require a gradient."""
    hidden, weight, _, labels = _inputs()
    with torch.no_grad():
        total, _ = _count(lambda: ops.linear_cross_entropy(hidden, weight, labels, backend=backend))
    assert total == MATMUL
    total, _ = _count(lambda: ops.linear_cross_entropy(hidden.detach(), weight, labels, backend=backend))
    assert total == MATMUL


def test_bf16_triton_path_costs_two_matmuls():
    hidden, weight, _, labels = _inputs(torch.bfloat16)
    total, _ = _count(lambda: ops.linear_cross_entropy(hidden, weight, labels, backend="triton").backward())
    assert total == 2 * MATMUL


def test_unfused_reference_costs_the_same_two():
    """What the fused op replaces (logits forward, d hidden backward; a frozen weight gets no product)."""
    hidden, weight, _, labels = _inputs()
    total, _ = _count(lambda: reference.linear_cross_entropy(hidden, weight, labels).backward())
    assert total == 2 * MATMUL
