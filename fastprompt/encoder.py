"""EncoderPromptModel: soft prompts on a frozen BERT-family encoder (BERT, RoBERTa).

- A *ForSequenceClassification model (task SEQ_CLS) is PEFT's PeftModelForSequenceClassification: the
  classifier head trains with the prompt and is saved in the adapter (`fastprompt.heads`).
- A *ForMaskedLM model (task FEATURE_EXTRACTION) scores masked-LM logits: of every input token, or of the
  [MASK] against verbalizer words (Liu et al.'s P-tuning; a class per list of words).
- Prompt tuning, P-tuning and MPT place virtual tokens first (PEFT), or anywhere with `positions`
  (templates: `template_positions`, around anchor tokens and the [MASK]). Prefix tuning (P-tuning v2) gives
  every layer's self-attention a per-task prefix, through `fastprompt.ops.prefix_attention`.
- A BERT classifier's head reads the pooler at the first position (PEFT), or, with ``pooling="mean"``, the
  mean of the row's own final hidden states: the sentence embedding of models trained for mean pooling
  (e.g. all-MiniLM-L6-v2), which a prompt then adjusts.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput, SequenceClassifierOutput

from fastprompt import io
from fastprompt.bidirectional import BidirectionalPromptModel, check_shape
from fastprompt.heads import WithHeads, copy_heads, load_heads, routed_heads
from fastprompt.methods import resolve_config
from fastprompt.ops import default_positions
from fastprompt.routing import BankPlan

POOLINGS = ("first", "mean")


def mean_pool(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B, d] fp32: the mean of hidden [B, L, d] (any float dtype) over the positions with weight 1 in
    weights [B, L] (0/1, any dtype, e.g. an attention mask); a row without any is 0."""
    weights = weights.to(torch.float32)[..., None]
    return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class _MeanPooler(nn.Module):
    """Stands in for BERT's pooler during one call: the mean of the final hidden states [B, L, d] over each
    row's input tokens (token_index [B, T]: their places among the L) that are not padding (attention_mask
    [B, T], None: none is), in the hidden states' dtype."""

    def __init__(self, token_index: torch.Tensor, attention_mask: torch.Tensor | None):
        super().__init__()
        self.token_index = token_index
        self.attention_mask = attention_mask

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        is_token = (torch.ones_like(self.token_index) if self.attention_mask is None
                    else self.attention_mask.to(self.token_index.device).long())
        weights = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return mean_pool(hidden, weights.scatter(1, self.token_index, is_token)).to(hidden.dtype)


@contextmanager
def _pooler_replaced(encoder: nn.Module, pooler: nn.Module):
    """For the duration of a call, `pooler` in place of the encoder's own."""
    original = encoder.pooler
    encoder.pooler = pooler
    try:
        yield
    finally:
        encoder.pooler = original


def template_positions(insert_before: torch.Tensor, counts: Sequence[int], seq_len: int) -> torch.Tensor:
    """The `positions` map of a template: virtual tokens inserted among a row's tokens in blocks.

    insert_before: [B, S] int64, block s goes right before input token insert_before[b, s] (seq_len: after
    the last), non-decreasing along s; counts: S block sizes (sum P); the blocks hold virtual tokens
    0..P-1 in order. Returns [B, seq_len + P] int64 (p >= 0: input token p, p < 0: virtual token -p - 1), as
    `fastprompt.ops.prompt_embed` and `EncoderPromptModel.forward` take it.

    Example: [CLS] v0 v1 <text> v2 [MASK] [SEP] is insert_before=[[1, mask_index]], counts=[2, 1].
    """
    if insert_before.dim() != 2 or insert_before.shape[1] != len(counts):
        raise ValueError(f"insert_before must have shape [B, {len(counts)}] (one column per block in counts), "
                         f"got {list(insert_before.shape)}")
    if any(int(c) < 1 for c in counts):
        raise ValueError(f"counts must be positive block sizes, got {list(counts)}")
    if insert_before.numel() and (int(insert_before.min()) < 0 or int(insert_before.max()) > seq_len
                                  or bool((insert_before.diff(dim=1) < 0).any())):
        raise ValueError(f"insert_before must be non-decreasing along each row, within [0, {seq_len}]")
    B, device = insert_before.shape[0], insert_before.device
    P = sum(int(c) for c in counts)
    block = torch.repeat_interleave(torch.arange(len(counts), device=device),
                                    torch.tensor([int(c) for c in counts], device=device))
    # Sort keys: input token t at t·(P+1) + P; virtual token k of a block before token t at t·(P+1) + k.
    token_key = torch.arange(seq_len, device=device) * (P + 1) + P
    virtual_key = insert_before[:, block] * (P + 1) + torch.arange(P, device=device)
    keys = torch.cat([token_key.expand(B, -1), virtual_key], dim=1)
    values = torch.cat([torch.arange(seq_len, device=device), -torch.arange(1, P + 1, device=device)])
    return values[keys.argsort(dim=1)]


