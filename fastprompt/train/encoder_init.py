"""A P-tuning adapter started from a text: its encoder's input table is the text's embeddings.

PEFT's P-tuning maps a random table through a randomly initialised encoder, so the untuned prompt is noise to
the model. With `encoder_residual=True` the virtual tokens are table + encoder(table) and the encoder's last
layer starts at zero (`fastprompt.methods.p_tuning`); set to a text's embeddings, the table makes the untuned
model read exactly that text, as prompt tuning's TEXT start does, and the encoder learns a correction to it.

    ids = tokenizer("Answer with one word: positive or negative.\\n")["input_ids"]
    config = fastprompt.PromptEncoderConfig(num_virtual_tokens=len(ids), encoder_residual=True)
    model = fastprompt.get_peft_model(base, config)
    init_encoder_from_text(model, ids)
"""

from __future__ import annotations

import torch


@torch.no_grad()
def init_encoder_from_text(model, token_ids: list[int], adapter_name: str | None = None) -> None:
    """Set the input table [P, d] of P-tuning adapter `adapter_name` (default: the active one) of a PromptModel
    to the backbone's word embeddings of `token_ids`.

    token_ids: P token ids, P = the adapter's num_virtual_tokens. The adapter must have its encoder (not
    inference_mode) and `encoder_residual=True`: without the skip the table reaches the model only through the
    encoder, and the text would not be what the model reads."""
    name = adapter_name or model.active_adapter
    if name not in model.prompt_sources:
        raise ValueError(f"adapter_name {name!r} is not loaded; loaded: {list(model.prompt_sources)}")
    source = model.prompt_sources[name]
    config = source.config
    if not getattr(config, "encoder_residual", False) or not getattr(source, "has_encoder", False):
        raise ValueError(f"adapter {name!r} must be P-tuning with its encoder and encoder_residual=True to start "
                         f"from a text, got {config.peft_type} (encoder_residual="
                         f"{getattr(config, 'encoder_residual', None)}, inference_mode={config.inference_mode})")
    P = config.num_virtual_tokens
    if len(token_ids) != P:
        raise ValueError(f"token_ids must hold num_virtual_tokens={P} ids for adapter {name!r}, got {len(token_ids)}")
    table = model.backbone.word_embeddings.weight
    weight = source.embedding.weight
    weight.copy_(table[torch.tensor(list(token_ids), dtype=torch.long, device=table.device)].to(weight))
