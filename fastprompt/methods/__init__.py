"""Prompt sources, one per method, and `build_source` choosing by config."""

from __future__ import annotations

import dataclasses

from fastprompt.config import MULTITASK_PROMPT_TUNING, P_TUNING, PREFIX_TUNING, PROMPT_TUNING
from fastprompt.methods.base import PromptSource
from fastprompt.methods.mpt import MultitaskPromptTuning
from fastprompt.methods.p_tuning import PTuning
from fastprompt.methods.prefix_tuning import PrefixTuning
from fastprompt.methods.prompt_tuning import PromptTuning


def build_source(config, backbone) -> PromptSource:
    """The prompt source for a resolved config (see `fastprompt.config.resolve_config`) on a backbone."""
    if config.peft_type != PREFIX_TUNING and (config.num_transformer_submodules or 1) > 1:
        # As PEFT's prompt encoders: num_virtual_tokens per transformer submodule (encoder-decoders: 2).
        config = dataclasses.replace(config, num_virtual_tokens=config.num_virtual_tokens
                                     * config.num_transformer_submodules)
    if config.peft_type == PROMPT_TUNING:
        return PromptTuning(config, backbone.word_embeddings)
    if config.peft_type == MULTITASK_PROMPT_TUNING:
        return MultitaskPromptTuning(config, backbone.word_embeddings)
    if config.peft_type == P_TUNING:
        return PTuning(config)
    if config.peft_type == PREFIX_TUNING:
        return PrefixTuning(config, backbone.num_kv_heads, backbone.head_dim)
    raise ValueError(f"unsupported peft_type {config.peft_type!r}")


__all__ = ["PromptSource", "PromptTuning", "PTuning", "PrefixTuning", "MultitaskPromptTuning", "build_source"]
