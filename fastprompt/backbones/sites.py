"""Attention at named sites of encoders and encoder-decoders, with per-task prefixes read from a bank.

Causal decoders use `backbones/attention.py`. Encoders and encoder-decoders have up to three kinds of
attention, called sites here: the encoder's self-attention ("encoder"), the decoder's causal self-attention
("decoder") and the decoder's cross-attention over the encoder's output ("cross"). Prefix tuning places
keys/values before a site's own keys:

- Bank prefixes (`SiteContext.prefix_k`, `prefix_v`): each row reads its task's prefix by task id, through
  `fastprompt.ops.prefix_attention` (non-causal at "encoder" and "cross"). The encoder sites of BERT and
  Li & Liang's encoder and cross-attention prefixes use these.
- The decoder's self-attention prefix (PEFT's prefix tuning on encoder-decoders) sits in transformers' own
  cache, which keeps positions, T5's position bias and generation as PEFT has them. Here those are just
  keys.

Families with a relative position bias (T5) pass `position_bias` for the keys they know. At such sites the
backbone supplies the bias of bank-prefix keys (`SiteBackbone.prefix_position_bias`), and the attention runs
in PyTorch (`biased_prefix_attention`), because the prefix-attention kernel takes no bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from fastprompt.backbones.base import Backbone
from fastprompt.ops import prefix_attention

SITES_ATTENTION_NAME = "fastprompt_sites"


class SiteBackbone(Backbone):
    """An encoder or encoder-decoder family: names its attention modules by site (module docstring)."""

    decoder_attr = "base_model"  # the transformer body (HF's `base_model`; the model itself for T5)
    biased_sites: tuple[str, ...] = ()  # sites whose attention adds a relative position bias

    @property
    def embed_scale(self) -> float:
        """Factor the model applies to its token embeddings (not to virtual tokens, as in PEFT)."""
        return 1.0

    def attention_sites(self) -> dict[nn.Module, tuple[str, int]]:
        """Every attention module of the model → (site, layer index)."""
        raise NotImplementedError

    def prefix_position_bias(self, site: str, n_queries: int, query_offset: int, n_prefix: int) -> torch.Tensor:
        """Bias [1, H, n_queries, n_prefix] of bank-prefix keys at a biased site, for queries at own
        positions query_offset.. (only for families with `biased_sites`)."""
        raise NotImplementedError


@dataclass
class SiteContext:
    """What fastprompt's site attention does in one forward of the model."""

    backbone: SiteBackbone
    task_ids: torch.Tensor | None = None  # [B] row -> bank entry
    prefix_k: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # site -> per layer [n, H, P, D]
    prefix_v: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    key_padding_mask: dict[str, torch.Tensor | None] = field(default_factory=dict)  # site -> [B, S] bool
    backend: str | None = None
    sites: dict[nn.Module, tuple[str, int]] = field(init=False)
    _bias: dict[tuple, torch.Tensor] = field(default_factory=dict, init=False)

    def __post_init__(self):
        self.sites = self.backbone.attention_sites()

    def prefix_bias(self, site: str, n_queries: int, query_offset: int, n_prefix: int) -> torch.Tensor:
        """The backbone's bank-prefix bias, computed once per forward and shape (every layer shares it)."""
        key = (site, n_queries, query_offset, n_prefix)
        if key not in self._bias:
            self._bias[key] = self.backbone.prefix_position_bias(site, n_queries, query_offset, n_prefix)
        return self._bias[key]


def biased_prefix_attention(q, k, v, prefix_k, prefix_v, task_ids, bias, *, causal: bool,
                            key_padding_mask=None, scale: float | None = None) -> torch.Tensor:
    """`fastprompt.ops.prefix_attention` with an additive bias on the scores, in PyTorch.

    q [B, H, T, D]; k, v [B, H, S, D]; prefix_k, prefix_v [n_tasks, H, P, D]; task_ids [B] int64; bias
    [1 or B, H, T, P + S] over [prefix ; own keys] (float); key_padding_mask [B, S] bool (True = attend).
    Masking as in prefix_attention (causal aligned to the end, prefix always visible, a query that sees
    nothing returns zeros). Computed in fp32; returns [B, H, T, D] in q's dtype.
    """
    B, _, T, _ = q.shape
    S, P = k.shape[2], prefix_k.shape[2]
    keys = torch.cat([prefix_k[task_ids], k], dim=2).float()
    values = torch.cat([prefix_v[task_ids], v], dim=2).float()
    own_visible = torch.ones(B, 1, T, S, dtype=torch.bool, device=q.device)
    if causal:
        query_pos = torch.arange(T, device=q.device)[:, None] + (S - T)
        own_visible = own_visible & (torch.arange(S, device=q.device)[None, :] <= query_pos)
    if key_padding_mask is not None:
        own_visible = own_visible & key_padding_mask[:, None, None, :]
    visible = torch.cat([own_visible.new_ones(B, 1, T, P), own_visible], dim=-1)
    sees_something = visible.any(dim=-1, keepdim=True)
    scores_bias = torch.where(visible | ~sees_something, bias.float(), float("-inf"))
    out = F.scaled_dot_product_attention(q.float(), keys, values, attn_mask=scores_bias, scale=scale)
    return (out * sees_something).to(q.dtype)


def site_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask, scaling: float | None = None, dropout: float = 0.0,
                   fastprompt_ctx: SiteContext | None = None, position_bias: torch.Tensor | None = None,
                   **kwargs):
    """query [B, H, T, D], key/value [B, H, S, D] → ([B, T, H, D], None), as transformers expects.

    `attention_mask` is None (transformers builds no mask for a custom attention; padding travels in the
    context). Attention-probability dropout is not applied (the backbone is frozen, as in attention.py).
    """
    if fastprompt_ctx is None:
        raise RuntimeError("fastprompt site attention was called without a fastprompt_ctx; call the model "
                           "through fastprompt's Seq2SeqPromptModel or EncoderPromptModel")
    ctx = fastprompt_ctx
    site, layer = ctx.sites[module]
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    B, _, T, D = query.shape
    if site in ctx.prefix_k:
        prefix_k = ctx.prefix_k[site][layer].to(query.dtype)
        prefix_v = ctx.prefix_v[site][layer].to(query.dtype)
        task_ids = ctx.task_ids
    else:
        prefix_k = prefix_v = query.new_zeros(1, key.shape[1], 0, D)
        task_ids = torch.zeros(B, dtype=torch.long, device=query.device)
    mask = ctx.key_padding_mask.get(site)
    causal = site == "decoder"
    if site in ctx.backbone.biased_sites:
        bias = position_bias
        P = prefix_k.shape[2]
        if P:
            prefix_bias = ctx.prefix_bias(site, T, key.shape[2] - T, P).to(bias.dtype)
            bias = torch.cat([prefix_bias.expand(bias.shape[0], -1, -1, -1), bias], dim=-1)
        out = biased_prefix_attention(query, key, value, prefix_k, prefix_v, task_ids, bias, causal=causal,
                                      key_padding_mask=mask, scale=scaling)
    else:
        out = prefix_attention(query, key, value, prefix_k, prefix_v, task_ids, causal=causal,
                               key_padding_mask=mask, scale=scaling, backend=ctx.backend)
    return out.transpose(1, 2), None


AttentionInterface.register(SITES_ATTENTION_NAME, site_attention)
