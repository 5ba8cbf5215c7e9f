"""The bias offset width of the prefix-attention kernels: int32 when a batch row of the bias fits in
2**31 elements (what the launcher picks for any realistic bias), int64 beyond. Both widths must address
the same elements, so the int64 kernels (forced here by pretending the tiles reach past 2**31) give
bit-identical outputs and gradients to the int32 ones, and both match the fp32 reference.
"""

from __future__ import annotations

import pytest
import torch

from fastprompt.kernels import prefix_attention as PA
from tests.helpers import RTOL, assert_close
from tests.ops.test_prefix_attention import NAMES, _bias, _make_inputs, _run


def _meta_bias(shape, strides):
    return torch.empty_strided(shape, strides, device="meta")


def test_offset_width_follows_the_furthest_offset():
    """int64 exactly when (Hq-1)*sbh + (T-1+256)*sbt + (L-1+256)*sbn reaches 2**31 (batch stride excluded:
    it goes into the scalar base pointer)."""
    q = torch.empty(1, device="meta")
    B, Hq, T, L = 5, 32, 1000, 4000
    contiguous = _meta_bias((B, Hq, T, L), (Hq * T * L, T * L, L, 1))
    assert PA._prepare_bias(contiguous, q, (B, Hq, T, L))[2] is False
    # T5's layout: a permuted [B, T, L, H] tensor, the key axis strided by H
    Hq_big, T_big, L_big = 64, 2049, 16383
    furthest = (Hq_big - 1) + (T_big - 1 + 256) * L_big * Hq_big + (L_big - 1 + 256) * Hq_big
    assert furthest >= 2 ** 31
    t5 = _meta_bias((1, Hq_big, T_big, L_big), (0, 1, L_big * Hq_big, Hq_big))
    assert PA._prepare_bias(t5, q, (1, Hq_big, T_big, L_big))[2] is True
    broadcast_rows = _meta_bias((1, 1, 1, L_big), (L_big, L_big, L_big, 1))
    assert PA._prepare_bias(broadcast_rows, q, (1, Hq_big, T_big, L_big))[2] is False


@pytest.mark.parametrize("dims, transposed", [
    pytest.param((2, 4, 2, 21, 27, 6, 32), False, id="B2-Hq4-Hkv2-T21-S27-P6-D32"),
    pytest.param((3, 2, 1, 19, 19, 9, 48), True, id="B3-Hq2-Hkv1-T19-S19-P9-D48-t5layout"),
])
def test_int64_offsets_match_int32(monkeypatch, dims, transposed):
    B, Hq, Hkv, T, S, P, D = dims
    tensors, bank_rows, d_out = _make_inputs(*dims, torch.float32)
    bias = _bias((B, Hq, T, P + S), torch.float32, transposed=transposed)
    assert PA._prepare_bias(bias, tensors[0], (B, Hq, T, P + S))[2] is False
    narrow = _run(tensors, bank_rows, d_out, backend="triton", causal=True, mask=None, bias=bias)
    monkeypatch.setattr(PA, "_MAX_BLOCK", 2 ** 31)
    assert PA._prepare_bias(bias, tensors[0], (B, Hq, T, P + S))[2] is True
    wide = _run(tensors, bank_rows, d_out, backend="triton", causal=True, mask=None, bias=bias)
    ref_inputs = tuple(t.detach().requires_grad_() for t in tensors)
    want = _run(ref_inputs, bank_rows, d_out, backend="torch", causal=True, mask=None, bias=bias)
    for name, a, b, e in zip(NAMES, narrow, wide, want):
        assert torch.equal(a, b), f"{name}: int64 and int32 bias offsets differ"
        assert_close(name, b, e, RTOL[torch.float32])
