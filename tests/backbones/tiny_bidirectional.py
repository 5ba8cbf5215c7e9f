"""Tiny encoders and encoder-decoders built from configs (nothing downloaded), and PEFT/fastprompt pairs."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    MT5Config,
    MT5ForConditionalGeneration,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

peft = pytest.importorskip("peft")

import fastprompt  # noqa: E402

VOCAB = 101
PAD, EOS = 0, 2
P = 5
NUM_LABELS = 3
_BERT = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64,
             initializer_range=0.2, num_labels=NUM_LABELS)
_ROBERTA = {**_BERT, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}

BUILDERS = {
    # d_kv x heads = d_model, as PEFT's prefix tuning assumes. T5's default init: larger weights alone make a
    # batched and a single-row fp32 run of the bare model differ by 1e-5.
    "t5": lambda layers=3: T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=layers, num_heads=4, dropout_rate=0.0,
        initializer_factor=1.0, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)),
    "mt5": lambda: MT5ForConditionalGeneration(MT5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)),
    "bart": lambda layers=2, scale_embedding=False: BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_std=0.3, scale_embedding=scale_embedding,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, decoder_start_token_id=EOS, forced_eos_token_id=None)),
    "bert": lambda: BertForSequenceClassification(BertConfig(**_BERT)),
    "roberta": lambda: RobertaForSequenceClassification(RobertaConfig(**_ROBERTA)),
    "bert_mlm": lambda: BertForMaskedLM(BertConfig(**_BERT)),
    "roberta_mlm": lambda: RobertaForMaskedLM(RobertaConfig(**_ROBERTA)),
}


def tiny(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[name](**kwargs).eval()


def peft_config(method: str, task_type: str):
    """PEFT's config for a method name of the tests."""
    common = dict(task_type=task_type, num_virtual_tokens=P)
    return {
        "prompt_tuning": lambda: peft.PromptTuningConfig(**common),
        "p_tuning_mlp": lambda: peft.PromptEncoderConfig(**common, encoder_hidden_size=24),
        "p_tuning_lstm": lambda: peft.PromptEncoderConfig(**common, encoder_reparameterization_type="LSTM",
                                                          encoder_hidden_size=16),
        "mpt": lambda: peft.MultitaskPromptTuningConfig(**common, num_tasks=3, num_ranks=2),
        "prefix": lambda: peft.PrefixTuningConfig(**common),
        "prefix_projection": lambda: peft.PrefixTuningConfig(**common, prefix_projection=True,
                                                             encoder_hidden_size=24),
    }[method]()


def peft_and_fastprompt(base: torch.nn.Module, method: str, task_type: str, seed: int = 1):
    """(peft_model, fastprompt_model) over one frozen base with identical, randomised prompt parameters.

    fastprompt's comes first: it copies the classifier head (SEQ_CLS) before PEFT wraps it in place.
    """
    ours = fastprompt.get_peft_model(base, peft_config(method, task_type))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(base, peft_config(method, task_type))
    torch.manual_seed(seed)
    with torch.no_grad():  # randomise every prompt parameter (PEFT zero-inits some, e.g. MPT factors)
        for param in peft_model.prompt_encoder["default"].parameters():
            param.normal_(0.0, 0.5)
    source = ours.prompt_sources["default"]
    getattr(source, "source", source).load_state_dict(peft_model.prompt_encoder["default"].state_dict())
    return peft_model, ours


def task_ids_for(method: str, batch_size: int):
    return torch.tensor([2, 0, 1, 2][:batch_size]) if method == "mpt" else None


def prompt_grads(module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def batch(batch_size: int = 3, length: int = 9, padding: str = "right", seed: int = 1, pad_id: int = PAD):
    """Random ids (>= 3: no special tokens), a padding mask on one side and a row of each padding amount."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 1, 2][:batch_size]):
        if pad and padding == "left":
            mask[row, :pad] = 0
        elif pad:
            mask[row, length - pad:] = 0
    return ids.masked_fill(mask == 0, pad_id), mask


def targets(batch_size: int = 3, length: int = 6, seed: int = 2):
    """Decoder labels (-100 after each row's end) and the matching decoder attention mask."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, VOCAB, (batch_size, length), generator=g)
    for row, cut in enumerate([0, 2, 1, 3][:batch_size]):
        if cut:
            labels[row, length - cut:] = -100
    return labels, (labels != -100).long()


def greedy_through_forward(forward, ids, mask, start: int, steps: int, **kwargs):
    """Greedy decoding by full forward passes, forward(input_ids, attention_mask, decoder_input_ids, **kwargs)
    → logits [B, T_dec, V]; a row that emitted EOS continues with PAD."""
    sequence = torch.full((len(ids), 1), start)
    finished = torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(steps):
        with torch.no_grad():
            logits = forward(ids, mask, sequence, **kwargs)
        next_ids = logits[:, -1].argmax(-1).masked_fill(finished, PAD)
        finished |= next_ids == EOS
        sequence = torch.cat([sequence, next_ids[:, None]], dim=1)
    return sequence
