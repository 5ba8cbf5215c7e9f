"""What every prompt source gives the runtime: virtual-token embeddings or per-layer key/value prefixes.

A source owns `num_entries` bank entries (1 per adapter; MPT: one per task). Parameter names follow
PEFT's prompt encoders (`embedding.weight`, `mlp_head.*`, `transform.*`, `prefix_task_cols`, ...), so a
PEFT `prompt_encoder[name].state_dict()` loads as it is.

A method is one module: its config class and its source class, registered together
(`@register(PROMPT_TUNING, PromptTuningConfig)`: `fastprompt.methods.as_fastprompt_config` then reads its
adapter_config.json too); the runtime asks the source, never the type, what it does: `kind` (tokens or
keys/values), `routes_by_task` (rows pick one of the adapter's entries by task id), `num_entries`, and
`prompts_the_decoder` (on an encoder-decoder with two transformer submodules, the prompt's second half goes
before the decoder's tokens).
"""

from __future__ import annotations

import torch
from torch import nn

SOURCES: dict[str, type["PromptSource"]] = {}  # peft_type -> its source class, filled by `register`
CONFIGS: dict[str, type] = {}  # peft_type -> its config class (a PromptLearningConfig subclass), likewise


def register(peft_type: str, config_class: type):
    """Class decorator: the source class of `peft_type`, whose configs are `config_class` (a
    PromptLearningConfig subclass setting that peft_type)."""
    def add(cls):
        if peft_type in SOURCES:
            raise ValueError(f"peft_type {peft_type!r} already has a source: {SOURCES[peft_type].__name__}")
        if CONFIGS.setdefault(peft_type, config_class) is not config_class:
            raise ValueError(f"peft_type {peft_type!r} already has a config class: "
                             f"{CONFIGS[peft_type].__name__}")
        SOURCES[peft_type] = cls
        return cls
    return add


class PromptSource(nn.Module):
    kind: str  # "tokens": virtual-token embeddings; "kv": per-layer key/value prefixes
    routes_by_task = False  # True: the adapter holds one entry per task and task_ids picks a row's (MPT)
    prompts_the_decoder = False  # True: encoder-decoders with 2 submodules prompt the decoder too (PEFT's MPT)

    def __init__(self, config):
        super().__init__()
        self.config = config

    @classmethod
    def build(cls, config, backbone) -> "PromptSource":
        """The source of a resolved config on a backbone (which gives its sizes and word embeddings)."""
        raise NotImplementedError

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    @property
    def num_entries(self) -> int:
        return 1

    def prompts(self, entries: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """Virtual-token embeddings [len(entries), P, d] (kind "tokens"); `backend` picks the op backend of
        a source computed by a fastprompt op (MPT), as PromptModel(backend=) does for every other op."""
        raise NotImplementedError

    def prefix_kv(self, entries: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer keys and values, each [len(entries), Hkv, P, D] (kind "kv")."""
        raise NotImplementedError

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors PEFT saves in adapter_model.safetensors (the folded, inference representation)."""
        raise NotImplementedError

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what `peft_state_dict` (or PEFT) saved; raises ValueError naming a missing or bad key."""
        raise NotImplementedError


def load_tensor(param: torch.Tensor, state: dict[str, torch.Tensor], key: str) -> None:
    """Copy state[key] into param after checking presence and shape."""
    if key not in state:
        raise ValueError(f"checkpoint is missing the tensor {key!r} (has {sorted(state)})")
    value = state[key]
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, expected "
                         f"{tuple(param.shape)} for this config and model")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))
