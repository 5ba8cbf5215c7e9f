"""prefix_attention: the Triton kernels (interpreted on CPU) against the PyTorch reference.

Every output and every gradient (q, k, v, prefix_k, prefix_v) is compared, for fp32 against the fp32
reference and for bf16/fp16 against an fp32 reference computed from the same inputs upcast.
"""

from __future__ import annotations

import pytest
import torch

from fastprompt.ops import prefix_attention, reference
from tests.helpers import DEVICE, RTOL, assert_close, nan_like

NAMES = ("out", "dq", "dk", "dv", "d_prefix_k", "d_prefix_v")


def _shape_id(B, Hq, Hkv, T, S, P, D):
    return f"B{B}-Hq{Hq}-Hkv{Hkv}-T{T}-S{S}-P{P}-D{D}"


def _shape(*dims):
    return pytest.param(dims, id=_shape_id(*dims))


# (B, Hq, Hkv, T, S, P, D): odd sizes; P = 0 is plain attention; P > 64 spans several prefix tiles;
# D = 80 and 96 are padded to a power of two (128) inside the kernels.
SHAPES = [
    _shape(3, 4, 2, 37, 37, 7, 64),     # GQA
    _shape(2, 2, 2, 33, 33, 0, 32),     # no prefix
    _shape(2, 3, 1, 19, 40, 13, 80),    # MQA, S > T, D not a power of two
    _shape(1, 2, 2, 17, 17, 70, 32),    # prefix longer than a tile and than the sequence
    _shape(2, 2, 1, 23, 29, 5, 128),
    _shape(1, 2, 1, 67, 71, 3, 32),     # several query and key tiles even with the interpreter's 64x64
    _shape(2, 3, 1, 11, 15, 6, 96),     # D = 96
    _shape(2, 2, 1, 7, 9, 257, 32),     # a prefix of 257 (> 100, five 64-key tiles) before a short row
]


def _make_inputs(B, Hq, Hkv, T, S, P, D, dtype, *, n_tasks=3, seed=0, requires_grad=True):
    """((q, k, v, prefix_k, prefix_v), bank_rows, d_out): random, leaf tensors requiring grad unless told."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)

    q, k, v = rand(B, Hq, T, D), rand(B, Hkv, S, D), rand(B, Hkv, S, D)
    prefix_k, prefix_v = rand(n_tasks, Hkv, P, D), rand(n_tasks, Hkv, P, D)
    bank_rows = torch.randint(0, n_tasks, (B,), generator=gen).to(DEVICE)
    bank_rows[0] = bank_rows[-1]  # at least one task shared by two rows (when B > 1)
    d_out = torch.randn(B, Hq, T, D, generator=gen).to(device=DEVICE, dtype=dtype)
    return (q, k, v, prefix_k, prefix_v), bank_rows, d_out


def _padding_mask(B, S, kind, *, seed=1):
    """Per-row valid lengths (row 0 full); 'right' keeps the first len keys, 'left' the last len."""
    if kind is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S + 1, (B,), generator=gen)
    lengths[0] = S
    pos = torch.arange(S)[None, :]
    mask = pos < lengths[:, None] if kind == "right" else pos >= (S - lengths)[:, None]
    return mask.to(DEVICE)


def _bias(shape, dtype, *, seed=2, transposed=False):
    """A random bias of `shape` [B|1, Hq|1, T|1, P+S], values up to a few units (comparable to the scores).

    transposed: laid out as T5's compute_bias leaves it, a permuted [., T, L, H] view (last dim strided).
    """
    gen = torch.Generator().manual_seed(seed)
    if transposed:
        b, h, t, n = shape
        return (2 * torch.randn(b, t, n, h, generator=gen)).to(device=DEVICE, dtype=dtype).permute(0, 3, 1, 2)
    return (2 * torch.randn(*shape, generator=gen)).to(device=DEVICE, dtype=dtype)


def _run(tensors, bank_rows, d_out, *, backend, causal, mask, bias=None):
    out = prefix_attention(*tensors, bank_rows, causal=causal, key_padding_mask=mask, bias=bias, backend=backend)
    grads = torch.autograd.grad(out, tensors, d_out)
    return (out, *grads)


def _check_against_reference(dims, dtype, *, causal, mask_kind=None, mask=None, n_tasks=3, bias=None):
    tensors, bank_rows, d_out = _make_inputs(*dims, dtype, n_tasks=n_tasks)
    if mask is None:
        mask = _padding_mask(dims[0], dims[4], mask_kind)
    got = _run(tensors, bank_rows, d_out, backend="triton", causal=causal, mask=mask, bias=bias)
    ref_inputs = tuple(t.detach().float().requires_grad_() for t in tensors)
    ref_bias = None if bias is None else bias.float()
    want = _run(ref_inputs, bank_rows, d_out.float(), backend="torch", causal=causal, mask=mask, bias=ref_bias)
    for name, a, e in zip(NAMES, got, want):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype} != {dtype}"
        assert_close(name, a, e, RTOL[dtype])
    return got


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dims", SHAPES)
def test_matches_reference_fp32(dims, causal):
    _check_against_reference(dims, torch.float32, causal=causal, mask_kind="right")


@pytest.mark.parametrize("mask_kind", [None, "right"], ids=["nomask", "right"])
@pytest.mark.parametrize("dims", [_shape(2, 4, 2, 29, 11, 5, 32), _shape(3, 2, 1, 21, 3, 0, 64)])
def test_non_causal_with_fewer_keys_than_queries(dims, mask_kind):
    """Cross-attention: a decoder's queries over a shorter encoder source (S < T), with and without a prefix."""
    _check_against_reference(dims, torch.float32, causal=False, mask_kind=mask_kind)


