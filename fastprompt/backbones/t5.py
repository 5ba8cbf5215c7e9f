"""T5 (and mT5): an encoder-decoder with a relative position bias on its self-attentions."""

from __future__ import annotations

import torch

from fastprompt.backbones.base import register_backbone
from fastprompt.backbones.sites import SiteBackbone


@register_backbone("t5", "mt5")
class T5(SiteBackbone):
    """T5ForConditionalGeneration. Layer 0 of each stack owns the relative position bias; the
    cross-attention has none. head_dim is `d_kv` (T5 v1.1 has heads × d_kv != d_model)."""

    kind = "seq2seq"
    task_type = "SEQ_2_SEQ_LM"
    biased_sites = ("encoder", "decoder")

    @property
    def head_dim(self) -> int:
        return self.config.d_kv

    @property
    def num_decoder_layers(self) -> int:
        return len(self.model.get_decoder().block)

    def attention_configs(self) -> list:
        # Each stack holds its own deep copy of the config.
        return [self.config, self.model.get_encoder().config, self.model.get_decoder().config]

    def attention_sites(self):
        sites = {}
        for i, block in enumerate(self.model.get_encoder().block):
            sites[block.layer[0].SelfAttention] = ("encoder", i)
        for i, block in enumerate(self.model.get_decoder().block):
            sites[block.layer[0].SelfAttention] = ("decoder", i)
            sites[block.layer[1].EncDecAttention] = ("cross", i)
        return sites

    def prefix_position_bias(self, site, n_queries, query_offset, n_prefix) -> torch.Tensor:
        # Prefix keys sit just before the site's own tokens, where PEFT's decoder prefix (a cache of P
        # positions) puts them: prefix keys at 0..P-1, own tokens from P on.
        stack = self.model.get_encoder() if site == "encoder" else self.model.get_decoder()
        attention = stack.block[0].layer[0].SelfAttention
        return attention.compute_bias(n_queries, n_prefix, past_seen_tokens=n_prefix + query_offset)
