"""Adapter configs with PEFT's field names, so PEFT configs and `adapter_config.json` files map 1:1.

`as_fastprompt_config` accepts one of these, a PEFT config object (duck-typed by `peft_type`, so PEFT
need not be installed) or a dict as found in `adapter_config.json`. `resolve_config` fills the fields a model
decides (layers, widths, heads, task type) from a backbone, as PEFT does, and checks the ones given.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

PROMPT_TUNING = "PROMPT_TUNING"
PREFIX_TUNING = "PREFIX_TUNING"
P_TUNING = "P_TUNING"
MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
# PEFT's task types for the backbone kinds fastprompt wraps: causal decoders, encoder-decoders, encoders
# (a sequence classifier, or a masked-LM head scored as features).
TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "FEATURE_EXTRACTION")
# Attentions of an encoder-decoder that prefix tuning can reach: PEFT prefixes the decoder's self-attention;
# Li & Liang also the encoder's self-attention and the decoder's cross-attention.
PREFIX_SITES = ("encoder", "decoder", "cross")


# Fields fastprompt adds to PEFT's configs, each a list of strings. A save keeps them out of
# adapter_config.json (PEFT warns on a field it does not know) in fastprompt_config.json beside it
# (`fastprompt.io.save_adapter`).
FASTPROMPT_FIELDS = ("class_label_words", "prefix_sites")


def _check_positive_int(name: str, value) -> None:
    """ValueError naming `name` unless value is an int >= 1 (True is an int in Python, not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class PromptLearningConfig:
    """Fields every soft-prompt method shares (PEFT's `PromptLearningConfig`)."""

    num_virtual_tokens: int = None
    task_type: str | None = "CAUSAL_LM"
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    modules_to_save: list[str] | None = None
    peft_type: str = field(default=None, init=False)

    def __post_init__(self):
        _check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        self.task_type = _enum_value(self.task_type)
        if self.task_type not in (None, *TASK_TYPES):
            raise ValueError(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al.). prompt_tuning_init: RANDOM, SAMPLE_VOCAB, TEXT or CLASS_LABELS.

    CLASS_LABELS (fastprompt's addition, as in Lester et al.) initialises the first virtual tokens from
    the embeddings of the verbalizer words in `class_label_words` (each word's tokens, in order), the rest
    from tokens sampled from the vocabulary; it needs `tokenizer_name_or_path`.
    """

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    class_label_words: list[str] | None = None
    _inits = ("RANDOM", "SAMPLE_VOCAB", "TEXT", "CLASS_LABELS")

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PROMPT_TUNING
        self.prompt_tuning_init = _enum_value(self.prompt_tuning_init)
        if self.prompt_tuning_init not in self._inits:
            raise ValueError(f"prompt_tuning_init must be one of {self._inits}, got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init in ("TEXT", "CLASS_LABELS") and not self.tokenizer_name_or_path:
            raise ValueError(f"prompt_tuning_init={self.prompt_tuning_init!r} needs tokenizer_name_or_path "
                             "(a local tokenizer folder)")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        if self.prompt_tuning_init == "CLASS_LABELS" and not self.class_label_words:
            raise ValueError("prompt_tuning_init='CLASS_LABELS' needs class_label_words (the verbalizers)")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang): per-layer key/value prefixes, optionally through an MLP.

    prefix_sites (fastprompt's addition, encoder-decoders only): None is PEFT's layout (the decoder's
    self-attention); a list of PREFIX_SITES prefixes each named attention, num_layers per site.
    """

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None
    prefix_sites: list[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PREFIX_TUNING
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")
        if self.prefix_sites is not None:
            sites = list(self.prefix_sites)
            if not sites or len(set(sites)) != len(sites) or not set(sites) <= set(PREFIX_SITES):
                raise ValueError(f"prefix_sites must be None or distinct names from {PREFIX_SITES}, got "
                                 f"{self.prefix_sites!r}")
            self.prefix_sites = [s for s in PREFIX_SITES if s in sites]  # one order for the parameter layout


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al.): virtual tokens produced by an MLP or a bidirectional LSTM + MLP."""

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = P_TUNING
        self.encoder_reparameterization_type = _enum_value(self.encoder_reparameterization_type)
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ValueError("encoder_reparameterization_type must be 'MLP' or 'LSTM', got "
                             f"{self.encoder_reparameterization_type!r}")


@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """MPT (Wang et al.): task k's prompt = P* ∘ (prefix_task_cols[k] @ prefix_task_rows[k]).

    prompt_tuning_init: RANDOM, TEXT, AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK or ONLY_SOURCE_SHARED; the
    last three read `prompt_tuning_init_state_dict_path` (a source MPT checkpoint).
    """

    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int = 0
    num_ranks: int = 1
    num_tasks: int = 1
    _inits = ("RANDOM", "TEXT", "AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MULTITASK_PROMPT_TUNING
        if self.prompt_tuning_init in self._inits[2:] and not self.prompt_tuning_init_state_dict_path:
            raise ValueError(f"prompt_tuning_init={self.prompt_tuning_init!r} needs "
                             "prompt_tuning_init_state_dict_path (a source MPT checkpoint)")
        for name in ("num_ranks", "num_tasks"):
            _check_positive_int(name, getattr(self, name))


CONFIG_CLASSES = {
    PROMPT_TUNING: PromptTuningConfig,
    PREFIX_TUNING: PrefixTuningConfig,
    P_TUNING: PromptEncoderConfig,
    MULTITASK_PROMPT_TUNING: MultitaskPromptTuningConfig,
}


def as_fastprompt_config(config) -> PromptLearningConfig:
    """A fastprompt config from a fastprompt config, a PEFT config or an adapter_config.json dict."""
    if isinstance(config, PromptLearningConfig):
        return config
    if not isinstance(config, dict):
        if not hasattr(config, "to_dict") or not hasattr(config, "peft_type"):
            raise ValueError(f"config must be a fastprompt or PEFT prompt-learning config or a dict, got "
                             f"{type(config).__name__}")
        config = config.to_dict()
    peft_type = _enum_value(config.get("peft_type"))
    if peft_type not in CONFIG_CLASSES:
        raise ValueError(f"peft_type must be one of {sorted(CONFIG_CLASSES)} (prompt-learning methods), got "
                         f"{peft_type!r}")
    cls = CONFIG_CLASSES[peft_type]
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    ignored = sorted(k for k in config if k not in names and k != "peft_type" and config[k] is not None)
    ignored = [k for k in ignored if k not in _PEFT_ONLY_FIELDS]
    if ignored:
        warnings.warn(f"{cls.__name__}: ignoring fields fastprompt does not use: {ignored}")
    return cls(**{k: _enum_value(v) for k, v in config.items() if k in names})


# Fields PEFT writes that carry nothing fastprompt needs.
_PEFT_ONLY_FIELDS = {"auto_mapping", "peft_version", "task_type"}


def _enum_value(value):
    return getattr(value, "value", value)


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
    if config.peft_type == PREFIX_TUNING:
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
