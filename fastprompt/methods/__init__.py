"""Prompt sources, one per method, and `build_source` choosing by config."""

from __future__ import annotations

import dataclasses

import torch

from fastprompt import io
from fastprompt.config import (MULTITASK_PROMPT_TUNING, P_TUNING, PREFIX_TUNING, PROMPT_TUNING, as_fastprompt_config,
                               resolve_config)
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


def check_file_shapes(where, config, tensors: dict[str, torch.Tensor], backbone) -> None:
    """ValueError naming `where` (the adapter folder) unless `tensors` (an adapter file's) have exactly the
    shapes `config` gives on this backbone. The expected shapes come from the source built on the meta
    device, so a config asking for more than its file holds (num_virtual_tokens=50_000_000 beside a
    3-token file) is refused before anything is allocated."""
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in build_source(config, backbone).peft_state_dict().items()}
    found = {key: tuple(value.shape) for key, value in tensors.items()}
    for key, shape in expected.items():
        if key not in found:
            raise ValueError(f"adapter {str(where)!r}: the weights file has no tensor {key!r} (has {sorted(found)})")
        if found[key] != shape:
            raise ValueError(f"adapter {str(where)!r}: adapter_config.json (num_virtual_tokens="
                             f"{config.num_virtual_tokens}) needs {key!r} of shape {shape}, the weights file holds "
                             f"{found[key]}")


def load_source(adapter_dir, backbone):
    """(config, source) of a PEFT or fastprompt adapter folder on `backbone`: the resolved config
    (inference_mode True: the file holds the folded prompt, no encoder or projection) and its prompt source on
    the backbone's device, parameters frozen. Raises (OSError, ValueError naming the folder) before
    allocating anything for a file whose tensors do not match its config."""
    config_dict, tensors = io.load_adapter_files(adapter_dir)
    config = as_fastprompt_config(config_dict)
    config.inference_mode = True
    config = resolve_config(config, backbone)
    check_file_shapes(adapter_dir, config, tensors, backbone)
    source = build_source(config, backbone)
    source.load_peft_state_dict(tensors)
    source.requires_grad_(False)
    return config, source.to(backbone.device)


__all__ = ["PromptSource", "PromptTuning", "PTuning", "PrefixTuning", "MultitaskPromptTuning", "build_source",
           "check_file_shapes", "load_source"]
