"""Prompt tuning (Lester et al.): P trainable virtual-token embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastprompt.config import PromptLearningConfig, enum_value
from fastprompt.methods.base import PromptSource, load_tensor, register

PROMPT_TUNING = "PROMPT_TUNING"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al.). prompt_tuning_init: RANDOM, SAMPLE_VOCAB, TEXT or CLASS_LABELS.

    CLASS_LABELS (fastprompt's addition, as in Lester et al.) initialises the first virtual tokens from
    the embeddings of the verbalizer words in `class_label_words` (each word's tokens, in order), the rest
    from tokens sampled from the vocabulary; it needs `tokenizer_name_or_path`.
    """

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    class_label_words: list[str] | None = None
    _inits = ("RANDOM", "SAMPLE_VOCAB", "TEXT", "CLASS_LABELS")

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PROMPT_TUNING
        self.prompt_tuning_init = enum_value(self.prompt_tuning_init)
        if self.prompt_tuning_init not in self._inits:
            raise ValueError(f"prompt_tuning_init must be one of {self._inits}, got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init in ("TEXT", "CLASS_LABELS") and not self.tokenizer_name_or_path:
            raise ValueError(f"prompt_tuning_init={self.prompt_tuning_init!r} needs tokenizer_name_or_path "
                             "(a local tokenizer folder)")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        if self.prompt_tuning_init == "CLASS_LABELS" and not self.class_label_words:
            raise ValueError("prompt_tuning_init='CLASS_LABELS' needs class_label_words (the verbalizers)")


def load_tokenizer(path: str, kwargs: dict | None = None):
    """A tokenizer from a local folder (nothing is downloaded)."""
    from transformers import AutoTokenizer

    kwargs = dict(kwargs or {})
    kwargs.pop("trust_remote_code", None)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(f"tokenizer_name_or_path={path!r}: no tokenizer could be loaded from that local "
                         f"folder ({error})") from error


def repeat_to_length(ids: list[int], total: int) -> list[int]:
    """PEFT's TEXT rule: the text's ids repeated to fill `total` virtual tokens, then cut."""
    return (list(ids) * -(-total // len(ids)))[:total]


def init_token_ids(config, vocab_size: int, total: int) -> torch.Tensor | None:
    """Token ids whose embeddings initialise the prompt, or None for RANDOM (PEFT's rules for TEXT)."""
    init = config.prompt_tuning_init
    if init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (total,))
    if init == "TEXT":
        ids = load_tokenizer(config.tokenizer_name_or_path, config.tokenizer_kwargs)(
            config.prompt_tuning_init_text)["input_ids"]
        return torch.tensor(repeat_to_length(ids, total))
    if init == "CLASS_LABELS":
        tokenizer = load_tokenizer(config.tokenizer_name_or_path, config.tokenizer_kwargs)
        ids = [i for word in config.class_label_words
               for i in tokenizer(word, add_special_tokens=False)["input_ids"]][:total]
        return torch.cat([torch.tensor(ids, dtype=torch.long), torch.randint(0, vocab_size, (total - len(ids),))])
    return None


@register(PROMPT_TUNING, PromptTuningConfig)
class PromptTuning(PromptSource):
    kind = "tokens"

    @classmethod
    def build(cls, config, backbone):
        return cls(config, backbone.word_embeddings)

    def __init__(self, config, word_embeddings: nn.Embedding):
        super().__init__(config)
        total = config.num_virtual_tokens
        self.embedding = nn.Embedding(total, config.token_dim)
        ids = None if config.inference_mode else init_token_ids(config, word_embeddings.num_embeddings, total)
        if ids is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(word_embeddings.weight[ids.to(word_embeddings.weight.device)].float())

    def prompts(self, entries: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        return self.embedding.weight[None].expand(len(entries), -1, -1)

    def peft_state_dict(self):
        return {"prompt_embeddings": self.embedding.weight.detach()}

    def load_peft_state_dict(self, state):
        load_tensor(self.embedding.weight, state, "prompt_embeddings")
