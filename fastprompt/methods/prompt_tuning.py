"""Prompt tuning (Lester et al.): P trainable virtual-token embeddings."""

from __future__ import annotations

import torch
from torch import nn

from fastprompt.config import PROMPT_TUNING, PromptTuningConfig
from fastprompt.methods.base import PromptSource, load_tensor, register


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


def init_token_ids(config, vocab_size: int, total: int) -> torch.Tensor | None:
    """Token ids whose embeddings initialise the prompt, or None for RANDOM (PEFT's rules for TEXT)."""
    init = config.prompt_tuning_init
    if init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (total,))
    if init == "TEXT":
        ids = load_tokenizer(config.tokenizer_name_or_path, config.tokenizer_kwargs)(
            config.prompt_tuning_init_text)["input_ids"]
        reps = -(-total // len(ids))  # repeat the text to fill the prompt, then cut
        return torch.tensor((ids * reps)[:total])
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