class EncoderPromptModel(BidirectionalPromptModel):
    """A drop-in for PEFT's PeftModelForSequenceClassification (and masked-LM scoring) with prompt-learning
    methods (README, "Encoders and encoder-decoders")."""

    kind = "encoder"

    def __init__(self, base_model: nn.Module, config=None, adapter_name: str = "default", *,
                 pooling: str = "first", **kwargs):
        """PromptModel's arguments, plus `pooling`, what a sequence classifier's head reads: "first", the
        model's own pooler at the first position (PEFT's numbers; with virtual tokens first, that is the first
        virtual token), or "mean", in the pooler's place the mean of each row's final hidden states at its
        own non-padding tokens (not the virtual ones). "mean" needs a classifier that reads a pooler (BERT's
        *ForSequenceClassification). It is a property of the model, not saved with an adapter: pass it again
        when loading one (`fastprompt.from_pretrained(..., pooling="mean")`)."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        super().__init__(base_model, config, adapter_name, **kwargs)
        if pooling == "mean" and (self.backbone.task_type != "SEQ_CLS"
                                  or getattr(self.backbone.decoder, "pooler", None) is None):
            raise ValueError(f"pooling='mean' replaces the pooler a sequence classifier's head reads; "
                             f"{type(base_model).__name__} has none (it needs e.g. BertForSequenceClassification): "
                             f"use pooling='first'")
        self.pooling = pooling

    # adapters: a trainable head per adapter (PEFT's modules_to_save) ---------------------------------
    def _register(self, adapter_name, source, config) -> None:
        heads = copy_heads(self.base_model, config.modules_to_save or [], trainable=not config.inference_mode)
        super()._register(adapter_name, WithHeads(source, heads) if heads else source, config)

    def load_adapter(self, adapter_dir, adapter_name: str = "default", is_trainable: bool = False) -> None:
        """PromptModel.load_adapter, plus the adapter's head (`base_model.<name>.*` in the file)."""
        config_dict, tensors = io.load_adapter_files(adapter_dir)
        config = resolve_config(config_dict, self.backbone)
        load_heads(copy_heads(self.base_model, config.modules_to_save or [], False), tensors)  # check first
        super().load_adapter(adapter_dir, adapter_name, is_trainable=is_trainable)
        source = self.prompt_sources[adapter_name]
        if isinstance(source, WithHeads):
            load_heads(dict(source.heads), tensors)

    # forward ---------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, task_ids=None,
                adapter_names=None, positions=None, verbalizer=None, mask_token_id=None,
                return_dict: bool = True):
        """Classifier or masked-LM outputs of a batch, with each row's soft prompt.

        input_ids [B, T] int64; attention_mask [B, T] (1 = token); token_type_ids [B, T] (virtual tokens get
        type 0, as in PEFT); rows pick adapters by `adapter_names` (B names) or `task_ids` (int64 [B]);
        positions [B, T + P] places the virtual tokens (see `template_positions`; default: first).

        SEQ_CLS model: logits [B, num_labels] and the model's own loss for labels [B] (PEFT's numbers), the
        head reading the pooler or, with pooling="mean", the mean of the row's input-token states.
        Masked-LM model: logits [B, T, V] of the input tokens and the cross-entropy against labels [B, T]
        (-100 = ignore); with `verbalizer` (one list of token ids per class) and `mask_token_id` (exactly one
        in each row), logits [B, n_classes], each the log-probability of the class's words at the [MASK]
        (log of their summed probabilities), and the cross-entropy against class labels [B].
        """
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be an int64 tensor [B, T], got "
                             f"{None if input_ids is None else list(input_ids.shape)}")
        B, T = input_ids.shape
        check_shape("attention_mask", attention_mask, (B, T))
        check_shape("token_type_ids", token_type_ids, (B, T))
        classifier = self.backbone.task_type == "SEQ_CLS"
        if classifier and verbalizer is not None:
            raise ValueError("verbalizer scoring needs a masked-LM model (e.g. AutoModelForMaskedLM); this one is "
                             "a sequence classifier")
        if not classifier:
            check_shape("labels", labels, (B,) if verbalizer is not None else (B, T))
        plan = self.plan(B, task_ids, adapter_names)
        inputs, token_index, ctx = self._inputs(plan, input_ids, attention_mask, token_type_ids, positions)
        if classifier:
            pooler = (_pooler_replaced(self.backbone.decoder, _MeanPooler(token_index, attention_mask))
                      if self.pooling == "mean" else nullcontext())
            with self.sites(ctx), routed_heads(self.base_model, self.prompt_sources, plan), pooler:
                out = self.base_model(**inputs, labels=labels)
            output = SequenceClassifierOutput(loss=out.loss, logits=out.logits)
            return output if return_dict else output.to_tuple()
        with self.sites(ctx):
            hidden = self.backbone.decoder(**inputs).last_hidden_state
        hidden = hidden.gather(1, token_index[..., None].expand(-1, -1, hidden.shape[-1]))  # input tokens only
        if verbalizer is not None:
            logits = self._verbalizer_scores(hidden, input_ids, attention_mask, verbalizer, mask_token_id)
            output = SequenceClassifierOutput(logits=logits)
        else:
            logits = self.backbone.mlm_head(hidden)
            output = MaskedLMOutput(logits=logits)
        if labels is not None:
            output.loss = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten().to(logits.device),
                                          ignore_index=-100)
        return output if return_dict else output.to_tuple()

    def generate(self, *args, **kwargs):
        raise ValueError("an encoder does not generate: score with forward (masked-LM logits or a verbalizer)")

    def _inputs(self, plan: BankPlan, input_ids, attention_mask, token_type_ids, positions):
        """(keyword arguments for the HF model, token_index [B, T]: where each input token sits in the
        model's sequence, SiteContext or None)."""
        B, T = input_ids.shape
        P = plan.num_virtual_tokens
        if plan.kind == "kv":
            if positions is not None:
                raise ValueError("positions places virtual tokens; prefix tuning has none (leave it None)")
            prefixes = {"encoder": self.prefix_bank(plan)}
            ctx = self.site_context(plan, prefixes, {"encoder": attention_mask})
            inputs = dict(input_ids=input_ids, token_type_ids=token_type_ids, fastprompt_ctx=ctx,
                          position_ids=self.backbone.prefix_position_ids(input_ids, P))
            return inputs, torch.arange(T, device=input_ids.device)[None].expand(B, T), ctx
        if positions is None:
            positions = default_positions(B, P, T, input_ids.device)
        token_index = _token_index(positions, T)
        is_token = positions >= 0
        from_token = positions.clamp(min=0)
        inputs = dict(inputs_embeds=self.embed(input_ids, self.bank_prompts(plan), plan.bank_rows, positions))
        if attention_mask is not None:
            inputs["attention_mask"] = (attention_mask.gather(1, from_token).bool() | ~is_token).long()
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids.gather(1, from_token) * is_token
        return inputs, token_index, None

    def _verbalizer_scores(self, hidden, input_ids, attention_mask, verbalizer, mask_token_id) -> torch.Tensor:
        """[B, n_classes] fp32: log of the summed masked-LM probabilities of each class's words at the row's
        [MASK] (hidden: [B, T, d] of the input tokens)."""
        if mask_token_id is None:
            raise ValueError("verbalizer scoring needs mask_token_id (the tokenizer's mask_token_id)")
        is_mask = input_ids == mask_token_id
        if attention_mask is not None:
            is_mask &= attention_mask.bool()
        counts = is_mask.sum(dim=1)
        if bool((counts != 1).any()):
            raise ValueError(f"each row must hold exactly one mask_token_id={mask_token_id}; per row: "
                             f"{counts.tolist()}")
        ids, valid = _verbalizer_ids(verbalizer, self.backbone.vocab_size, hidden.device)
        at_mask = hidden[torch.arange(hidden.shape[0], device=hidden.device), is_mask.long().argmax(dim=1)]
        log_probs = self.backbone.mlm_head(at_mask).float().log_softmax(dim=-1)     # [B, V]
        return log_probs[:, ids].masked_fill(~valid, float("-inf")).logsumexp(dim=-1)


