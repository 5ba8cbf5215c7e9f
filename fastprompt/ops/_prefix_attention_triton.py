"""Autograd wrapper of the Triton prefix-attention kernels (fastprompt.kernels.prefix_attention)."""

from __future__ import annotations

import torch

from fastprompt.kernels.prefix_attention import prefix_attention_bwd, prefix_attention_fwd


class PrefixAttentionFunction(torch.autograd.Function):
    """out = softmax(q·[prefix_k[task] ; k]ᵀ·scale + bias + mask)·[prefix_v[task] ; v]; grads to q, k, v and
    the bank (none to the bias).

    The backward is deterministic: per-row fp32 partials of d prefix_k / d prefix_v ([B, Hkv, P, D] each)
    are summed per task in a fixed order (see `prefix_attention_bwd`).
    """

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, bias, causal, scale):
        out, lse = prefix_attention_fwd(q, k, v, prefix_k, prefix_v, task_ids, causal=causal,
                                        key_padding_mask=key_padding_mask, scale=scale, bias=bias)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, bias, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, bias, out, lse = ctx.saved_tensors
        dq, dk, dv, dpk, dpv = prefix_attention_bwd(
            d_out, q, k, v, prefix_k, prefix_v, task_ids, out, lse, causal=ctx.causal,
            key_padding_mask=key_padding_mask, scale=ctx.scale, bias=bias)
        return dq, dk, dv, dpk, dpv, None, None, None, None, None


def prefix_attention_triton(q, k, v, prefix_k, prefix_v, task_ids, *, causal=True, key_padding_mask=None,
                            scale=None, bias=None):
    """The Triton path of `fastprompt.ops.prefix_attention` (same arguments and result, [B, Hq, T, D]).

    For T <= 16 (decoding) the forward uses the split-KV kernel; the backward is available either way.
    """
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask.bool()
    return PrefixAttentionFunction.apply(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, bias,
                                         bool(causal), scale)
