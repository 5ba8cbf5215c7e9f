"""pytest-benchmark over fastprompt's three kernel ops, forward + backward at small shapes:

    pytest bench/ --benchmark-only                 # add --benchmark-json=out.json to keep the numbers

Per op and backend ("torch": the PyTorch reference path, everywhere; "triton": the kernels, on CUDA only,
since Triton's CPU interpreter is a correctness tool, not something to time). Each case first checks its
output and gradients against the fp32 reference (a wrong kernel is not timed), then hands one
forward+backward to the `benchmark` fixture. The repository's default `python -m pytest` does not
collect this folder (pytest.ini: testpaths = tests). The full-size scripts are bench/bench_*.py.
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import RTOL, check_or_refuse, synchronize
from fastprompt import ops
from fastprompt.ops import reference

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        DEVICE.type != "cuda", reason="Triton kernels are timed natively on CUDA only (no GPU here)")),
]


def _rand(gen: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, DTYPE)


def _check_and_time(benchmark, name: str, fn, inputs: list[torch.Tensor], ref_fn) -> None:
    """Check fn(*inputs) and its input gradients against ref_fn on fp32 copies, then benchmark a
    forward+backward of fn (the gradient of the output's sum)."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.float().sum().backward()
    ref_leaves = [t.detach().float().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    ref_out = ref_fn(*ref_leaves)
    ref_out.sum().backward()
    check_or_refuse(name, out, ref_out, RTOL[DTYPE])
    for i, (leaf, ref_leaf) in enumerate(zip(leaves, ref_leaves)):
        if leaf.grad is not None:
            check_or_refuse(f"{name} grad {i}", leaf.grad, ref_leaf.grad, RTOL[DTYPE])

    def step():
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves).float().sum().backward()
        synchronize(DEVICE)

    benchmark(step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_attention(benchmark, backend):
    """B4 Hq8 Hkv2 T127 P20 D64, 3 tasks, causal."""
    gen = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, P, D, n_tasks = 4, 8, 2, 127, 20, 64, 3
    inputs = [_rand(gen, B, Hq, T, D), _rand(gen, B, Hkv, T, D), _rand(gen, B, Hkv, T, D),
              _rand(gen, n_tasks, Hkv, P, D), _rand(gen, n_tasks, Hkv, P, D),
              torch.tensor([2, 0, 1, 2], device=DEVICE)]
    _check_and_time(benchmark, f"prefix_attention/{backend}",
                    lambda *x: ops.prefix_attention(*x, causal=True, backend=backend), inputs,
                    lambda *x: reference.prefix_attention(*x, causal=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_embed(benchmark, backend):
    """B8 T125 P20 d256, vocab 1001, 3 tasks; gradients reach the prompts."""
    gen = torch.Generator().manual_seed(1)
    B, T, P, d, V, n_tasks = 8, 125, 20, 256, 1001, 3
    ids = torch.randint(0, V, (B, T), generator=gen).to(DEVICE)
    weight = _rand(gen, V, d, scale=0.02).requires_grad_(False)
    prompts = _rand(gen, n_tasks, P, d)
    task_ids = torch.randint(0, n_tasks, (B,), generator=gen).to(DEVICE)
    _check_and_time(benchmark, f"prompt_embed/{backend}",
                    lambda p: ops.prompt_embed(ids, weight, p, task_ids, backend=backend), [prompts],
                    lambda p: reference.prompt_embed(ids, weight.float(), p, task_ids))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy(benchmark, backend):
    """N509 tokens, vocab 2003, d128, every 7th label ignored; the gradient reaches the hidden states."""
    gen = torch.Generator().manual_seed(2)
    N, V, d = 509, 2003, 128
    hidden = _rand(gen, N, d)
    weight = _rand(gen, V, d, scale=d ** -0.5)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::7] = -100
    labels = labels.to(DEVICE)
    _check_and_time(benchmark, f"linear_cross_entropy/{backend}",
                    lambda h: ops.linear_cross_entropy(h, weight, labels, backend=backend), [hidden],
                    lambda h: reference.linear_cross_entropy(h, weight.float(), labels))
