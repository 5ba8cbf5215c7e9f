"""A prefix-tuning adapter started from a text reads as that text: before any tuning, the prefix model's
logits on an input equal the plain backbone's on text + input (the input's positions after the text's)."""

from __future__ import annotations

import pytest
import torch

import fastprompt
from fastprompt.train.prefix_init import init_prefix_from_text
from tests.helpers import assert_close
from tests.tiny_models import VOCAB, tiny_model
from tests.train.common import assert_reads_as_text

TEXT = [5, 17, 42, 8, 99, 23, 61]   # 7 ids: an odd prefix length


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_untuned_prefix_reads_as_its_text(family):
    base = tiny_model(family)
    model = fastprompt.get_peft_model(base, fastprompt.PrefixTuningConfig(num_virtual_tokens=len(TEXT)))
    assert_reads_as_text(base, model, init_prefix_from_text, TEXT)


def test_each_adapter_of_a_mixed_batch_reads_its_own_text():
    base = tiny_model("llama")
    config = fastprompt.PrefixTuningConfig(num_virtual_tokens=len(TEXT))
    model = fastprompt.get_peft_model(base, config, "a")
    model.add_adapter("b", config)
    other = TEXT[::-1]
    init_prefix_from_text(model, TEXT, "a")
    init_prefix_from_text(model, other, "b")
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(input_ids=ids, adapter_names=["b", "a"]).logits
        want_b = base(input_ids=torch.cat([torch.tensor([other]), ids[:1]], 1)).logits[:, len(TEXT):]
        want_a = base(input_ids=torch.cat([torch.tensor([TEXT]), ids[1:]], 1)).logits[:, len(TEXT):]
    assert_close("row b", got[:1], want_b, 1e-4)
    assert_close("row a", got[1:], want_a, 1e-4)


def test_refusals():
    base = tiny_model("llama")
    model = fastprompt.get_peft_model(base, fastprompt.PrefixTuningConfig(num_virtual_tokens=len(TEXT)))
    with pytest.raises(ValueError, match="token_ids must hold num_virtual_tokens=7 ids for adapter 'default', got 3"):
        init_prefix_from_text(model, TEXT[:3])
    with pytest.raises(ValueError, match="adapter_name 'other' is not loaded; loaded: \\['default'\\]"):
        init_prefix_from_text(model, TEXT, "other")
    projected = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PrefixTuningConfig(
        num_virtual_tokens=len(TEXT), prefix_projection=True, encoder_hidden_size=16))
    with pytest.raises(ValueError, match="must be prefix tuning without prefix_projection"):
        init_prefix_from_text(projected, TEXT)
    prompt = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=7))
    with pytest.raises(ValueError, match="got PROMPT_TUNING"):
        init_prefix_from_text(prompt, TEXT)
