"""Prefix tuning (Li & Liang): trainable keys and values for every layer, optionally through an MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastprompt.config import PREFIX_SITES, PromptLearningConfig
from fastprompt.methods.base import PromptSource, load_tensor, register

PREFIX_TUNING = "PREFIX_TUNING"


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang): per-layer key/value prefixes, optionally through an MLP.

    prefix_sites (fastprompt's addition, encoder-decoders only): None is PEFT's layout (the decoder's
    self-attention); a list of PREFIX_SITES prefixes each named attention, num_layers per site.
    """

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None
    prefix_sites: list[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PREFIX_TUNING
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")
        if self.prefix_sites is not None:
            sites = list(self.prefix_sites)
            if not sites or len(set(sites)) != len(sites) or not set(sites) <= set(PREFIX_SITES):
                raise ValueError(f"prefix_sites must be None or distinct names from {PREFIX_SITES}, got "
                                 f"{self.prefix_sites!r}")
            self.prefix_sites = [s for s in PREFIX_SITES if s in sites]  # one order for the parameter layout


@register(PREFIX_TUNING, PrefixTuningConfig)
class PrefixTuning(PromptSource):
    """Parameters in PEFT's layout: [P, num_layers * 2 * token_dim], token_dim = Hkv * head_dim.

    With `prefix_projection` (training only) that matrix is the output of a two-layer tanh MLP over
    [P, token_dim] embeddings; saved adapters hold the folded matrix.
    """

    kind = "kv"

    @classmethod
    def build(cls, config, backbone):
        return cls(config, backbone.num_kv_heads, backbone.head_dim)

    def __init__(self, config, num_kv_heads: int, head_dim: int):
        super().__init__(config)
        if config.token_dim != num_kv_heads * head_dim:
            raise ValueError(f"prefix tuning token_dim must be num_key_value_heads * head_dim = "
                             f"{num_kv_heads} * {head_dim} for this model, got {config.token_dim}")
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        P, L, d = config.num_virtual_tokens, config.num_layers, config.token_dim
        zero = config.init_weights == "zero"
        if config.prefix_projection and not config.inference_mode:
            self.embedding = nn.Embedding(P, d)
            self.transform = nn.Sequential(nn.Linear(d, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, L * 2 * d))
            if zero:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(P, L * 2 * d)
            if zero:
                nn.init.zeros_(self.embedding.weight)

    def flat(self) -> torch.Tensor:
        """[P, num_layers * 2 * token_dim], the matrix PEFT saves."""
        if hasattr(self, "transform"):
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def prefix_kv(self, entries):
        P, L = self.config.num_virtual_tokens, self.config.num_layers
        # PEFT's view: [P, L*2, Hkv, D]; layer i's keys are slot 2i, its values slot 2i + 1.
        kv = self.flat().view(P, L * 2, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        kv = kv[:, None].expand(-1, len(entries), -1, -1, -1)  # [L*2, n, Hkv, P, D]
        return list(kv[0::2]), list(kv[1::2])

    def peft_state_dict(self):
        return {"prompt_embeddings": self.flat().detach()}

    def load_peft_state_dict(self, state):
        if hasattr(self, "transform"):
            raise ValueError("a prefix-tuning adapter file holds folded key/values only; load it with "
                             "inference_mode=True (no projection MLP), or resume from a training checkpoint")
        load_tensor(self.embedding.weight, state, "prompt_embeddings")
