"""The methods: each one module holding its config class and its prompt source, registered together by
peft_type (`methods.base.register`); `build_source` and `load_source` make a source from a config or an
adapter folder, `as_fastprompt_config` and `resolve_config` (`fastprompt/methods/configs.py`) read and fill
configs. Importing this package registers every method."""

from __future__ import annotations

import dataclasses

import torch

from fastprompt import io
from fastprompt.methods.base import SOURCES, PromptSource
from fastprompt.methods.configs import as_fastprompt_config, resolve_config
from fastprompt.methods.mpt import MULTITASK_PROMPT_TUNING, MultitaskPromptTuning, MultitaskPromptTuningConfig
from fastprompt.methods.p_tuning import P_TUNING, PromptEncoderConfig, PTuning
from fastprompt.methods.prefix_tuning import PREFIX_TUNING, PrefixTuning, PrefixTuningConfig
from fastprompt.methods.prompt_tuning import PROMPT_TUNING, PromptTuning, PromptTuningConfig


def source_class(peft_type: str) -> type[PromptSource]:
    """The registered source class of a method (`methods.base.register`)."""
    if peft_type not in SOURCES:
        raise ValueError(f"unsupported peft_type {peft_type!r}; fastprompt has {sorted(SOURCES)}")
    return SOURCES[peft_type]


def build_source(config, backbone) -> PromptSource:
    """The prompt source for a resolved config (see `resolve_config`) on a backbone."""
    cls = source_class(config.peft_type)
    if cls.kind == "tokens" and (config.num_transformer_submodules or 1) > 1:
        # As PEFT's prompt encoders: num_virtual_tokens per transformer submodule (encoder-decoders: 2).
        config = dataclasses.replace(config, num_virtual_tokens=config.num_virtual_tokens
                                     * config.num_transformer_submodules)
    return cls.build(config, backbone)


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
           "check_file_shapes", "load_source", "source_class", "as_fastprompt_config", "resolve_config",
           "PromptTuningConfig", "PromptEncoderConfig", "PrefixTuningConfig", "MultitaskPromptTuningConfig",
           "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING"]
