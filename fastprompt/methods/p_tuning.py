"""P-tuning (Liu et al.): virtual tokens produced by a prompt encoder (MLP, or bidirectional LSTM + MLP).

Saved adapters hold the encoder's output only (PEFT's format); a model loaded from one has no encoder
(`inference_mode`) and serves, or keeps tuning, that output directly. Training checkpoints
(`fastprompt.io.save_training_checkpoint`) keep the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastprompt.config import PromptLearningConfig, enum_value
from fastprompt.methods.base import PromptSource, load_tensor, register

P_TUNING = "P_TUNING"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al.): virtual tokens produced by an MLP or a bidirectional LSTM + MLP."""

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = P_TUNING
        self.encoder_reparameterization_type = enum_value(self.encoder_reparameterization_type)
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ValueError("encoder_reparameterization_type must be 'MLP' or 'LSTM', got "
                             f"{self.encoder_reparameterization_type!r}")


@register(P_TUNING, PromptEncoderConfig)
class PTuning(PromptSource):
    kind = "tokens"

    @classmethod
    def build(cls, config, backbone):
        return cls(config)

    def __init__(self, config):
        super().__init__(config)
        d, hidden = config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Embedding(config.num_virtual_tokens, d)
        self.encoder_type = config.encoder_reparameterization_type
        if config.inference_mode:
            return
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(d, hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, d))

    @property
    def has_encoder(self) -> bool:
        return hasattr(self, "mlp_head")

    def encoded(self) -> torch.Tensor:
        """The virtual tokens [P, d]: the encoder's output, or the stored tokens without an encoder."""
        tokens = self.embedding.weight
        if not self.has_encoder:
            return tokens
        if self.encoder_type == "LSTM":
            tokens = self.lstm_head(tokens[None])[0][0]
        return self.mlp_head(tokens)

    def prompts(self, entries: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        return self.encoded()[None].expand(len(entries), -1, -1)

    def peft_state_dict(self):
        return {"prompt_embeddings": self.encoded().detach()}

    def load_peft_state_dict(self, state):
        if self.has_encoder:
            raise ValueError("a P-tuning adapter file holds encoded virtual tokens only; load it with "
                             "inference_mode=True (no encoder), or resume from a training checkpoint")
        load_tensor(self.embedding.weight, state, "prompt_embeddings")
