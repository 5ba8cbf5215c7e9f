"""A P-tuning adapter with the residual encoder, started from a text, reads as that text: before any tuning, its
logits on an input equal the plain backbone's on text + input. It still trains through its encoder, saves in
PEFT's format (the encoded tokens; the flag in fastprompt_config.json) and answers alike when loaded back."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import fastprompt
from fastprompt import io
from fastprompt.train.encoder_init import init_encoder_from_text
from tests.helpers import assert_close
from tests.tiny_models import VOCAB, tiny_model
from tests.train.common import assert_reads_as_text

TEXT = [5, 17, 42, 8, 99, 23, 61]   # 7 ids: an odd prompt length


def residual_config(encoder_type: str = "MLP", **overrides):
    return fastprompt.PromptEncoderConfig(num_virtual_tokens=len(TEXT), encoder_reparameterization_type=encoder_type,
                                          encoder_hidden_size=12, encoder_residual=True, **overrides)


@pytest.mark.parametrize("encoder_type", ["MLP", "LSTM"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_untuned_encoder_reads_as_its_text(family, encoder_type):
    base = tiny_model(family)
    model = fastprompt.get_peft_model(base, residual_config(encoder_type))
    assert_reads_as_text(base, model, init_encoder_from_text, TEXT)


def test_the_residual_encoder_trains_and_its_skip_carries_the_gradient():
    """One AdamW step moves the table (through the skip) and the encoder's last layer (its zero start takes a
    gradient, as LoRA's zero B does); the prompt then differs from the text."""
    base = tiny_model("llama")
    model = fastprompt.get_peft_model(base, residual_config())
    init_encoder_from_text(model, TEXT)
    source = model.prompt_sources["default"]
    before = {name: p.detach().clone() for name, p in source.named_parameters()}
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW(source.parameters(), lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    assert source.embedding.weight.grad.abs().sum() > 0
    assert source.mlp_head[-1].weight.grad.abs().sum() > 0
    optimizer.step()
    moved = {name for name, p in source.named_parameters() if not torch.equal(p, before[name])}
    assert {"embedding.weight", "mlp_head.4.weight", "mlp_head.4.bias"} <= moved, moved
    assert not torch.equal(source.encoded(), source.embedding.weight)


def test_a_residual_adapter_saves_as_peft_and_loads_back(tmp_path):
    """The adapter file holds the encoded tokens (table + encoder), which PEFT and fastprompt both load without
    an encoder; adapter_config.json keeps to PEFT's fields, encoder_residual goes to fastprompt_config.json."""
    base = tiny_model("llama")
    ours = fastprompt.get_peft_model(base, residual_config())
    init_encoder_from_text(ours, TEXT)
    with torch.no_grad():
        ours.prompt_sources["default"].mlp_head[-1].bias.add_(0.5)   # a tuned encoder: tokens != table
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / io.CONFIG_NAME).read_text())
    assert set(saved) <= set(peft.PromptEncoderConfig.__dataclass_fields__), set(saved)
    assert json.loads((tmp_path / io.EXTRAS_NAME).read_text()) == {"encoder_residual": True}
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    loaded = fastprompt.from_pretrained(tiny_model("llama"), tmp_path)
    assert loaded.peft_config["default"].encoder_residual is True
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        assert_close("fastprompt reloaded", loaded(input_ids=ids).logits, want, 1e-5)
        # PEFT's causal logits include the virtual tokens' positions
        assert_close("PEFT", theirs(input_ids=ids).logits[:, len(TEXT):], want, 1e-4)


def test_peft_s_encoder_is_unchanged_without_the_flag():
    """encoder_residual=False (the default) is PEFT's encoder: its tokens are the encoder's output alone."""
    model = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptEncoderConfig(
        num_virtual_tokens=len(TEXT), encoder_hidden_size=12))
    source = model.prompt_sources["default"]
    with torch.no_grad():
        assert torch.equal(source.encoded(), source.mlp_head(source.embedding.weight))
        assert source.mlp_head[-1].weight.abs().sum() > 0


def test_refusals():
    model = fastprompt.get_peft_model(tiny_model("llama"), residual_config())
    with pytest.raises(ValueError, match="token_ids must hold num_virtual_tokens=7 ids for adapter 'default', got 3"):
        init_encoder_from_text(model, TEXT[:3])
    with pytest.raises(ValueError, match="adapter_name 'other' is not loaded; loaded: \\['default'\\]"):
        init_encoder_from_text(model, TEXT, "other")
    plain = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptEncoderConfig(
        num_virtual_tokens=len(TEXT), encoder_hidden_size=12))
    with pytest.raises(ValueError, match="encoder_residual=True to start from a text, got P_TUNING "
                                         "\\(encoder_residual=False"):
        init_encoder_from_text(plain, TEXT)
    prompt = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=7))
    with pytest.raises(ValueError, match="got PROMPT_TUNING"):
        init_encoder_from_text(prompt, TEXT)
    with pytest.raises(ValueError, match="encoder_residual must be True or False, got 'yes'"):
        fastprompt.PromptEncoderConfig(num_virtual_tokens=4, encoder_residual="yes")