def test_causal_needs_as_many_keys_as_queries():
    (q, k, v, pk, pv), bank_rows, _ = _make_inputs(2, 2, 2, 9, 5, 3, 32, torch.float32)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="S=5"):
            prefix_attention(q, k, v, pk, pv, bank_rows, causal=True, backend=backend)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dims", [SHAPES[0], SHAPES[2]])
def test_matches_reference_half(dims, dtype, causal):
    _check_against_reference(dims, dtype, causal=causal, mask_kind="left")


@pytest.mark.parametrize("mask_kind", [None, "left", "right"], ids=["nomask", "left", "right"])
def test_padding_sides(mask_kind):
    _check_against_reference((3, 2, 1, 21, 21, 3, 32), torch.float32, causal=True, mask_kind=mask_kind)


@pytest.mark.parametrize("P", [0, 5], ids=["P0", "P5"])
def test_fully_padded_row(P):
    """A row with every own key masked sees only its prefix (P > 0) or nothing: zeros, never NaN."""
    dims = (3, 2, 2, 9, 9, P, 32)
    mask = torch.ones(3, 9, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    mask[2, :4] = False  # left padding: with P = 0 its first causal queries see nothing either
    got = _check_against_reference(dims, torch.float32, causal=True, mask=mask)
    assert all(torch.isfinite(g).all() for g in got)
    if P == 0:
        assert torch.equal(got[0][1], torch.zeros_like(got[0][1]))
        assert torch.equal(got[0][2, :, :4], torch.zeros_like(got[0][2, :, :4]))


def test_single_task_and_unused_tasks():
    """All rows on one task of four: the others get zero gradients, the used one the sum over rows."""
    tensors, _, d_out = _make_inputs(3, 2, 1, 11, 11, 6, 32, torch.float32, n_tasks=4)
    bank_rows = torch.full((3,), 2, dtype=torch.int64, device=DEVICE)
    got = _run(tensors, bank_rows, d_out, backend="triton", causal=True, mask=None)
    want = _run(tuple(t.detach().requires_grad_() for t in tensors), bank_rows, d_out, backend="torch",
                causal=True, mask=None)
    for name, a, e in zip(NAMES, got, want):
        assert_close(name, a, e, RTOL[torch.float32])
    assert torch.count_nonzero(got[4][[0, 1, 3]]) == 0


def test_non_contiguous_inputs():
    """q, k, v as transposes of [B, T, H, D] (what HF attention layers hold)."""
    B, Hq, Hkv, T, S, P, D = 2, 4, 2, 13, 13, 3, 32
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, T, Hq, D, generator=gen).to(DEVICE).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, Hkv, D, generator=gen).to(DEVICE).transpose(1, 2).requires_grad_()
    v = torch.randn(B, S, Hkv, D, generator=gen).to(DEVICE).transpose(1, 2).requires_grad_()
    pk = torch.randn(2, Hkv, P, D, generator=gen).to(DEVICE).requires_grad_()
    pv = torch.randn(2, Hkv, P, D, generator=gen).to(DEVICE).requires_grad_()
    bank_rows = torch.tensor([1, 0], device=DEVICE)
    d_out = torch.randn(B, Hq, T, D, generator=gen).to(DEVICE)
    got = _run((q, k, v, pk, pv), bank_rows, d_out, backend="triton", causal=True, mask=None)
    want = _run((q, k, v, pk, pv), bank_rows, d_out, backend="torch", causal=True, mask=None)
    for name, a, e in zip(NAMES, got, want):
        assert_close(name, a, e, RTOL[torch.float32])


