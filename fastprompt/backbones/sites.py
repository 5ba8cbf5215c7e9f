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
backbone supplies the bias of bank-prefix keys (`SiteBackbone.prefix_position_bias`), and
`fastprompt.ops.prefix_attention` takes [prefix bias ; position_bias] as its `bias`, so these sites run
through the same kernel as the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
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
    bank_rows: torch.Tensor | None = None  # [B] int64: row b reads bank entry bank_rows[b]
    prefix_k: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # site -> per layer [n, H, P, D]
    prefix_v: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    key_padding_mask: dict[str, torch.Tensor | None] = field(default_factory=dict)  # site -> [B, S] bool
    backend: str | None = None
    sites: dict[nn.Module, tuple[str, int]] = field(init=False)
    _bias: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, init=False)

    def __post_init__(self):
        self.sites = self.backbone.attention_sites()

    def keys_bias(self, site: str, position_bias: torch.Tensor, n_prefix: int) -> torch.Tensor:
        """The bias over [bank prefix ; own keys]: [1 or B, H, T, n_prefix + S] from position_bias
        [1 or B, H, T, S] (float, as the model computed it).

        Every layer of a stack passes the same position_bias tensor, so the concatenation is built once
        per forward and site; one tensor, not one per layer, is then held for the backward.
        """
        if not n_prefix:
            return position_bias
        cached = self._bias.get(site)
        if cached is None or cached[0] is not position_bias:
            n_queries, n_keys = position_bias.shape[2:]
            prefix_bias = self.backbone.prefix_position_bias(site, n_queries, n_keys - n_queries, n_prefix)
            prefix_bias = prefix_bias.to(position_bias.dtype).expand(position_bias.shape[0], -1, -1, -1)
            cached = position_bias, torch.cat([prefix_bias, position_bias], dim=-1)
            self._bias[site] = cached
        return cached[1]


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
    B, _, _, D = query.shape
    if site in ctx.prefix_k:
        prefix_k = ctx.prefix_k[site][layer].to(query.dtype)
        prefix_v = ctx.prefix_v[site][layer].to(query.dtype)
        bank_rows = ctx.bank_rows
    else:
        prefix_k = prefix_v = query.new_zeros(1, key.shape[1], 0, D)
        bank_rows = torch.zeros(B, dtype=torch.long, device=query.device)
    mask = ctx.key_padding_mask.get(site)
    bias = None
    if site in ctx.backbone.biased_sites:
        bias = ctx.keys_bias(site, position_bias, prefix_k.shape[2])
    out = prefix_attention(query, key, value, prefix_k, prefix_v, bank_rows, causal=site == "decoder",
                           key_padding_mask=mask, scale=scaling, bias=bias, backend=ctx.backend)
    return out.transpose(1, 2), None


AttentionInterface.register(SITES_ATTENTION_NAME, site_attention)
