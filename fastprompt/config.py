"""What every adapter config shares, with PEFT's field names (`PromptLearningConfig`), so PEFT configs and
`adapter_config.json` files map 1:1.

Each method's own config class lives beside its prompt source (`fastprompt/methods/<method>.py`) and is
registered with it; reading a config from a PEFT object or a JSON dict (`as_fastprompt_config`) and filling
it from a model (`resolve_config`) are `fastprompt.methods`'s, where every method is registered.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# PEFT's task types for the backbone kinds fastprompt wraps: causal decoders, encoder-decoders, encoders
# (a sequence classifier, or a masked-LM head scored as features).
TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "FEATURE_EXTRACTION")
# Attentions of an encoder-decoder that prefix tuning can reach: PEFT prefixes the decoder's self-attention;
# Li & Liang also the encoder's self-attention and the decoder's cross-attention.
PREFIX_SITES = ("encoder", "decoder", "cross")


# Fields fastprompt adds to PEFT's configs, and the JSON type each holds ("strings": a list of strings). A save
# keeps them out of adapter_config.json (PEFT warns on a field it does not know) in fastprompt_config.json
# beside it (`fastprompt.io.save_adapter`).
FASTPROMPT_FIELDS = {"class_label_words": "strings", "prefix_sites": "strings", "encoder_residual": "bool"}


def check_positive_int(name: str, value) -> None:
    """ValueError naming `name` unless value is an int >= 1 (True is an int in Python, not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class PromptLearningConfig:
    """Fields every soft-prompt method shares (PEFT's `PromptLearningConfig`)."""

    num_virtual_tokens: int = None
    task_type: str | None = "CAUSAL_LM"
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    modules_to_save: list[str] | None = None
    peft_type: str = field(default=None, init=False)

    def __post_init__(self):
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        self.task_type = enum_value(self.task_type)
        if self.task_type not in (None, *TASK_TYPES):
            raise ValueError(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def enum_value(value):
    """A PEFT enum member's value (PEFT configs hold enums where the JSON holds strings), else value."""
    return getattr(value, "value", value)
