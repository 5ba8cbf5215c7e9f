"""Adapter configs read and resolved: `as_fastprompt_config` makes a registered method's config from a
fastprompt config, a PEFT config object (duck-typed by `peft_type`, so PEFT need not be installed) or a dict as
found in `adapter_config.json`; `resolve_config` fills the fields a model decides (layers, widths, heads,
task type) from a backbone, as PEFT does, and checks the ones given. Each config class lives beside its
source (`fastprompt/methods/<method>.py`), registered with it (`methods.base.register`)."""

from __future__ import annotations

import dataclasses
import warnings

from fastprompt.config import PromptLearningConfig, enum_value
from fastprompt.methods.base import CONFIGS, SOURCES

# Fields PEFT writes that carry nothing fastprompt needs.
_PEFT_ONLY_FIELDS = {"auto_mapping", "peft_version", "task_type"}


def as_fastprompt_config(config) -> PromptLearningConfig:
    """A fastprompt config from a fastprompt config, a PEFT config or an adapter_config.json dict."""
    if isinstance(config, PromptLearningConfig):
        return config
    if not isinstance(config, dict):
        if not hasattr(config, "to_dict") or not hasattr(config, "peft_type"):
            raise ValueError(f"config must be a fastprompt or PEFT prompt-learning config or a dict, got "
                             f"{type(config).__name__}")
        config = config.to_dict()
    peft_type = enum_value(config.get("peft_type"))
    if peft_type not in CONFIGS:
        raise ValueError(f"peft_type must be one of {sorted(CONFIGS)} (prompt-learning methods), got "
                         f"{peft_type!r}")
    cls = CONFIGS[peft_type]
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    ignored = sorted(k for k in config if k not in names and k != "peft_type" and config[k] is not None)
    ignored = [k for k in ignored if k not in _PEFT_ONLY_FIELDS]
    if ignored:
        warnings.warn(f"{cls.__name__}: ignoring fields fastprompt does not use: {ignored}")
    return cls(**{k: enum_value(v) for k, v in config.items() if k in names})


def resolve_config(config, backbone):
    """Fill the model-derived fields as PEFT does (num_layers, token_dim, heads, encoder_hidden_size,
    num_transformer_submodules, task_type; for SEQ_CLS the trainable head in modules_to_save) and check the
    ones given against the model."""
    config = dataclasses.replace(as_fastprompt_config(config))
    kind = backbone.kind
    sites = getattr(config, "prefix_sites", None)
    if sites is not None and kind != "seq2seq":
        raise ValueError(f"prefix_sites applies to encoder-decoder models only; leave it None for "
                         f"{backbone.config.model_type} ({kind})")
    if SOURCES[config.peft_type].kind == "kv":  # per-layer keys/values: the key/value heads' width
        token_dim, heads = backbone.num_kv_heads * backbone.head_dim, backbone.num_kv_heads
    else:
        token_dim, heads = backbone.hidden_size, backbone.num_heads
    # With prefix_sites, the prefix holds num_layers layers for each site.
    expected = {"num_layers": backbone.num_layers * len(sites or [None]), "token_dim": token_dim,
                "num_attention_heads": heads}
    if kind == "seq2seq":
        # PEFT's default on encoder-decoders: one prompt for the encoder, one for the decoder.
        if config.num_transformer_submodules is None:
            config.num_transformer_submodules = 2
        elif config.num_transformer_submodules not in (1, 2):
            raise ValueError(f"config.num_transformer_submodules must be 1 or 2 on an encoder-decoder, got "
                             f"{config.num_transformer_submodules}")
    else:
        expected["num_transformer_submodules"] = 1
    for name, value in expected.items():
        given = getattr(config, name)
        if given is None:
            setattr(config, name, value)
        elif given != value:
            raise ValueError(f"config.{name}={given} does not match the model ({name}={value} for "
                             f"{backbone.config.model_type})")
    # CAUSAL_LM is the configs' default, so on another kind of model it stands for "not given".
    if config.task_type is None or (config.task_type == "CAUSAL_LM" and kind != "causal"):
        config.task_type = backbone.task_type
    elif config.task_type != backbone.task_type:
        raise ValueError(f"config.task_type={config.task_type!r} does not match the model (task_type="
                         f"{backbone.task_type!r} for {type(backbone.model).__name__})")
    if config.task_type == "SEQ_CLS":
        # As PeftModelForSequenceClassification: the classifier ("classifier" or "score") trains too.
        config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), "classifier", "score"]))
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(backbone.config, "name_or_path", None) or None
    return config
