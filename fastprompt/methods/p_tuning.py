"""P-tuning (Liu et al.): virtual tokens produced by a prompt encoder (MLP, or bidirectional LSTM + MLP).

With `encoder_residual` (fastprompt's addition) the virtual tokens are the encoder's input table plus its output,
the skip of residual prompt tuning (Razdaibiedina et al. 2023), and the encoder's last layer starts at zero: the
untuned prompt is the table itself, so a table set to a text's embeddings (`fastprompt.train.encoder_init`) makes
the model read that text before training, as prompt tuning's TEXT start does.

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
    """P-tuning (Liu et al.): virtual tokens produced by an MLP or a bidirectional LSTM + MLP.

    encoder_residual (fastprompt's, not PEFT's; saved in fastprompt_config.json): the virtual tokens are the
    input table plus the encoder's output, whose last layer starts at zero (module docstring)."""

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    encoder_residual: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = P_TUNING
        if not isinstance(self.encoder_residual, bool):
            raise ValueError(f"encoder_residual must be True or False, got {self.encoder_residual!r}")
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
        if config.encoder_residual:   # the encoder adds nothing yet: the prompt starts as the table
            nn.init.zeros_(self.mlp_head[-1].weight)
            nn.init.zeros_(self.mlp_head[-1].bias)

    @property
    def has_encoder(self) -> bool:
        return hasattr(self, "mlp_head")

    def encoded(self) -> torch.Tensor:
        """The virtual tokens [P, d]: the encoder's output (plus its input with `encoder_residual`), or the
        stored tokens without an encoder."""
        table = self.embedding.weight
        if not self.has_encoder:
            return table
        hidden = self.lstm_head(table[None])[0][0] if self.encoder_type == "LSTM" else table
        encoded = self.mlp_head(hidden)
        return table + encoded if self.config.encoder_residual else encoded

    def prompts(self, entries: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        return self.encoded()[None].expand(len(entries), -1, -1)

    def peft_state_dict(self):
        return {"prompt_embeddings": self.encoded().detach()}

    def load_peft_state_dict(self, state):
        if self.has_encoder:
            raise ValueError("a P-tuning adapter file holds encoded virtual tokens only; load it with "
                             "inference_mode=True (no encoder), or resume from a training checkpoint")
        load_tensor(self.embedding.weight, state, "prompt_embeddings")
