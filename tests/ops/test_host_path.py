"""What one eager CUDA call of each op runs on the host (issue 17: the training step is host-bound), traced on
fake CUDA tensors at Llama-3.2-1B training shapes (tests/ops/host_path.py): kernel launches (Triton and
aten), allocations, and no copies. A new launch, allocation or copy per call fails here."""

from __future__ import annotations

import pytest

from tests.ops import host_path

# (forward launches, forward allocations, backward launches, backward allocations): each allocation is an
# output, except lse (the forward's second output, kept for the backward) and prefix_attention's backward
# workspaces (delta, the per-row prefix partials) and its contiguous copies of q and d_out. Its backward
# is 4 Triton kernels + 5 aten launches (the two copies; sort, arange, searchsorted ordering the rows by bank
# entry). A 3-launch version (delta fused into the dQ kernel, no sort, strided q/d_out) was written on
# 2026-12-04 and reverted: its dK/dV kernel spilled on sm_80 under triton 3.9 and it never ran on a GPU.
BUDGET = {
    "prefix_attention": (1, 2, 9, 8),
    "rms_norm": (1, 1, 1, 1),
    "swiglu": (1, 1, 1, 2),
    "prompt_embed": (1, 1, 1, 0),   # one prompt, default layout: its gradient is one sum over the rows
}
ALLOWED_COPIES = {"prefix_attention": ["clone", "clone"]}   # q and d_out, made contiguous for the kernels
COPIES = {"clone", "copy_", "_to_copy", "contiguous"}


@pytest.fixture(scope="module")
def traces():
    return {name: host_path.trace(name)[:2] for name in BUDGET}


@pytest.mark.parametrize("name", sorted(BUDGET))
def test_launches_and_allocations_per_call(traces, name):
    fwd, bwd = traces[name]
    got = (fwd.launches, fwd.allocations, bwd.launches, bwd.allocations)
    assert got == BUDGET[name], (f"{name}: (fwd launches, fwd allocations, bwd launches, bwd allocations) = {got}, "
                                 f"want {BUDGET[name]}\nforward: {fwd}\nbackward: {bwd}")
    copies = [op for op in fwd.aten + bwd.aten if op in COPIES]
    assert copies == ALLOWED_COPIES.get(name, []), f"{name} copies its inputs: {copies}"


def test_prefix_attention_backward_kernels(traces):
    """delta, dK/dV, dQ, then the per-bank-row reduction over the rows ordered by bank entry."""
    _, bwd = traces["prefix_attention"]
    assert bwd.kernels == ["_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_reduce_prefix_kernel"]
    assert bwd.aten_launches == ["clone", "clone", "sort", "arange", "searchsorted"]


def test_norm_forward_adds_no_view_to_the_graph(traces):
    """rms_norm hands x to its autograd Function as it is (no reshape before, no view after: each would be a
    view node evaluated in the backward) and does not detach a frozen weight (an op per call)."""
    fwd, _ = traces["rms_norm"]
    assert not {"view", "reshape", "_unsafe_view", "detach"} & set(fwd.aten), fwd.aten
