"""Prefix attention in Triton: FlashAttention-style forward, split-KV decode forward, and backward.

Each batch row b attends first to a prefix, read in place from a bank (`prefix_k[bank_rows[b]]`,
nothing is concatenated or copied), then to its own keys. Layouts (the last dimension must be contiguous;
other strides are free):

    q, out:            [B, Hq, T, D]
    k, v:              [B, Hkv, S, D]          S >= T, causal masking aligned to the end
    prefix_k/prefix_v: [n_bank, Hkv, P, D]     P >= 0, always visible
    bank_rows:         [B] int64 (or int32)
    key_padding_mask:  [B, S] bool, True = attend
    bias:              [B or 1, Hq or 1, T or 1, P + S] any float dtype, added to the scaled scores; a
                       size-1 dimension is read with stride 0 (no broadcast copy); optional
    lse:               [B, Hq, T] fp32, log2-sum-exp2 of the scaled scores (-inf for a row seeing nothing)

The query tile packs the G = Hq / Hkv query heads that share a key/value head into its rows (row m is
head m // T, position m % T), so one program reads each key/value tile once for the whole group; this is
what makes decode (T = 1) fill a 16-row tile. Scores are computed in base 2 (scale * log2(e) folded in,
the bias multiplied by log2(e) as it is read); masks are applied after the bias, so they always win.
All accumulation is fp32; fp32 inputs use IEEE dots (no tf32), bf16/fp16 use tensor cores.

Decode: for T <= DECODE_MAX_T the forward splits the [prefix ; own] key range over several programs
(flash-decoding) and a combine kernel merges the partial outputs with their log-sum-exp.

Backward (deterministic, no float atomics): one kernel computes dK, dV per key tile (looping over all
queries of the group), another computes dQ per query tile. Each batch row writes its own fp32 partial
d prefix_k / d prefix_v ([B, Hkv, P, D] each), and a reduction kernel sums the rows of each bank row in a
fixed order (batch rows sorted by bank row, stably). Determinism costs 2 * B * Hkv * P * D * 4 bytes of partials.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from fastprompt.kernels.decode_shapes import DECODE_MAX_T

_LOG2E = 1.4426950408889634
_LOG2E_JIT = tl.constexpr(_LOG2E)  # the same, readable inside @triton.jit (the bias in base-2 scores)


# ----------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr):
    """tl.dot with fp32 accumulation. DOT_PREC: "ieee" (fp32 inputs), "tf32" (ignored for bf16/fp16), or
    "upcast": bf16 operands cast to fp32 first (exact: Triton's interpreter multiplies bf16 as raw ints)."""
    if DOT_PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _visible_keys(offs_n, n_ok, last_key, mask_base, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool: which keys offs_n each query of the tile sees (bounds, causal, padding)."""
    visible = n_ok[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= last_key[:, None])
    if HAS_MASK:
        pad = tl.load(mask_base + offs_n, mask=n_ok, other=0)
        visible = visible & (pad != 0)[None, :]
    return visible


@triton.jit
def _bias_index(x, BIAS_I64: tl.constexpr):
    """x (int32) as a bias offset: int64 only when the launcher found that the offsets within one batch
    row of the bias may pass 2**31. int32 offsets halve the registers of the [BLOCK_M, BLOCK_N] offset
    tile, which is what made the bias paths spill."""
    if BIAS_I64:
        return x.to(tl.int64)
    else:
        return x


@triton.jit
def _load_bias(base, offsets, ok):
    """The bias at base + offsets in fp32, in base-2 score units (0 where not ok)."""
    return tl.load(base + offsets, mask=ok, other=0.0).to(tl.float32) * _LOG2E_JIT


@triton.jit
def _packed_rows(pid_m, T, G, BLOCK_M: tl.constexpr):
    """Rows of a query tile over the packed (group head, position) axis, and the tile's position range."""
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    n_rows = G * T
    row_ok = offs_m < n_rows
    offs_m = tl.minimum(offs_m, n_rows - 1)
    g = offs_m // T
    t = offs_m % T
    last = tl.minimum(m0 + BLOCK_M, n_rows) - 1
    if m0 // T == last // T:  # the tile holds one head: a contiguous range of positions
        t_lo = m0 % T
        t_hi = last % T
    else:
        t_lo = m0 * 0
        t_hi = m0 * 0 + T - 1
    return g, t, row_ok, t_lo, t_hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, mask_base, bias_base, bias_rows,
               stride_bn, lo, hi, last_key, offs_d, d_ok, qk_scale,
               BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
               BIAS_I64: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over keys [lo, hi) of one segment (the prefix or the row's own keys).

    bias_base: the batch row's bias at this segment's key 0 (a scalar pointer); bias_rows: [BLOCK_M]
    offsets of each query row from it (int32, or int64 when BIAS_I64)."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_PREC) * qk_scale
        if HAS_BIAS:
            s += _load_bias(bias_base, bias_rows[:, None] + _bias_index(offs_n, BIAS_I64)[None, :] * stride_bn,
                            n_ok[None, :])
        visible = _visible_keys(offs_n, n_ok, last_key, mask_base, CAUSAL, HAS_MASK)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


# ----------------------------------------------------------------------------------------------------
# Forward (and split-KV decode forward)
# ----------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T", "S", "P", "split_len"])
def _fwd_kernel(Q, K, V, PK, PV, TASK, MASK, BIAS, O, LSE, O_PART, LSE_PART,
                sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
                spkt, spkh, spkp, spvt, spvh, spvp, sbb, sbh, sbt, sbn,
                T, S, P, G, Hkv, D, qk_scale, split_len, n_splits,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_I64: tl.constexpr,
                SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    Hq = Hkv * G
    g, t, row_ok, t_lo, t_hi = _packed_rows(pid_m, T, G, BLOCK_M)
    h = hkv * G + g
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D

    q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64)[:, None] * sqh + t.to(tl.int64)[:, None] * sqt \
        + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    task = tl.load(TASK + b).to(tl.int64)
    bias_b = BIAS + b.to(tl.int64) * sbb
    bias_rows = _bias_index(h, BIAS_I64) * sbh + _bias_index(t, BIAS_I64) * sbt

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a row that sees nothing stays NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    # This program's share of the virtual key axis [prefix (P) ; own (S)].
    lo = pid_s * split_len
    hi = tl.minimum(lo + split_len, P + S)

    # 1) the task's prefix: always visible
    pk_base = PK + task * spkt + hkv.to(tl.int64) * spkh
    pv_base = PV + task * spvt + hkv.to(tl.int64) * spvh
    last_key = t + (S - T)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, pk_base, pv_base, spkp, spvp, MASK, bias_b, bias_rows, sbn,
                               lo, tl.minimum(hi, P), last_key, offs_d, d_ok, qk_scale,
                               BLOCK_N, False, False, HAS_BIAS, BIAS_I64, DOT_PREC)

    # 2) the row's own keys: [o_lo, full) is visible to every row of the tile (no causal test), then
    #    [full, o_hi) with the causal test.
    own_end = S
    full = S
    if CAUSAL:
        own_end = tl.minimum(S, t_hi + (S - T) + 1)
        full = t_lo + (S - T) + 1
    o_lo = tl.maximum(lo - P, 0)
    o_hi = tl.minimum(hi - P, own_end)
    k_base = K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh
    mask_base = MASK + b.to(tl.int64) * S
    own_bias = bias_b + P.to(tl.int64) * sbn
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, mask_base, own_bias, bias_rows, sbn,
                               o_lo, tl.minimum(o_hi, full), last_key, offs_d, d_ok, qk_scale,
                               BLOCK_N, False, HAS_MASK, HAS_BIAS, BIAS_I64, DOT_PREC)
    if CAUSAL:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, mask_base, own_bias, bias_rows,
                                   sbn, tl.maximum(o_lo, full), o_hi, last_key, offs_d, d_ok, qk_scale,
                                   BLOCK_N, True, HAS_MASK, HAS_BIAS, BIAS_I64, DOT_PREC)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(l_safe), float("-inf"))
    row = (b.to(tl.int64) * Hq + h) * T + t  # contiguous [B, Hq, T] row index
    st_mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        part = row * n_splits + pid_s
        tl.store(O_PART + part[:, None] * D_PAD + offs_d[None, :], out, mask=st_mask)
        tl.store(LSE_PART + part, lse, mask=row_ok)
    else:
        tl.store(O + row[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty), mask=st_mask)
        tl.store(LSE + row, lse, mask=row_ok)


