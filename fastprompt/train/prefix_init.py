"""A prefix-tuning adapter started from a text: every layer's prefix keys and values are the text's own.

Li & Liang (§7.2) found that a prefix initialised with the activations of real words trains better than a
random one, above all with little data; started so, the untuned model reads exactly that text before its
input, as prompt tuning's TEXT start makes it read the text's embeddings.

    ids = tokenizer("Answer with one word: positive or negative.\\n")["input_ids"]
    model = fastprompt.get_peft_model(base, fastprompt.PrefixTuningConfig(num_virtual_tokens=len(ids)))
    init_prefix_from_text(model, ids)
"""

from __future__ import annotations

import torch

from fastprompt.bank import prompt_pass


@torch.no_grad()
def init_prefix_from_text(model, token_ids: list[int], adapter_name: str | None = None) -> None:
    """Set prefix-tuning adapter `adapter_name` (default: the active one) of a causal PromptModel to the
    per-layer keys/values of `token_ids` run through the frozen backbone at positions 0..P-1.

    token_ids: P token ids, P = the adapter's num_virtual_tokens. The adapter must hold its keys/values as
    parameters (no prefix_projection: an MLP's output cannot be set to given values)."""
    name = adapter_name or model.active_adapter
    if name not in model.prompt_sources:
        raise ValueError(f"adapter_name {name!r} is not loaded; loaded: {list(model.prompt_sources)}")
    source = model.prompt_sources[name]
    if source.kind != "kv" or getattr(source.config, "prefix_projection", False):
        raise ValueError(f"adapter {name!r} must be prefix tuning without prefix_projection to start from a text's "
                         f"keys/values, got {source.config.peft_type} (prefix_projection="
                         f"{getattr(source.config, 'prefix_projection', None)})")
    P = source.config.num_virtual_tokens
    if len(token_ids) != P:
        raise ValueError(f"token_ids must hold num_virtual_tokens={P} ids for adapter {name!r}, got {len(token_ids)}")
    backbone = model.backbone
    ids = torch.tensor([list(token_ids)], dtype=torch.long, device=backbone.device)
    keys, values, _ = prompt_pass(backbone, backbone.word_embeddings(ids), model.backend)
    # PEFT's layout [P, L * 2 * Hkv * D]: layer i's keys in slot 2i, its values in slot 2i + 1.
    slots = torch.stack([t[0] for pair in zip(keys, values) for t in pair])      # [L*2, Hkv, P, D]
    weight = source.embedding.weight
    weight.copy_(slots.permute(2, 0, 1, 3).reshape(P, -1).to(weight.dtype))
