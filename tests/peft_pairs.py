"""A PEFT model and a fastprompt model over one frozen backbone, with identical prompt parameters."""

from __future__ import annotations

import inspect
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


# PEFT 0.21.2's prefix tuning for sequence classification calls the encoder (BertModel, RobertaModel) with
# past_key_values and refuses with exactly this message when the encoder's forward signature lacks the name.
PEFT_PREFIX_REFUSAL = "Model does not support past key values which are required for prefix tuning."


def peft_forward(peft_model, **kwargs):
    """PEFT's forward, also where PEFT 0.21.2 refuses prefix tuning on an encoder that takes the prefix as `cache`.

    transformers 5.25 renamed the encoders' past_key_values to `cache` (the old name is a deprecated alias kept
    out of the signature), so PEFT's signature check refuses before running. Only on exactly that refusal, and
    only when the encoder's forward takes `cache`, PEFT's own forward runs again with the encoder seen through a
    forward that names past_key_values and passes it on as `cache`: the prefix layout, attention mask, pooling,
    dropout, head and loss all stay PEFT's. Any other error propagates; once PEFT accepts the encoder, its
    forward runs untouched."""
    try:
        return peft_model(**kwargs)
    except ValueError as error:
        if str(error) != PEFT_PREFIX_REFUSAL:
            raise
        encoder = peft_model.base_model.get_submodule(peft_model.transformer_backbone_name)
        if "cache" not in inspect.signature(encoder.forward).parameters:
            raise
    takes_cache = encoder.forward

    def forward(*args, past_key_values=None, **other):
        return takes_cache(*args, cache=past_key_values, **other)

    encoder.forward = forward
    try:
        return peft_model(**kwargs)
    finally:
        del encoder.forward
