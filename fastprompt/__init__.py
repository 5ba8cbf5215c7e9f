"""fastprompt: a performance-first runtime for soft-prompt methods on frozen transformer backbones.

    import fastprompt
    model = fastprompt.get_peft_model(base, fastprompt.PromptTuningConfig(num_virtual_tokens=20))
    out = model(input_ids, attention_mask=mask, labels=labels)

The names below are imported on first use (fastprompt._lazy), so `import fastprompt` costs nothing until
one is read.
"""

from fastprompt._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "MultitaskPromptTuningConfig": "fastprompt.methods.mpt",
    "PrefixTuningConfig": "fastprompt.methods.prefix_tuning",
    "PromptEncoderConfig": "fastprompt.methods.p_tuning",
    "PromptTuningConfig": "fastprompt.methods.prompt_tuning",
    "combine_predictions": "fastprompt.ensemble",
    "mean_log_prob": "fastprompt.ensemble",
    "score_choices": "fastprompt.ensemble",
    "load_training_checkpoint": "fastprompt.io",
    "save_training_checkpoint": "fastprompt.io",
    "PromptModel": "fastprompt.model",
    "from_pretrained": "fastprompt.wrap",
    "get_peft_model": "fastprompt.wrap",
    "EncoderPromptModel": "fastprompt.encoder",
    "template_positions": "fastprompt.encoder",
    "Seq2SeqPromptModel": "fastprompt.seq2seq",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