def test_backward_is_deterministic():
    tensors, _, d_out = _make_inputs(4, 2, 1, 15, 15, 9, 32, torch.float32, n_tasks=2)
    bank_rows = torch.tensor([1, 0, 1, 1], device=DEVICE)
    first = _run(tensors, bank_rows, d_out, backend="triton", causal=True, mask=None)
    second = _run(tensors, bank_rows, d_out, backend="triton", causal=True, mask=None)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


# ----------------------------------------------------------------------------------------------------
# Launchers directly: NaN-filled outputs, so an element never written fails
# ----------------------------------------------------------------------------------------------------
def _launcher_check(dims, dtype, *, causal, mask, num_splits=None, backward=True, bias=None):
    from fastprompt.kernels.prefix_attention import prefix_attention_bwd, prefix_attention_fwd

    B, Hq, Hkv, T, S, P, D = dims
    tensors, bank_rows, d_out = _make_inputs(*dims, dtype, requires_grad=False)
    out = nan_like((B, Hq, T, D), dtype)
    got_out, lse = prefix_attention_fwd(*tensors, bank_rows, causal=causal, key_padding_mask=mask, bias=bias,
                                        out=out, num_splits=num_splits)
    assert got_out.data_ptr() == out.data_ptr()
    ref_inputs = tuple(t.float().requires_grad_() for t in tensors)
    want = _run(ref_inputs, bank_rows, d_out.float(), backend="torch", causal=causal, mask=mask,
                bias=None if bias is None else bias.float())
    assert_close("out", got_out, want[0], RTOL[dtype])
    if not backward:
        return
    grads = tuple(nan_like(t.shape, dtype) for t in tensors)
    got = prefix_attention_bwd(d_out, *tensors, bank_rows, got_out, lse, causal=causal,
                               key_padding_mask=mask, bias=bias, grads=grads)
    for name, a, buf, e in zip(NAMES[1:], got, grads, want[1:]):
        assert a.data_ptr() == buf.data_ptr()
        assert_close(name, a, e, RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_launchers_write_every_element(causal, dtype):
    dims = (2, 4, 2, 21, 27, 11, 80)
    _launcher_check(dims, dtype, causal=causal, mask=_padding_mask(2, 27, "left"))


# ----------------------------------------------------------------------------------------------------
# Decode: T <= 16 takes the split-KV forward (several programs per row, merged by log-sum-exp)
# ----------------------------------------------------------------------------------------------------
DECODE_SHAPES = [
    _shape(3, 4, 2, 1, 61, 9, 64),
    _shape(3, 4, 1, 3, 61, 0, 32),
    _shape(2, 2, 2, 3, 61, 40, 80),
    _shape(2, 4, 2, 2, 45, 6, 96),
]


def _cache_mask(B, S):
    """Each row's cache holds a different number of valid keys (right padded)."""
    lengths = torch.tensor([S, 40, 17, 5][:B])
    return (torch.arange(S)[None, :] < lengths[:, None]).to(DEVICE)


@pytest.mark.parametrize("num_splits", [None, 1], ids=["split", "nosplit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("dims", DECODE_SHAPES)
def test_decode_forward(dims, dtype, num_splits):
    _launcher_check(dims, dtype, causal=True, mask=_cache_mask(dims[0], dims[4]), num_splits=num_splits,
                    backward=False)


def test_decode_splits_the_key_range():
    """Under the interpreter the heuristic uses one split per key tile: S = 61 gives several."""
    from fastprompt.kernels import prefix_attention as kernel

    calls = []
    original = kernel._combine_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return original[grid]

    kernel._combine_kernel = Spy()
    try:
        _launcher_check(DECODE_SHAPES[0].values[0], torch.float32, causal=True, mask=None, backward=False)
    finally:
        kernel._combine_kernel = original
    assert calls, "decode forward did not take the split-KV path"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("dims", [DECODE_SHAPES[0], DECODE_SHAPES[1], DECODE_SHAPES[3]])
def test_decode_through_public_op_with_gradients(dims, dtype):
    _check_against_reference(dims, dtype, causal=True, mask=_cache_mask(dims[0], dims[4]))


# ----------------------------------------------------------------------------------------------------
# Additive bias (T5's relative position bias over [prefix ; own keys])
# ----------------------------------------------------------------------------------------------------
# (dims, causal, mask kind, bias shape as (B?, Hq?, T?) flags: True = full size, False = broadcast 1)
BIAS_CASES = [
    pytest.param((3, 4, 2, 21, 21, 5, 32), True, "left", (False, True, True), True, id="causal-left-1HqT-t5layout"),
    pytest.param((3, 4, 2, 21, 21, 5, 32), False, "right", (True, True, True), False, id="full-right-BHqT"),
    pytest.param((2, 3, 1, 19, 26, 0, 40), True, "right", (False, False, True), False, id="P0-causal-S>T-11T"),
    pytest.param((2, 2, 2, 13, 9, 70, 32), False, None, (True, False, False), False, id="cross-P70-B11"),
]


def _bias_shape(dims, full):
    B, Hq, _, T, S, P, _ = dims
    return tuple(n if f else 1 for n, f in zip((B, Hq, T), full)) + (P + S,)


@pytest.mark.parametrize("dims, causal, mask_kind, full, transposed", BIAS_CASES)
def test_bias_matches_reference_fp32(dims, causal, mask_kind, full, transposed):
    bias = _bias(_bias_shape(dims, full), torch.float32, transposed=transposed)
    _check_against_reference(dims, torch.float32, causal=causal, mask_kind=mask_kind, bias=bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_bias_matches_reference_half(dtype):
    dims = (2, 4, 2, 17, 17, 7, 32)
    _check_against_reference(dims, dtype, causal=True, mask_kind="right",
                             bias=_bias(_bias_shape(dims, (False, True, True)), dtype))


def test_bias_launchers_write_every_element():
    dims = (2, 4, 2, 21, 27, 11, 48)
    _launcher_check(dims, torch.float32, causal=True, mask=_padding_mask(2, 27, "left"),
                    bias=_bias(_bias_shape(dims, (True, True, True)), torch.bfloat16))


@pytest.mark.parametrize("num_splits", [None, 1], ids=["split", "nosplit"])
def test_bias_decode_forward(num_splits):
    dims = DECODE_SHAPES[0].values[0]
    _launcher_check(dims, torch.float32, causal=True, mask=_cache_mask(dims[0], dims[4]), num_splits=num_splits,
                    backward=False, bias=_bias(_bias_shape(dims, (True, True, True)), torch.float32))


def test_bias_decode_through_public_op_with_gradients():
    dims = DECODE_SHAPES[1].values[0]
    _check_against_reference(dims, torch.float32, causal=True, mask=_cache_mask(dims[0], dims[4]),
                             bias=_bias(_bias_shape(dims, (False, True, False)), torch.float32))


@pytest.mark.parametrize("P", [0, 5], ids=["P0", "P5"])
def test_bias_does_not_unmask_keys(P):
    """Masks win over the bias: the bias of a masked key changes nothing; a row whose own keys are all
    masked attends to its prefix (P > 0) or returns zeros (P = 0), never NaN."""
    dims = (3, 2, 2, 9, 9, P, 32)
    mask = torch.ones(3, 9, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    mask[2, :4] = False
    bias = _bias((3, 2, 9, P + 9), torch.float32)
    got = _check_against_reference(dims, torch.float32, causal=True, mask=mask, bias=bias)
    assert all(torch.isfinite(g).all() for g in got)
    causal_visible = torch.ones(9, 9, dtype=torch.bool, device=DEVICE).tril()
    own_visible = causal_visible[None, None] & mask[:, None, None, :]
    hidden = torch.cat([own_visible.new_zeros(3, 1, 9, P), ~own_visible], dim=-1).expand_as(bias)
    other_bias = torch.where(hidden, bias + 50.0, bias)
    tensors, bank_rows, d_out = _make_inputs(*dims, torch.float32)
    again = _run(tensors, bank_rows, d_out, backend="triton", causal=True, mask=mask, bias=other_bias)
    for name, a, e in zip(NAMES, again, got):
        assert_close(f"{name} with other bias on masked keys", a, e, RTOL[torch.float32])
    if P == 0:
        assert torch.equal(got[0][1], torch.zeros_like(got[0][1]))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_reference_bias_equals_hand_softmax(causal):
    """The reference with a bias against softmax(q·kᵀ·scale + bias, masked) written out per head."""
    B, Hq, Hkv, T, S, P, D = 2, 4, 2, 5, 8, 3, 16
    (q, k, v, pk, pv), bank_rows, _ = _make_inputs(B, Hq, Hkv, T, S, P, D, torch.float32, requires_grad=False)
    mask = _padding_mask(B, S, "left")
    bias = _bias((1, Hq, T, P + S), torch.float32)
    scale = 0.7
    want = torch.empty(B, Hq, T, D, device=DEVICE)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hkv)
            keys = torch.cat([pk[bank_rows[b], hk], k[b, hk]])
            values = torch.cat([pv[bank_rows[b], hk], v[b, hk]])
            scores = q[b, h] @ keys.T * scale + bias[0, h]
            for i in range(T):
                for j in range(S):
                    if not mask[b, j] or (causal and j > i + S - T):
                        scores[i, P + j] = float("-inf")
            want[b, h] = scores.softmax(-1) @ values
    got = reference.prefix_attention(q, k, v, pk, pv, bank_rows, causal=causal, key_padding_mask=mask,
                                     scale=scale, bias=bias)
    assert_close("reference with bias vs hand softmax", got, want, RTOL[torch.float32])


def test_bias_guards_name_the_argument():
    (q, k, v, pk, pv), bank_rows, _ = _make_inputs(2, 4, 2, 5, 6, 3, 16, torch.float32)
    for backend in ("torch", "triton"):
        for bad in (torch.randn(2, 4, 5, 6), torch.randn(2, 2, 5, 9), torch.randn(3, 4, 5, 9), torch.randn(4, 5, 9)):
            with pytest.raises(ValueError, match="bias"):
                prefix_attention(q, k, v, pk, pv, bank_rows, bias=bad.to(DEVICE), backend=backend)
        with pytest.raises(ValueError, match="bias"):
            prefix_attention(q, k, v, pk, pv, bank_rows, bias=torch.ones(2, 4, 5, 9, dtype=torch.int64,
                                                                         device=DEVICE), backend=backend)
        trainable = torch.randn(1, 4, 5, 9, device=DEVICE, requires_grad=True)
        with pytest.raises(ValueError, match="bias must not require grad"):
            prefix_attention(q, k, v, pk, pv, bank_rows, bias=trainable, backend=backend)
        with torch.no_grad():  # no gradient is asked for: a bias that requires grad is only read
            got = prefix_attention(q, k, v, pk, pv, bank_rows, bias=trainable, backend=backend)
            want = reference.prefix_attention(q, k, v, pk, pv, bank_rows, bias=trainable.detach())
        assert_close(f"{backend} under no_grad", got, want, RTOL[torch.float32])


# ----------------------------------------------------------------------------------------------------
# Guards and the reference itself
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_public_op_names_the_bad_argument(backend):
    """The op checks its arguments once, before either backend (the launchers trust it), naming each."""
    (q, k, v, pk, pv), rows, _ = _make_inputs(2, 2, 1, 5, 5, 2, 32, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="prefix_k"):
        prefix_attention(q, k, v, pk.half(), pv, rows, backend=backend)
    with pytest.raises(ValueError, match=r"bank_rows must have shape \[B=2\]"):
        prefix_attention(q, k, v, pk, pv, rows[:1], backend=backend)
    with pytest.raises(ValueError, match=r"bank_rows must lie in \[0, 3\)"):
        prefix_attention(q, k, v, pk, pv, torch.tensor([0, 3], device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="bank_rows must be an int64"):
        prefix_attention(q, k, v, pk, pv, rows.float(), backend=backend)
    with pytest.raises(ValueError, match="key_padding_mask"):
        prefix_attention(q, k, v, pk, pv, rows, key_padding_mask=torch.ones(2, 4, dtype=torch.bool, device=DEVICE),
                         backend=backend)
    with pytest.raises(ValueError, match="q must be a torch.Tensor"):
        prefix_attention(q.tolist(), k, v, pk, pv, rows, backend=backend)
    # a refused shape is refused again: errors are never cached
    with pytest.raises(ValueError, match="prefix_k"):
        prefix_attention(q, k, v, pk.half(), pv, rows, backend=backend)


@pytest.mark.parametrize("kv_heads", [0, 3], ids=["Hkv0", "Hkv3"])
def test_key_heads_must_divide_query_heads(kv_heads):
    """k with no heads, or a head count that does not divide q's, is refused by name on both backends."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 5, 16, generator=gen).to(DEVICE)
    k, v = (torch.randn(2, kv_heads, 5, 16, generator=gen).to(DEVICE) for _ in range(2))
    pk, pv = (torch.randn(3, kv_heads, 2, 16, generator=gen).to(DEVICE) for _ in range(2))
    bank_rows = torch.tensor([0, 2], device=DEVICE)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=rf"k must have at least one head .*got Hkv={kv_heads}"):
            prefix_attention(q, k, v, pk, pv, bank_rows, backend=backend)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_reference_equals_sdpa_on_concatenated_keys(causal):
    """An independent check of the reference: SDPA on [prefix ; own] keys with an explicit bool mask."""
    B, Hq, Hkv, T, S, P, D = 3, 4, 2, 7, 12, 5, 16
    (q, k, v, pk, pv), bank_rows, _ = _make_inputs(B, Hq, Hkv, T, S, P, D, torch.float32, requires_grad=False)
    mask = _padding_mask(B, S, "right")
    mask[:, -1] = True  # every causal query keeps at least its own... last key visible to the last query
    keys = torch.cat([pk[bank_rows], k], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    values = torch.cat([pv[bank_rows], v], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    allowed = torch.zeros(B, 1, T, P + S, dtype=torch.bool, device=DEVICE)
    for b in range(B):
        for i in range(T):
            allowed[b, 0, i, :P] = True
            for j in range(S):
                allowed[b, 0, i, P + j] = bool(mask[b, j]) and (not causal or j <= i + S - T)
    want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
    got = reference.prefix_attention(q, k, v, pk, pv, bank_rows, causal=causal, key_padding_mask=mask)
    assert_close("reference vs sdpa", got, want, RTOL[torch.float32])


# ----------------------------------------------------------------------------------------------------
# Native GPU only: realistic sizes (skipped on CPU, where the interpreter would take hours)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dims", [_shape(2, 8, 2, 1031, 1031, 100, 128), _shape(3, 6, 6, 777, 900, 20, 80),
                                  _shape(2, 4, 4, 513, 513, 0, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_large_shapes_gpu(dims, dtype):
    _check_against_reference(dims, dtype, causal=True, mask_kind="right")


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [_shape(64, 32, 8, 1, 4099, 100, 128), _shape(5, 8, 8, 7, 8191, 20, 64)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_large_decode_gpu(dims, with_bias):
    bias = _bias(_bias_shape(dims, (False, True, True)), torch.bfloat16) if with_bias else None
    _launcher_check(dims, torch.bfloat16, causal=True, mask=_cache_mask(min(dims[0], 4), dims[4]).repeat(
        (dims[0] + 3) // 4, 1)[:dims[0]], backward=False, bias=bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [_shape(2, 8, 2, 1031, 1031, 100, 128), _shape(3, 6, 6, 777, 900, 20, 80)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_large_shapes_with_bias_gpu(dims, dtype, causal):
    _check_against_reference(dims, dtype, causal=causal, mask_kind="left",
                             bias=_bias(_bias_shape(dims, (False, True, True)), dtype, transposed=True))
