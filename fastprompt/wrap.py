"""Wrapping a Hugging Face model: the PromptModel class for its kind, with a new adapter or a saved one.

This is PEFT's `get_peft_model` / `PeftModel.from_pretrained` entry, and the one module that knows every
PromptModel class: it sits above `fastprompt/model.py` (causal decoders), `fastprompt/seq2seq.py` and
`fastprompt/encoder.py`, which import the model module and never this one (ARCHITECTURE.md, "Layers").
"""

from __future__ import annotations

from torch import nn

from fastprompt.backbones import get_backbone
from fastprompt.encoder import EncoderPromptModel
from fastprompt.model import PromptModel
from fastprompt.seq2seq import Seq2SeqPromptModel


def prompt_model_class(model: nn.Module) -> type[PromptModel]:
    """The PromptModel class for a Hugging Face model's kind: causal decoder, encoder-decoder or encoder."""
    kind = get_backbone(model).kind
    if kind == "seq2seq":
        return Seq2SeqPromptModel
    if kind == "encoder":
        return EncoderPromptModel
    return PromptModel


def get_peft_model(model: nn.Module, peft_config, adapter_name: str = "default", **kwargs) -> PromptModel:
    """Wrap a Hugging Face model (causal LM, T5/BART, BERT/RoBERTa) with a new soft-prompt adapter (PEFT's
    or fastprompt's config); the class follows the model's kind (`prompt_model_class`)."""
    return prompt_model_class(model)(model, peft_config, adapter_name, **kwargs)


def from_pretrained(model: nn.Module, adapter_dir, adapter_name: str = "default", is_trainable: bool = False,
                    **kwargs) -> PromptModel:
    """Wrap a Hugging Face model with an adapter saved by fastprompt or PEFT."""
    prompt_model = prompt_model_class(model)(model, None, **kwargs)
    prompt_model.load_adapter(adapter_dir, adapter_name, is_trainable=is_trainable)
    return prompt_model
