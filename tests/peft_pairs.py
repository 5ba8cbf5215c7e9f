"""A PEFT model and a fastprompt model over one frozen backbone, with identical prompt parameters."""

from __future__ import annotations

import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

import fastprompt  # noqa: E402
from tests.tiny_models import tiny_model  # noqa: E402

P = 5
METHODS = {
    "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
    "prefix_projection": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                         prefix_projection=True, encoder_hidden_size=24),
    "p_tuning_mlp": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                     encoder_hidden_size=24),
    "p_tuning_lstm": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                      encoder_reparameterization_type="LSTM",
                                                      encoder_hidden_size=16),
    "mpt": lambda: peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, num_tasks=3,
                                                    num_ranks=2),
}
VIRTUAL_TOKEN_METHODS = ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "mpt"]


def peft_and_fastprompt(family: str, method: str, seed: int = 0):
    """(peft_model, fastprompt_model) sharing the base model and the prompt parameters."""
    base = tiny_model(family, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(base, METHODS[method]())
    ours = fastprompt.get_peft_model(base, METHODS[method]())
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # randomise every prompt parameter (PEFT zero-inits some, e.g. MPT factors)
        for param in peft_model.prompt_encoder["default"].parameters():
            param.normal_(0.0, 0.5)
    ours.prompt_sources["default"].load_state_dict(peft_model.prompt_encoder["default"].state_dict())
    return peft_model, ours


def task_ids_for(method: str, batch_size: int):
    return torch.tensor([2, 0, 1, 2][:batch_size]) if method == "mpt" else None


def prompt_grads(module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
