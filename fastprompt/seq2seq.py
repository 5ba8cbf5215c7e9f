"""Seq2SeqPromptModel: soft prompts on a frozen encoder-decoder (T5, BART), PEFT's PeftModelForSeq2SeqLM.

- Prompt tuning, P-tuning and MPT put the virtual tokens before the encoder's input. As in PEFT, their
  parameters hold num_virtual_tokens × num_transformer_submodules tokens (2 by default: encoder and
  decoder); the encoder reads the first num_virtual_tokens, and MPT's forward also puts the rest before
  the decoder's input (where PEFT's MPT forward puts them).
- Prefix tuning: PEFT's layout (prefix_sites=None) prefixes the decoder's self-attention, through
  transformers' own cache as PEFT does. prefix_sites (Li & Liang) adds the encoder's self-attention and the
  decoder's cross-attention, which read the bank through `fastprompt.ops.prefix_attention` (non-causal).
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
import torch.nn.functional as F
from transformers import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from fastprompt.bidirectional import BidirectionalPromptModel, check_shape, prepend_ones
from fastprompt.generation import _check_sampling, sample_next, stopping_setup
from fastprompt.routing import BankPlan


class Seq2SeqPromptModel(BidirectionalPromptModel):
    """A drop-in for PEFT's PeftModelForSeq2SeqLM with prompt-learning methods (README, "Encoders and
    encoder-decoders")."""

    kind = "seq2seq"

    def _register(self, adapter_name, source, config) -> None:
        if source.kind == "kv":
            backbone = self.backbone
            if backbone.num_decoder_layers != backbone.num_layers:
                raise ValueError(f"prefix tuning needs as many decoder layers as encoder layers (PEFT sizes the "
                                 f"prefix by num_layers={backbone.num_layers}); this model has "
                                 f"{backbone.num_decoder_layers} decoder layers")
        super()._register(adapter_name, source, config)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                labels=None, task_ids=None, adapter_names=None, return_dict: bool = True, num_items_in_batch=None):
        """Loss and logits of the decoder's tokens ([B, T_dec, V]; decoder virtual tokens get none).

        input_ids [B, T] int64 and attention_mask [B, T] (1 = token) for the encoder; labels [B, T_dec]
        (-100 = ignore) and/or decoder_input_ids [B, T_dec] (default: labels shifted right, as the model
        does) with decoder_attention_mask [B, T_dec]; rows pick adapters by `adapter_names` (B names) or
        `task_ids` (int64 [B]). The loss is the mean cross-entropy over the counted labels (or their sum /
        num_items_in_batch, transformers.Trainer's gradient accumulation), in fp32.
        """
        B, T = self._check_encoder_input(input_ids, attention_mask)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass labels [B, T_dec] or decoder_input_ids [B, T_dec]")
            decoder_input_ids = self.base_model.prepare_decoder_input_ids_from_labels(labels=labels)
        if decoder_input_ids.dim() != 2 or decoder_input_ids.shape[0] != B:
            raise ValueError(f"decoder_input_ids must have shape [B={B}, T_dec], got "
                             f"{list(decoder_input_ids.shape)}")
        shape = tuple(decoder_input_ids.shape)
        check_shape("labels", labels, shape)
        check_shape("decoder_attention_mask", decoder_attention_mask, shape)
        plan = self.plan(B, task_ids, adapter_names)
        inputs, n_decoder_virtual, ctx = self._inputs(plan, input_ids, attention_mask, decoder_input_ids,
                                                      decoder_attention_mask)
        with self.sites(ctx):
            out = self.base_model(**inputs, use_cache=False)
        logits = out.logits[:, n_decoder_virtual:]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().to(logits.device),
                                   ignore_index=-100, reduction="mean" if num_items_in_batch is None else "sum")
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch
        output = Seq2SeqLMOutput(loss=loss, logits=logits)
        return output if return_dict else output.to_tuple()

    def _check_encoder_input(self, input_ids, attention_mask) -> tuple[int, int]:
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be an int64 tensor [B, T], got "
                             f"{None if input_ids is None else list(input_ids.shape)}")
        check_shape("attention_mask", attention_mask, tuple(input_ids.shape))
        return tuple(input_ids.shape)

    def _inputs(self, plan: BankPlan, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask):
        """(keyword arguments for the HF model, number of decoder virtual tokens, SiteContext or None)."""
        P = plan.num_virtual_tokens
        name = plan.sources[0][0]
        config, source = self.peft_config[name], self.prompt_sources[name]
        inputs = dict(attention_mask=attention_mask, decoder_attention_mask=decoder_attention_mask)
        if plan.kind == "tokens":
            prompts = self.bank_prompts(plan)
            inputs["inputs_embeds"] = self.embed(input_ids, prompts[:, :P], plan.bank_rows)
            inputs["attention_mask"] = prepend_ones(attention_mask, P)
            if source.prompts_the_decoder and config.num_transformer_submodules == 2:
                inputs["decoder_inputs_embeds"] = self.embed(decoder_input_ids, prompts[:, P:], plan.bank_rows)
                inputs["decoder_attention_mask"] = prepend_ones(decoder_attention_mask, P)
                return inputs, P, None
            inputs["decoder_input_ids"] = decoder_input_ids
            return inputs, 0, None
        inputs.update(input_ids=input_ids, decoder_input_ids=decoder_input_ids)
        prefixes = self._site_prefixes(plan, config)
        if "decoder" in prefixes:
            keys, values = prefixes.pop("decoder")
            inputs[cache_argument(type(self.base_model))] = decoder_prefix_cache(keys, values, plan.bank_rows)
            inputs["decoder_attention_mask"] = prepend_ones(decoder_attention_mask, P)
        if not prefixes:
            return inputs, 0, None
        ctx = self.site_context(plan, prefixes, {"encoder": attention_mask, "cross": attention_mask,
                                                 "decoder": inputs["decoder_attention_mask"]})
        inputs["fastprompt_ctx"] = ctx
        return inputs, 0, ctx

    def _site_prefixes(self, plan: BankPlan, config) -> dict:
        """site → (keys, values): per-layer lists of the plan's prefix, each [n_entries, H, P, D]."""
        keys, values = self.prefix_bank(plan)
        L = self.backbone.num_layers
        if config.prefix_sites is None:
            # PEFT's layout: it repeats the L (key, value) pairs for a self- and a cross-attention cache and
            # cuts the result in groups of four, so decoder layer i reads pair 2i mod L (and the cross-
            # attention half is dropped).
            order = [(2 * i) % L for i in range(L)]
            return {"decoder": ([keys[j] for j in order], [values[j] for j in order])}
        return {site: (keys[s * L:(s + 1) * L], values[s * L:(s + 1) * L])
                for s, site in enumerate(config.prefix_sites)}

    # generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, task_ids=None, adapter_names=None, *,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, generator: torch.Generator | None = None,
                 eos_token_id=None, pad_token_id=None, decoder_start_token_id=None) -> torch.Tensor:
        """Decoder sequences [B, 1 + n] (the start token, then n <= max_new_tokens new tokens), as
        transformers' generate returns for encoder-decoders; rows that emit EOS are padded with
        pad_token_id until every row has finished.

        input_ids, attention_mask: [B, T] for the encoder (padding on either side). Greedy by default;
        do_sample with temperature, top_k, top_p, seed (or generator) samples (`generation.sample_next`).
        MPT with a decoder prompt (num_transformer_submodules=2) decodes after it, as its forward trains;
        PEFT's own MPT generate leaves the decoder prompt out.
        """
        B, T = self._check_encoder_input(input_ids, attention_mask)
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        device = self.backbone.device
        gen_config = getattr(self.base_model, "generation_config", None)
        start = decoder_start_token_id
        for source in (gen_config, self.base_model.config):
            start = start if start is not None else getattr(source, "decoder_start_token_id", None)
        if start is None:
            raise ValueError("decoder_start_token_id is not set in the model's config: pass it to generate")
        eos, pad, generator = stopping_setup(gen_config, eos_token_id, pad_token_id, seed, generator, device)

        plan = self.plan(B, task_ids, adapter_names)
        sequence = torch.full((B, 1), int(start), dtype=torch.long, device=device)
        if max_new_tokens == 0:
            return sequence
        inputs, _, ctx = self._inputs(plan, input_ids.to(device), None if attention_mask is None else
                                      attention_mask.to(device), sequence, None)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        with self.sites(ctx):
            out = self.base_model(**inputs, use_cache=True)
            step = dict(encoder_outputs=BaseModelOutput(last_hidden_state=out.encoder_last_hidden_state),
                        attention_mask=inputs["attention_mask"], use_cache=True,
                        **{cache_argument(type(self.base_model)): output_cache(out)},
                        **({} if ctx is None else {"fastprompt_ctx": ctx}))
            for i in range(max_new_tokens):
                next_ids = sample_next(out.logits[:, -1], do_sample=do_sample, temperature=temperature,
                                       top_k=top_k, top_p=top_p, generator=generator)
                next_ids = torch.where(finished, torch.full_like(next_ids, pad), next_ids)
                sequence = torch.cat([sequence, next_ids[:, None]], dim=1)
                if eos:
                    finished |= torch.isin(next_ids, torch.tensor(eos, device=device))
                if i + 1 == max_new_tokens or bool(finished.all()):
                    break
                out = self.base_model(decoder_input_ids=next_ids[:, None], **step)
        return sequence


@lru_cache(maxsize=None)
def cache_argument(model_class: type) -> str:
    """The keyword a model's forward takes its key/value cache by: `cache` from transformers 5.25 on, which
    warns on `past_key_values`; `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def output_cache(out):
    """The key/value cache a forward returned (`out.cache` from transformers 5.25 on, else
    `out.past_key_values`), read without touching the deprecated name."""
    returned = getattr(out, "cache", None)
    return returned if returned is not None else out.past_key_values


def decoder_prefix_cache(keys: list[torch.Tensor], values: list[torch.Tensor],
                         bank_rows: torch.Tensor) -> EncoderDecoderCache:
    """transformers' encoder-decoder cache holding each row's decoder self-attention prefix, as PEFT builds
    it: keys/values per layer [n_entries, H, P, D], bank_rows [B] → self-attention cache [B, H, P, D] per
    layer and an empty cross-attention cache."""
    self_attention = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values)):
        self_attention.update(k[bank_rows], v[bank_rows], layer)
    return EncoderDecoderCache(self_attention, DynamicCache())
