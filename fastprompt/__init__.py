"""fastprompt: a performance-first runtime for soft-prompt methods on frozen transformer backbones.

    import fastprompt
    model = fastprompt.get_peft_model(base, fastprompt.PromptTuningConfig(num_virtual_tokens=20))
    out = model(input_ids, attention_mask=mask, labels=labels)
"""

from fastprompt.config import (
    MultitaskPromptTuningConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
)
from fastprompt.ensemble import combine_predictions, mean_log_prob, score_choices
from fastprompt.io import load_training_checkpoint, save_training_checkpoint
from fastprompt.model import PromptModel, from_pretrained, get_peft_model
from fastprompt.encoder import EncoderPromptModel, template_positions  # noqa: E402  (after model: subclasses)
from fastprompt.seq2seq import Seq2SeqPromptModel  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "EncoderPromptModel",
    "MultitaskPromptTuningConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptModel",
    "PromptTuningConfig",
    "Seq2SeqPromptModel",
    "combine_predictions",
    "from_pretrained",
    "get_peft_model",
    "load_training_checkpoint",
    "mean_log_prob",
    "save_training_checkpoint",
    "score_choices",
    "template_positions",
]
