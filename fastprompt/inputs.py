"""Checks of the user-facing arguments of `PromptModel.forward`, `hidden_states` and `generate`: each
raises a ValueError naming the argument and what it allows, before anything reaches the backbone (where
the same mistakes surface as an IndexError from an embedding or a shape error deep in attention).

Host cost. These run on every forward, at tiny shapes too, so they read a tensor's values only where that
is free: the vocabulary range of CPU token ids (on an accelerator, reading a minimum or maximum is a host
sync; there the op's kernels trust the caller, as `fastprompt.ops` documents). The rest are type, dtype
and shape checks.
"""

from __future__ import annotations

import numbers

import torch

from fastprompt.ops import check_index_values

SEED_RANGE = (-2**63, 2**64)  # what torch.Generator.manual_seed takes


def check_input_ids(input_ids, vocab_size: int) -> None:
    """input_ids: an int64 (or int32) tensor [B, T] with B, T >= 1 and every id in [0, vocab_size)."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor [B, T] of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an int64 (or int32) tensor of token ids, got {input_ids.dtype}")
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids must have shape [B, T] with B >= 1 rows of T >= 1 tokens, got "
                         f"{tuple(input_ids.shape)}")
    check_index_values("input_ids", input_ids, 0, vocab_size, "the vocabulary")


def check_routing(model, task_ids, adapter_names) -> None:
    """task_ids and adapter_names together only where task_ids has a meaning beside the adapter's name: the
    task within a multitask (MPT) adapter. Otherwise adapter_names would silently win."""
    if task_ids is None or adapter_names is None or isinstance(adapter_names, str):
        return
    for i, name in enumerate(adapter_names):
        if name in model.prompt_sources and not model.prompt_sources[name].routes_by_task:
            raise ValueError(f"pass task_ids or adapter_names, not both: adapter_names picks each row's adapter, "
                             f"and task_ids only picks the task within a multitask (MPT) adapter, while "
                             f"adapter_names[{i}]={name!r} is {model.peft_config[name].peft_type}")


def check_model_inputs(model, input_ids, task_ids, adapter_names) -> None:
    """The checks of `forward` and `hidden_states` (input_ids may be None when inputs_embeds is given)."""
    if input_ids is not None:
        check_input_ids(input_ids, model.backbone.vocab_size)
    check_routing(model, task_ids, adapter_names)


def check_generate_inputs(model, input_ids, task_ids, adapter_names, seed, pad_token_id) -> None:
    """The checks of `generate`: those of `forward`, and seed (an int in [-2**63, 2**64)) and pad_token_id
    (a token id in [0, V))."""
    if input_ids is None:
        raise ValueError("input_ids is required: an int64 tensor [B, T] of token ids")
    check_model_inputs(model, input_ids, task_ids, adapter_names)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not SEED_RANGE[0] <= seed < SEED_RANGE[1]):
        raise ValueError(f"seed must be an int in [-2**63, 2**64), got {seed!r}")
    vocab = model.backbone.vocab_size
    if pad_token_id is not None and (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral)
                                     or not 0 <= pad_token_id < vocab):
        raise ValueError(f"pad_token_id must be a token id in [0, {vocab}), got {pad_token_id!r}")