@triton.jit
def _combine_kernel(O_PART, LSE_PART, O, LSE, n_rows, n_splits, D,
                    BLOCK_R: tl.constexpr, SPLITS_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """Merge the split partials of BLOCK_R rows: weights 2^(lse_s - max), zeros for an empty row."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    offs_s = tl.arange(0, SPLITS_PAD)
    s_ok = offs_s < n_splits
    lse = tl.load(LSE_PART + rows64[:, None] * n_splits + offs_s[None, :],
                  mask=r_ok[:, None] & s_ok[None, :], other=float("-inf"))
    m = tl.max(lse, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_safe[:, None])
    total = tl.sum(w, 1)
    seen = total > 0.0
    inv = tl.where(seen, 1.0 / tl.where(seen, total, 1.0), 0.0)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_R, D_PAD], dtype=tl.float32)
    for s in range(0, n_splits):
        w_s = tl.sum(tl.where(offs_s[None, :] == s, w, 0.0), 1)
        o_s = tl.load(O_PART + (rows64[:, None] * n_splits + s) * D_PAD + offs_d[None, :],
                      mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        acc += w_s[:, None] * o_s
    out = acc * inv[:, None]
    tl.store(O + rows64[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])
    tl.store(LSE + rows64, tl.where(seen, m_safe + tl.math.log2(tl.where(seen, total, 1.0)), float("-inf")),
             mask=r_ok)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _delta_kernel(O, DO, DELTA, n_rows, D, BLOCK_R: tl.constexpr, D_PAD: tl.constexpr):
    """delta[r] = sum_d out[r, d] * d_out[r, d] in fp32 (both contiguous [rows, D])."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, D_PAD)
    msk = (rows < n_rows)[:, None] & (offs_d < D)[None, :]
    ptrs = rows.to(tl.int64)[:, None] * D + offs_d[None, :]
    o = tl.load(O + ptrs, mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=msk, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < n_rows)



@triton.jit
def _dkdv_inner(dk, dv, k, v, offs_n, key_ok, q_base, do_base, lse_base, delta_base, bias_base, stride_bt,
                stride_bn, lo, hi, S, T, D, offs_d, d_ok, qk_scale,
                BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_I64: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """Accumulate dK, dV of one key tile over query positions [lo, hi) of one query head.

    q, dO are contiguous [.., T, D] here (row stride D); lse and delta are [.., T]; bias_base points at
    this head's bias at the segment's key 0.
    """
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < hi
        qd_mask = m_ok[:, None] & d_ok[None, :]
        ptrs = offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
        q = tl.load(q_base + ptrs, mask=qd_mask, other=0.0)
        do = tl.load(do_base + ptrs, mask=qd_mask, other=0.0)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # a row that saw nothing: p = 0
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        s_t = _dot(k, tl.trans(q), DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
        visible = key_ok[:, None] & m_ok[None, :]
        if HAS_BIAS:
            s_t += _load_bias(bias_base, _bias_index(offs_n, BIAS_I64)[:, None] * stride_bn
                              + _bias_index(offs_m, BIAS_I64)[None, :] * stride_bt, visible)
        if CAUSAL:
            visible = visible & (offs_n[:, None] <= offs_m[None, :] + (S - T))
        p_t = tl.where(visible, tl.math.exp2(s_t - lse[None, :]), 0.0)
        dv += _dot(p_t.to(do.dtype), do, DOT_PREC)
        dp_t = _dot(v, tl.trans(do), DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, DOT_PREC)
    return dk, dv


@triton.jit
def _dkdv_tile(Q, DO, LSE, DELTA, k_base, v_base, stride_kn, stride_vn, mask_base, bias_base, sbh, sbt, sbn,
               dk_base, dv_base, n0, n_end, b, hkv, T, S, G, Hkv, D, qk_scale, sm_scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
               IS_PREFIX: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
               BIAS_I64: tl.constexpr, DOT_PREC: tl.constexpr):
    """dK, dV of keys [n0, n0 + BLOCK_N) of one segment, summed over the G query heads of the group.

    bias_base points at row b's bias at the segment's key 0 (head 0)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_end
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    key_ok = n_ok
    if not IS_PREFIX:
        if HAS_MASK:
            pad = tl.load(mask_base + offs_n, mask=n_ok, other=0)
            key_ok = key_ok & (pad != 0)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    # Queries [t_start, t_full) see only part of this tile (causal test); [t_full, T) see all of it.
    t_start = n0 * 0
    t_full = n0 * 0
    if not IS_PREFIX:
        if CAUSAL:
            t_start = tl.maximum(n0 - (S - T), 0)
            t_full = tl.minimum(tl.maximum(n0 + BLOCK_N - 1 - (S - T), t_start), T)
    Hq = Hkv * G
    for g in range(0, G):
        row0 = (b.to(tl.int64) * Hq + hkv * G + g) * T
        head_bias = bias_base + (hkv * G + g).to(tl.int64) * sbh
        if not IS_PREFIX:
            if CAUSAL:
                dk, dv = _dkdv_inner(dk, dv, k, v, offs_n, key_ok, Q + row0 * D, DO + row0 * D, LSE + row0,
                                     DELTA + row0, head_bias, sbt, sbn, t_start, t_full, S, T, D, offs_d, d_ok,
                                     qk_scale, BLOCK_M, True, HAS_BIAS, BIAS_I64, DOT_PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, offs_n, key_ok, Q + row0 * D, DO + row0 * D, LSE + row0,
                             DELTA + row0, head_bias, sbt, sbn, t_full, T, S, T, D, offs_d, d_ok, qk_scale,
                             BLOCK_M, False, HAS_BIAS, BIAS_I64, DOT_PREC)
    out_ptrs = offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(dk_base + out_ptrs, (dk * sm_scale).to(dk_base.dtype.element_ty), mask=kv_mask)
    tl.store(dv_base + out_ptrs, dv.to(dv_base.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["T", "S", "P"])
def _bwd_dkdv_kernel(Q, K, V, PK, PV, TASK, MASK, BIAS, DO, LSE, DELTA, DK, DV, DPK_PART, DPV_PART,
                     skb, skh, sks, svb, svh, svs, spkt, spkh, spkp, spvt, spvh, spvp, sbb, sbh, sbt, sbn,
                     T, S, P, G, Hkv, D, qk_scale, sm_scale, n_prefix_blocks,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BIAS_I64: tl.constexpr, DOT_PREC: tl.constexpr):
    """Grid: (prefix key tiles + own key tiles, B * Hkv). Prefix tiles write this row's fp32 partial."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    bh = b.to(tl.int64) * Hkv + hkv
    row_bias = BIAS + b.to(tl.int64) * sbb
    if pid_n < n_prefix_blocks:
        task = tl.load(TASK + b).to(tl.int64)
        _dkdv_tile(Q, DO, LSE, DELTA, PK + task * spkt + hkv.to(tl.int64) * spkh,
                   PV + task * spvt + hkv.to(tl.int64) * spvh, spkp, spvp, MASK, row_bias, sbh, sbt, sbn,
                   DPK_PART + bh * P * D, DPV_PART + bh * P * D, pid_n * BLOCK_N, P, b, hkv, T, S, G, Hkv,
                   D, qk_scale, sm_scale, BLOCK_M, BLOCK_N, D_PAD, True, CAUSAL, HAS_MASK, HAS_BIAS, BIAS_I64,
                   DOT_PREC)
    else:
        _dkdv_tile(Q, DO, LSE, DELTA, K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh,
                   V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh, sks, svs, MASK + b.to(tl.int64) * S,
                   row_bias + P.to(tl.int64) * sbn, sbh, sbt, sbn,
                   DK + bh * S * D, DV + bh * S * D, (pid_n - n_prefix_blocks) * BLOCK_N, S, b, hkv, T, S,
                   G, Hkv, D, qk_scale, sm_scale, BLOCK_M, BLOCK_N, D_PAD, False, CAUSAL, HAS_MASK, HAS_BIAS,
                   BIAS_I64, DOT_PREC)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, mask_base, bias_base, bias_rows,
              stride_bn, lo, hi, last_key, offs_d, d_ok, qk_scale,
              BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
              BIAS_I64: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dQ (unscaled) of one query tile over keys [lo, hi) of one segment (bias as in _fwd_inner)."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_PREC) * qk_scale
        if HAS_BIAS:
            s += _load_bias(bias_base, bias_rows[:, None] + _bias_index(offs_n, BIAS_I64)[None, :] * stride_bn,
                            n_ok[None, :])
        visible = _visible_keys(offs_n, n_ok, last_key, mask_base, CAUSAL, HAS_MASK)
        p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["T", "S", "P"])
def _bwd_dq_kernel(Q, K, V, PK, PV, TASK, MASK, BIAS, DO, LSE, DELTA, DQ,
                   skb, skh, sks, svb, svh, svs, spkt, spkh, spkp, spvt, spvh, spvp, sbb, sbh, sbt, sbn,
                   T, S, P, G, Hkv, D, qk_scale, sm_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BIAS_I64: tl.constexpr, DOT_PREC: tl.constexpr):
    """Grid: (packed query tiles, B * Hkv). q, dO, dQ are contiguous [B, Hq, T, D]."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    Hq = Hkv * G
    g, t, row_ok, t_lo, t_hi = _packed_rows(pid_m, T, G, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    row = (b.to(tl.int64) * Hq + hkv * G + g) * T + t
    qd_mask = row_ok[:, None] & d_ok[None, :]
    ptrs = row[:, None] * D + offs_d[None, :]
    q = tl.load(Q + ptrs, mask=qd_mask, other=0.0)
    do = tl.load(DO + ptrs, mask=qd_mask, other=0.0)
    lse = tl.load(LSE + row, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
    task = tl.load(TASK + b).to(tl.int64)
    last_key = t + (S - T)
    bias_b = BIAS + b.to(tl.int64) * sbb
    bias_rows = _bias_index(hkv * G + g, BIAS_I64) * sbh + _bias_index(t, BIAS_I64) * sbt
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, PK + task * spkt + hkv.to(tl.int64) * spkh,
                   PV + task * spvt + hkv.to(tl.int64) * spvh, spkp, spvp, MASK, bias_b, bias_rows, sbn, 0, P,
                   last_key, offs_d, d_ok, qk_scale, BLOCK_N, False, False, HAS_BIAS, BIAS_I64, DOT_PREC)
    own_end = S
    full = S
    if CAUSAL:
        own_end = tl.minimum(S, t_hi + (S - T) + 1)
        full = t_lo + (S - T) + 1
    k_base = K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh
    mask_base = MASK + b.to(tl.int64) * S
    own_bias = bias_b + P.to(tl.int64) * sbn
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, sks, svs, mask_base, own_bias, bias_rows, sbn, 0,
                   tl.minimum(own_end, full), last_key, offs_d, d_ok, qk_scale, BLOCK_N, False, HAS_MASK,
                   HAS_BIAS, BIAS_I64, DOT_PREC)
    if CAUSAL:
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, sks, svs, mask_base, own_bias, bias_rows, sbn,
                       full, own_end, last_key, offs_d, d_ok, qk_scale, BLOCK_N, True, HAS_MASK, HAS_BIAS,
                       BIAS_I64, DOT_PREC)
    tl.store(DQ + ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _reduce_prefix_kernel(DPK_PART, DPV_PART, ORDER, STARTS, DPK, DPV, row_numel, BLOCK: tl.constexpr):
    """d prefix[task] = sum of the partials of the rows of that task, in a fixed (stable-sorted) order."""
    task = tl.program_id(0)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < row_numel
    start = tl.load(STARTS + task)
    end = tl.load(STARTS + task + 1)
    acc_k = tl.zeros([BLOCK], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(start, end):
        row = tl.load(ORDER + i).to(tl.int64)
        acc_k += tl.load(DPK_PART + row * row_numel + offs, mask=ok, other=0.0)
        acc_v += tl.load(DPV_PART + row * row_numel + offs, mask=ok, other=0.0)
    base = task.to(tl.int64) * row_numel
    tl.store(DPK + base + offs, acc_k.to(DPK.dtype.element_ty), mask=ok)
    tl.store(DPV + base + offs, acc_v.to(DPV.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "ieee"  # the fp32 tolerance (1e-4) rules out tf32
    if dtype == torch.bfloat16 and _interpret():
        return "upcast"  # the interpreter's bf16 tl.dot is wrong (raw uint16 products)
    return "tf32"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _arch(index: int) -> int:
    """The compute capability of CUDA device `index` as one number (9.0 -> 90); the tile configs key on it."""
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _device_arch(device: torch.device) -> int:
    """`_arch` of a tensor's device; 90 under the interpreter, whose tiles do not depend on it."""
    return 90 if _interpret() else _arch(device.index or 0)


def _fwd_config(d_pad: int, dtype: torch.dtype, decode: bool, has_bias: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward, on every architecture.

    Chosen from sm_90 and sm_80 ahead-of-time compiles (`python -m fastprompt.kernels.aot_compile --arch
    90 80 --sweep`), not timings: the largest tiles that ptxas fits in 255 registers without spilling.
    fp32 uses IEEE FMA dots (no tensor cores), which need small tiles; a bias costs a [BLOCK_M, BLOCK_N]
    tile of offsets and of bias values.
    """
    if _interpret():  # every program runs in Python: few, large tiles
        return (16, 32, 4, 1) if decode else (64, 64, 4, 1)
    if decode:
        return 16, (32 if dtype == torch.float32 else 64), 4, 3
    if dtype == torch.float32:
        return 32, 32, 4, 2
    if d_pad <= 64:
        return 128, 64, 8, 3
    # at 128 x 32 with a bias, sm_90 still spills 16 B (causal with padding), sm_80 200-270 B
    return (128, 16, 8, 3) if has_bias else (128, 64, 8, 2)


def _bwd_config(d_pad: int, dtype: torch.dtype, arch: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) shared by the dK/dV and dQ kernels on compute capability
    `arch` (e.g. 90 for 9.0), chosen like `_fwd_config`'s."""
    if _interpret():
        return 64, 64, 4, 1
    if dtype == torch.float32:  # IEEE FMA dots: at 32 x 64 the dK/dV kernel spills kilobytes on sm_90
        return 16, 32, 4, 2
    # 32 queries per step: at 64 x 64 the dK/dV kernel spills on sm_90 (112 B; 260 B with a bias)
    if arch < 90:  # mma.sync keeps more in registers than wgmma: at 64 x 64 ptxas falls back to 32 registers
        # D <= 64 at 32 x 32: the bf16 D=64 causal dK/dV with padding and a bias spills 28 B with triton 3.9's
        # ptxas (none with 3.6's); at 32 x 16 neither does, and fewer D <= 64 cases spill with either
        return (32, 32, 8, 2) if d_pad > 64 else (32, 16, 4, 2)
    return (32, 64, 8, 2) if d_pad > 64 else (32, 64, 4, 2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels read rows through the first three strides and need a unit stride on the last axis."""
    return t.contiguous() if t.numel() and t.stride(-1) != 1 else t


def _prepare(q, k, v, prefix_k, prefix_v, bank_rows, key_padding_mask):
    """The launcher inputs as the kernels read them, and the shape numbers. No checks: the public op
    (fastprompt.ops.prefix_attention) validated the arguments once."""
    q, k, v, prefix_k, prefix_v = (_last_dim_contiguous(t) for t in (q, k, v, prefix_k, prefix_v))
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.contiguous().view(torch.uint8)
    return (q, k, v, prefix_k, prefix_v, bank_rows.contiguous(), key_padding_mask,
            (B, Hq, Hkv, T, S, prefix_k.shape[2], D))


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()[:3]]


# Bias offsets within one batch row are int32 when the furthest one a kernel forms stays below 2**31.
# Tiles reach up to one block past the last position and key (masked lanes still form their offsets).
_MAX_BLOCK = 256


def _prepare_bias(bias, q, shape):
    """Return (the tensor to pass, its four strides with 0 on size-1 dimensions, and BIAS_I64: whether the
    offsets within one batch row need int64). The bias is [B or 1, Hq or 1, T or 1, P + S] (checked by
    the public op). Without a bias, q stands in for the pointer (never read), the strides are 0 and
    BIAS_I64 is False."""
    if bias is None:
        return q, (0, 0, 0, 0), False
    strides = tuple(0 if n == 1 else st for n, st in zip(bias.shape, bias.stride()))
    _, Hq, T, L = shape
    _, sbh, sbt, sbn = strides
    furthest = (Hq - 1) * sbh + (T - 1 + _MAX_BLOCK) * sbt + (L - 1 + _MAX_BLOCK) * sbn
    return bias, strides, furthest >= 2 ** 31


@functools.lru_cache(maxsize=1024)
def _fwd_plan(B, Hq, Hkv, T, L, D, dtype, has_bias, num_splits, sm_count, interpret):
    """What a forward's shape decides, computed once per new shape: (BLOCK_M, BLOCK_N, num_warps,
    num_stages, D_PAD, split_len, num_splits, grid). `sm_count` (0 unless needed) sizes the decode split."""
    d_pad = max(16, triton.next_power_of_2(D))
    decode = T <= DECODE_MAX_T
    block_m, block_n, warps, stages = _fwd_config(d_pad, dtype, decode, has_bias)
    n_m = triton.cdiv((Hq // Hkv) * T, block_m)
    if num_splits is None:
        if not decode:
            num_splits = 1
        elif interpret:
            num_splits = triton.cdiv(L, block_n)
        else:
            num_splits = min(triton.cdiv(2 * sm_count, n_m * B * Hkv), triton.cdiv(L, block_n), 128)
    num_splits = max(1, min(int(num_splits), triton.cdiv(L, block_n)))
    split_len = triton.cdiv(triton.cdiv(L, num_splits), block_n) * block_n
    num_splits = triton.cdiv(L, split_len)
    return block_m, block_n, warps, stages, d_pad, split_len, num_splits, (n_m, B * Hkv, num_splits)


def prefix_attention_fwd(q, k, v, prefix_k, prefix_v, bank_rows, *, causal=True, key_padding_mask=None,
                         scale=None, bias=None, out=None, num_splits=None):
    """Forward. Returns (out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] fp32, base 2).

    q [B, Hq, T, D]; k, v [B, Hkv, S, D], S >= T; prefix_k, prefix_v [n_tasks, Hkv, P, D]; bank_rows [B]
    int64/int32; key_padding_mask [B, S] bool (True = attend) or None; fp32, bf16 or fp16, all alike.
    The arguments are not checked here: `fastprompt.ops.prefix_attention` checks them once per call.
    bias: [B or 1, Hq or 1, T or 1, P + S] of any float dtype, added to the scaled scores, or None.
    out: optional contiguous [B, Hq, T, D] buffer of q's dtype to write into.
    For T <= DECODE_MAX_T the key range is split over `num_splits` programs per query tile (default: a
    heuristic that fills the GPU; 1 disables it) and merged by log-sum-exp.
    """
    q, k, v, prefix_k, prefix_v, bank_rows, mask, (B, Hq, Hkv, T, S, P, D) = _prepare(
        q, k, v, prefix_k, prefix_v, bank_rows, key_padding_mask)
    bias_arg, bias_strides, bias_i64 = _prepare_bias(bias, q, (B, Hq, T, P + S))
    scale = D ** -0.5 if scale is None else float(scale)
    if out is None:
        out = torch.empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    elif (out.shape != (B, Hq, T, D) or out.dtype != q.dtype or out.device != q.device
          or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous [B={B}, Hq={Hq}, T={T}, D={D}] tensor of {q.dtype}")
    lse = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    interpret = _interpret()
    sm_count = 0 if interpret or T > DECODE_MAX_T or num_splits is not None else _sm_count(q.device.index or 0)
    plan = _fwd_plan(B, Hq, Hkv, T, P + S, D, q.dtype, bias is not None, num_splits, sm_count, interpret)
    block_m, block_n, warps, stages, d_pad, split_len, num_splits, grid = plan
    G = Hq // Hkv
    split = num_splits > 1
    if split:
        o_part = torch.empty((B * Hq * T, num_splits, d_pad), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B * Hq * T, num_splits), dtype=torch.float32, device=q.device)
    else:
        o_part, lse_part = out, lse  # unused
    _fwd_kernel[grid](
        q, k, v, prefix_k, prefix_v, bank_rows, mask if mask is not None else bank_rows, bias_arg, out, lse,
        o_part, lse_part, *_strides(q, k, v, prefix_k, prefix_v), *bias_strides,
        T, S, P, G, Hkv, D, scale * _LOG2E, split_len, num_splits,
        BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad, CAUSAL=bool(causal), HAS_MASK=mask is not None,
        HAS_BIAS=bias is not None, BIAS_I64=bias_i64, SPLIT=split, DOT_PREC=_dot_precision(q.dtype),
        num_warps=warps, num_stages=stages)
    if split:
        n_rows = B * Hq * T
        block_r = 16
        _combine_kernel[(triton.cdiv(n_rows, block_r),)](
            o_part, lse_part, out, lse, n_rows, num_splits, D, BLOCK_R=block_r,
            SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), D_PAD=d_pad, num_warps=4)
    return out, lse


def prefix_attention_bwd(d_out, q, k, v, prefix_k, prefix_v, bank_rows, out, lse, *, causal=True,
                         key_padding_mask=None, scale=None, bias=None, grads=None):
    """Backward. Returns (dq, dk, dv, d_prefix_k, d_prefix_v) in the inputs' dtype and shapes.

    d_out, out: [B, Hq, T, D]; lse: [B, Hq, T] fp32 from `prefix_attention_fwd`; other arguments (the
    bias included, which gets no gradient) as there.
    grads: optional tuple of five contiguous buffers (dq, dk, dv, d_prefix_k, d_prefix_v) to write into.
    Deterministic: each row's d prefix goes to an fp32 partial ([B, Hkv, P, D] for K and for V, i.e.
    8 * B * Hkv * P * D bytes extra), reduced per task in a fixed order; no float atomics.
    """
    q, k, v, prefix_k, prefix_v, bank_rows, mask, (B, Hq, Hkv, T, S, P, D) = _prepare(
        q, k, v, prefix_k, prefix_v, bank_rows, key_padding_mask)
    bias_arg, bias_strides, bias_i64 = _prepare_bias(bias, q, (B, Hq, T, P + S))
    n_tasks = prefix_k.shape[0]
    scale = D ** -0.5 if scale is None else float(scale)
    q, d_out, out, lse = q.contiguous(), d_out.contiguous(), out.contiguous(), lse.contiguous()
    shapes = (q.shape, k.shape, k.shape, prefix_k.shape, prefix_k.shape)
    if grads is None:
        grads = tuple(torch.empty(s, dtype=q.dtype, device=q.device) for s in shapes)
    elif len(grads) != 5 or any(g.shape != s or g.dtype != q.dtype or not g.is_contiguous()
                                for g, s in zip(grads, shapes)):
        raise ValueError("grads must be five contiguous buffers shaped like q, k, v, prefix_k, prefix_v")
    dq, dk, dv, dpk, dpv = grads
    if q.numel() == 0:
        dk.zero_(), dv.zero_(), dpk.zero_(), dpv.zero_()
        return dq, dk, dv, dpk, dpv
    G = Hq // Hkv
    d_pad = max(16, triton.next_power_of_2(D))
    n_rows = B * Hq * T
    delta = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(n_rows, 64),)](out, d_out, delta, n_rows, D, BLOCK_R=64, D_PAD=d_pad)

    block_m, block_n, warps, stages = _bwd_config(d_pad, q.dtype, _device_arch(q.device))
    dot_prec = _dot_precision(q.dtype)
    scalars = (T, S, P, G, Hkv, D, scale * _LOG2E, scale)
    flags = dict(BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad, CAUSAL=bool(causal),
                 HAS_MASK=mask is not None, HAS_BIAS=bias is not None, BIAS_I64=bias_i64, DOT_PREC=dot_prec,
                 num_warps=warps, num_stages=stages)
    mask_arg = mask if mask is not None else bank_rows
    dpk_part = torch.empty((B, Hkv, P, D), dtype=torch.float32, device=q.device)
    dpv_part = torch.empty((B, Hkv, P, D), dtype=torch.float32, device=q.device)
    n_prefix_blocks = triton.cdiv(P, block_n)
    _bwd_dkdv_kernel[(n_prefix_blocks + triton.cdiv(S, block_n), B * Hkv)](
        q, k, v, prefix_k, prefix_v, bank_rows, mask_arg, bias_arg, d_out, lse, delta, dk, dv, dpk_part,
        dpv_part, *_strides(k, v, prefix_k, prefix_v), *bias_strides, *scalars, n_prefix_blocks, **flags)
    _bwd_dq_kernel[(triton.cdiv(G * T, block_m), B * Hkv)](
        q, k, v, prefix_k, prefix_v, bank_rows, mask_arg, bias_arg, d_out, lse, delta, dq,
        *_strides(k, v, prefix_k, prefix_v), *bias_strides, *scalars, **flags)

    row_numel = Hkv * P * D
    if row_numel == 0 or n_tasks == 0:
        return dq, dk, dv, dpk, dpv
    sorted_ids, order = torch.sort(bank_rows, stable=True)
    starts = torch.searchsorted(sorted_ids, torch.arange(n_tasks + 1, device=q.device,
                                                         dtype=sorted_ids.dtype))
    block = 1024
    _reduce_prefix_kernel[(n_tasks, triton.cdiv(row_numel, block))](
        dpk_part, dpv_part, order, starts, dpk, dpv, row_numel, BLOCK=block, num_warps=4)
    return dq, dk, dv, dpk, dpv
