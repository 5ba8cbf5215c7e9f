"""The BERT family (BERT, RoBERTa): bidirectional encoders with a classifier or a masked-LM head."""

from __future__ import annotations

import torch
from torch import nn

from fastprompt.backbones.base import register_backbone
from fastprompt.backbones.sites import SiteBackbone


@register_backbone("bert")
class Bert(SiteBackbone):
    """*ForSequenceClassification (task SEQ_CLS) or *ForMaskedLM (FEATURE_EXTRACTION, PEFT's task type for
    a model whose outputs are used as they are)."""

    kind = "encoder"
    mlm_head_attr = "cls"

    @property
    def mlm_head(self) -> nn.Module | None:
        """The masked-LM head (hidden [..., d] → logits [..., V]), or None for a classifier."""
        return getattr(self.model, self.mlm_head_attr, None)

    @property
    def task_type(self) -> str:
        return "FEATURE_EXTRACTION" if self.mlm_head is not None else "SEQ_CLS"

    def attention_sites(self):
        return {layer.attention.self: ("encoder", i) for i, layer in enumerate(self.decoder.encoder.layer)}

    def prefix_position_ids(self, input_ids: torch.Tensor, n_prefix: int) -> torch.Tensor:
        """Position ids [B, T] of the tokens behind a prefix of n_prefix keys: PEFT's prefix is a cache of
        n_prefix positions, so the tokens are numbered from n_prefix on."""
        B, T = input_ids.shape
        return torch.arange(n_prefix, n_prefix + T, device=input_ids.device)[None].expand(B, T)


@register_backbone("roberta")
class Roberta(Bert):
    """RoBERTa numbers positions from padding_idx + 1 and skips padding tokens."""

    mlm_head_attr = "lm_head"

    def prefix_position_ids(self, input_ids, n_prefix):
        embeddings = self.decoder.embeddings
        return embeddings.create_position_ids_from_input_ids(input_ids, embeddings.padding_idx, n_prefix)
