"""Tiny backbones built from transformers configs (nothing downloaded), and a tiny local tokenizer."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 101
WORDS = ["good", "bad", "great", "awful", "movie", "film", "the", "was", "a", "positive", "negative",
         "review", "sentiment", "is", "of", "this"]
# A large init spreads the logits, so greedy decoding has no near-ties between implementations.
_COMMON = dict(vocab_size=VOCAB, initializer_range=0.25, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _llama_like(config_cls, model_cls, **extra):
    config = config_cls(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, **_COMMON, **extra)
    return model_cls(config)


BUILDERS = {
    "llama": lambda: _llama_like(LlamaConfig, LlamaForCausalLM),
    "mistral": lambda: _llama_like(MistralConfig, MistralForCausalLM),
    "qwen2": lambda: _llama_like(Qwen2Config, Qwen2ForCausalLM),
    # head_dim 20 != hidden / heads = 12
    "qwen3": lambda: _llama_like(Qwen3Config, Qwen3ForCausalLM, head_dim=20),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=48, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                               attn_pdrop=0.0, **_COMMON)),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[family]().eval()
    model.generation_config.pad_token_id = 0
    return model


def save_tiny_tokenizer(folder) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS (ids 3..), saved to `folder` for TEXT / CLASS_LABELS init."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}, "<unk>": len(WORDS) + 3}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def batch(batch_size: int = 3, length: int = 9, padding: str = "right", seed: int = 1):
    """Random ids, an attention mask with padding on one side, and labels (-100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 1, 2, 4][:batch_size]):
        if pad:
            if padding == "left":
                mask[row, :pad] = 0
            else:
                mask[row, length - pad:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels
