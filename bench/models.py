"""Random-weight backbones for the benchmarks, built from transformers configs (nothing downloaded).

Speed does not depend on the weights, only on the shapes, so each model is a config shaped like a
released one: `llama-3.2-1b` (vocab 128256, hidden 2048, 16 layers, 32 heads, 8 key/value heads,
MLP 8192, tied embeddings), `llama-3.1-8b` (vocab 128256, hidden 4096, 32 layers, 32 heads, 8 key/value
heads, MLP 14336, untied embeddings: 8.0B parameters, 16 GB in bf16) and `gpt2-medium` (vocab 50257, hidden 1024, 24 layers, 16 heads). The
`tiny-*` models have the same structure at sizes a CPU runs in milliseconds (`--quick` and tests).
Dropout is off everywhere: fastprompt's shared-prefix path equals concatenation only without it, and
the benchmark compares outputs before it times them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

_NO_DROPOUT_GPT2 = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

CONFIGS = {
    "llama-3.2-1b": lambda: LlamaConfig(
        vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5),
    "llama-3.1-8b": lambda: LlamaConfig(
        vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-5),
    "gpt2-medium": lambda: GPT2Config(vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024,
                                      **_NO_DROPOUT_GPT2),
    "tiny-llama": lambda: LlamaConfig(
        vocab_size=503, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=160, tie_word_embeddings=True, max_position_embeddings=1024),
    "tiny-gpt2": lambda: GPT2Config(vocab_size=503, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                    bos_token_id=1, eos_token_id=2, **_NO_DROPOUT_GPT2),
}
CLASSES = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}


def build_model(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """A random-weight causal LM shaped like `name` (a key of CONFIGS), in eval mode, with SDPA attention,
    its parameters in `dtype` on `device`. Raises ValueError naming the known models."""
    config = _config(name)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    # Initialised where it will run and in its dtype: a 1B model's random init takes seconds on a GPU, a
    # minute on a CPU, and an 8B model built in fp32 first would hold 32 GB besides its 16 GB in bf16.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = CLASSES[config.model_type](config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


def max_positions(name: str) -> int | None:
    """The longest sequence (virtual tokens included) model `name` can place: GPT-2's learned positions;
    None for rotary models, which have no table to run out of."""
    return getattr(_config(name), "n_positions", None)


def _config(name: str):
    if name not in CONFIGS:
        raise ValueError(f"model must be one of {sorted(CONFIGS)}, got {name!r}")
    return CONFIGS[name]()


def model_shape(model: nn.Module) -> dict:
    """The shape numbers FLOP counts need, read from the model's config: family, layers, hidden, heads,
    kv_heads, head_dim, intermediate (MLP width), gated_mlp (three MLP matrices, SwiGLU), vocab."""
    c = model.config
    if c.model_type == "gpt2":
        return dict(family="gpt2", layers=c.n_layer, hidden=c.n_embd, heads=c.n_head, kv_heads=c.n_head,
                    head_dim=c.n_embd // c.n_head, intermediate=c.n_inner or 4 * c.n_embd, gated_mlp=False,
                    vocab=c.vocab_size)
    if c.model_type == "llama":
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return dict(family="llama", layers=c.num_hidden_layers, hidden=c.hidden_size,
                    heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, head_dim=head_dim,
                    intermediate=c.intermediate_size, gated_mlp=True, vocab=c.vocab_size)
    raise ValueError(f"model_shape knows model_type 'llama' and 'gpt2', got {c.model_type!r}")