def _token_index(positions: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[B, T]: the place of each input token in the model's sequence; ValueError unless `positions` holds
    every input token exactly once per row."""
    is_token = positions >= 0
    counts = torch.zeros(positions.shape[0], n_tokens, dtype=torch.long, device=positions.device)
    counts.scatter_add_(1, positions.clamp(min=0), is_token.long())
    if bool((counts != 1).any()):
        raise ValueError(f"positions must hold each input token 0..{n_tokens - 1} exactly once per row (and "
                         f"virtual tokens as negative values)")
    places = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
    # Virtual tokens add 0 (at token 0's slot): each token's slot receives exactly its own place.
    return torch.zeros_like(counts).scatter_add_(1, positions.clamp(min=0), torch.where(is_token, places, 0))


def _verbalizer_ids(verbalizer, vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """verbalizer (per class: a token id or a list of them) → ids [C, K] padded, valid [C, K] bool."""
    classes = [[int(w)] if isinstance(w, int) else [int(t) for t in w] for w in verbalizer]
    if not classes or any(not c for c in classes) or any(not 0 <= t < vocab_size for c in classes for t in c):
        raise ValueError(f"verbalizer must list, per class, one or more token ids in [0, {vocab_size}), got "
                         f"{verbalizer!r}")
    width = max(len(c) for c in classes)
    ids = torch.tensor([c + [c[0]] * (width - len(c)) for c in classes], device=device)
    valid = torch.tensor([[True] * len(c) + [False] * (width - len(c)) for c in classes], device=device)
    return ids, valid
