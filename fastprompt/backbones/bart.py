"""BART: an encoder-decoder with learned absolute positions and (optionally) scaled token embeddings."""

from __future__ import annotations

import math

from fastprompt.backbones.base import register_backbone
from fastprompt.backbones.sites import SiteBackbone


@register_backbone("bart")
class Bart(SiteBackbone):
    """BartForConditionalGeneration: no position bias, so every site runs the prefix-attention op."""

    kind = "seq2seq"
    task_type = "SEQ_2_SEQ_LM"

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.config.d_model) if self.config.scale_embedding else 1.0

    @property
    def num_decoder_layers(self) -> int:
        return self.config.decoder_layers

    def attention_sites(self):
        sites = {}
        for i, layer in enumerate(self.model.get_encoder().layers):
            sites[layer.self_attn] = ("encoder", i)
        for i, layer in enumerate(self.model.get_decoder().layers):
            sites[layer.self_attn] = ("decoder", i)
            sites[layer.encoder_attn] = ("cross", i)
        return sites
