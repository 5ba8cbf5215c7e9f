"""What EncoderPromptModel and Seq2SeqPromptModel share: models that see the prompt bidirectionally.

On a causal decoder the prompt's keys/values depend on the task alone, so PromptModel computes them once
per task (the shared-prefix path). An encoder sees every token from every position, so the virtual tokens'
states depend on the row: the prompt goes into each row's input (`fastprompt.ops.prompt_embed`), as PEFT
does. Prefix tuning reads per-layer keys/values from the bank at the model's attention sites
(`fastprompt.backbones.sites`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from fastprompt import bank
from fastprompt.backbones import SiteContext
from fastprompt.backbones.sites import SITES_ATTENTION_NAME
from fastprompt.model import PromptModel
from fastprompt.ops import prompt_embed
from fastprompt.routing import BankPlan


class BidirectionalPromptModel(PromptModel):
    """PromptModel's adapter bank (add/load/save/plan) on an encoder or encoder-decoder backbone."""

    def __init__(self, base_model: nn.Module, config=None, adapter_name: str = "default", **kwargs):
        if kwargs.get("path", "auto") not in ("auto", "concat"):
            raise ValueError(f"path must be 'auto' or 'concat' on an encoder or encoder-decoder (the prompt is "
                             f"seen bidirectionally, so it goes into every row), got {kwargs['path']!r}")
        if kwargs.get("gradient_checkpointing"):
            raise ValueError("gradient_checkpointing=True is not supported on encoders and encoder-decoders")
        super().__init__(base_model, config, adapter_name, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        raise ValueError("gradient checkpointing is not supported on encoders and encoder-decoders")

    def embed(self, input_ids: torch.Tensor, prompts: torch.Tensor, bank_rows: torch.Tensor,
              positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each row's prompt placed among them: input_ids [B, T] int64, prompts
        [n, P, d], bank_rows [B] (row → its prompt), positions [B, L] as in `ops.prompt_embed` (default: prompt
        first). Returns [B, L, d] in the backbone's dtype; differentiable in prompts."""
        weight, scale = self.backbone.word_embeddings.weight, self.backbone.embed_scale
        if scale == 1.0:
            return prompt_embed(input_ids, weight, prompts, bank_rows, positions=positions, backend=self.backend)
        # The model scales its token embeddings and, as in PEFT, not the virtual tokens.
        return prompt_embed(input_ids, weight, prompts / scale, bank_rows, positions=positions,
                            backend=self.backend) * scale

    def prefix_bank(self, plan: BankPlan) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Prefix tuning: the plan's keys and values for every prefixed layer (config.num_layers of them,
        the sites' blocks in order), each [n_entries, H, P, D] in the backbone's dtype."""
        return bank.stacked_kv(self._plan_sources(plan), self.backbone.dtype)

    def site_context(self, plan: BankPlan, prefixes: dict, key_padding_mask: dict) -> SiteContext:
        """A SiteContext giving each row its bank prefix at the sites in `prefixes` (site → (keys, values))."""
        masks = {site: None if mask is None else mask.bool() for site, mask in key_padding_mask.items()}
        return SiteContext(self.backbone, bank_rows=plan.bank_rows,
                           prefix_k={site: kv[0] for site, kv in prefixes.items()},
                           prefix_v={site: kv[1] for site, kv in prefixes.items()},
                           key_padding_mask=masks, backend=self.backend)

    def sites(self, ctx: SiteContext | None):
        """The context a call with `ctx` runs in: fastprompt's site attention, or the model's own."""
        return nullcontext() if ctx is None else self.backbone.attention_implementation(SITES_ATTENTION_NAME)


def prepend_ones(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """[B, T] attention mask → [B, n + T] with n leading ones (virtual tokens or prefix); None stays None."""
    if mask is None:
        return None
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def check_shape(name: str, tensor, shape: tuple[int, ...]) -> None:
    """ValueError naming the argument unless tensor is None or has `shape`."""
    if tensor is not None and tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
