"""The one place that knows model families: a small adapter per family, found by `config.model_type`."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from fastprompt.backbones import patches
from fastprompt.backbones.attention import ATTENTION_NAME, AttentionContext

_REGISTRY: dict[str, type["Backbone"]] = {}


def register_backbone(*model_types: str):
    """Class decorator: use this adapter for HF models whose `config.model_type` is in model_types."""
    def wrap(cls):
        for name in model_types:
            _REGISTRY[name] = cls
        return cls
    return wrap


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone(model: nn.Module) -> "Backbone":
    """The adapter for a Hugging Face causal LM; ValueError naming the model type if unsupported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(f"model family {model_type!r} is not supported; supported model_type values: "
                         f"{supported_model_types()}")
    return _REGISTRY[model_type](model)


class Backbone:
    """A frozen HF causal LM seen through what fastprompt needs of it.

    Subclasses name the decoder stack and read the attention geometry from the config.
    """

    decoder_attr: str  # attribute of the *ForCausalLM model holding the decoder stack
    layers_attr: str   # attribute of the decoder stack holding its layers
    kind = "causal"    # "causal" | "seq2seq" | "encoder": which PromptModel class wraps it
    task_type = "CAUSAL_LM"  # PEFT's task type for adapters on this model

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.decoder = getattr(model, self.decoder_attr)

    # geometry --------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_positions(self) -> int | None:
        """Position ids must stay below this (learned position embeddings); None where positions are
        computed (RoPE) and have no hard limit."""
        return None

    @property
    def sliding_window(self) -> int | None:
        """Keys a query may see in sliding-window layers; None where attention has no window. fastprompt's
        prefix attention applies no window, so it is exact while prefix + own keys stay within it."""
        return None

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""
        return getattr(self.decoder, self.layers_attr)

    @property
    def dtype(self) -> torch.dtype:
        return self.word_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.word_embeddings.weight.device

    # forward ---------------------------------------------------------------------------------
    def hidden_states(self, *, input_ids=None, inputs_embeds=None, position_ids=None, attention_mask=None,
                      ctx: AttentionContext | None = None) -> torch.Tensor:
        """Last hidden states [B, T, d] of the decoder stack (no LM head).

        With `ctx`, attention is fastprompt's (`backbones/attention.py`) and `attention_mask` must be
        None (padding travels in ctx); without it, the model's own attention and mask are used.
        """
        kwargs = dict(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
                      attention_mask=attention_mask, use_cache=False)
        if ctx is None:
            return self.decoder(**kwargs).last_hidden_state
        with self.attention_implementation(ATTENTION_NAME):
            return self.decoder(**kwargs, fastprompt_ctx=ctx).last_hidden_state

    def frozen_op_replacements(self) -> list[tuple[nn.Module, Callable]]:
        """(module, forward) pairs routing this family's norms and activations through fastprompt.ops
        (`backbones/patches.py`); none by default."""
        return []

    @contextmanager
    def attention_implementation(self, name: str):
        """Switch the model's attention implementation for the duration of a call, then restore it."""
        configs = self._distinct_attention_configs()
        previous = [(c, c._attn_implementation) for c in configs]
        for c in configs:
            c._attn_implementation = name
        try:
            yield
        finally:
            for c, impl in previous:
                c._attn_implementation = impl

    def _distinct_attention_configs(self) -> list:
        # Found once: every training forward switches them, and a transformers config's attribute reads
        # cost microseconds each.
        if "_attention_configs" not in self.__dict__:
            self._attention_configs = list({id(c): c for c in self.attention_configs()}.values())
        return self._attention_configs

    def attention_configs(self) -> list:
        """The config objects whose `_attn_implementation` the model's attention layers read."""
        return [self.config, self.decoder.config]


@register_backbone("llama", "mistral", "qwen2", "qwen3")
class LlamaFamily(Backbone):
    """Llama, Mistral, Qwen2, Qwen3: RoPE, grouped-query attention, head_dim from the config."""

    decoder_attr = "model"
    layers_attr = "layers"

    @property
    def sliding_window(self) -> int | None:
        """Keys a query may see in the model's windowed layers (Mistral, Qwen2 with use_sliding_window);
        None without such layers."""
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None)
        if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
            return None
        return window

    def frozen_op_replacements(self):
        replacements = []
        swiglu = getattr(self.config, "hidden_act", None) == "silu"
        for module in self.decoder.modules():
            if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
                replacements.append((module, patches.rms_norm_forward))
            elif swiglu and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                replacements.append((module, patches.swiglu_mlp_forward))
        return replacements


@register_backbone("gpt2")
class GPT2(Backbone):
    """GPT-2: learned absolute positions, multi-head attention."""

    decoder_attr = "transformer"
    layers_attr = "h"
    GELU_FORMS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}

    @property
    def max_positions(self) -> int:
        return self.config.n_positions

    def frozen_op_replacements(self):
        replacements = [(m, patches.layer_norm_forward) for m in self.decoder.modules()
                        if isinstance(m, nn.LayerNorm)]
        approximate = self.GELU_FORMS.get(self.config.activation_function)
        if approximate is not None:
            replacements += [(layer.mlp.act, patches.gelu_forward(approximate)) for layer in self.layers]
        return replacements
