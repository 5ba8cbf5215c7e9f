"""Sliding-window attention (Mistral; Qwen2 with use_sliding_window): fastprompt's prefix attention applies
no window, so it equals PEFT while prefix + own keys fit the window and refuses, naming sliding_window,
beyond it (never a silently different answer)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import RTOL, assert_close
from tests.peft_pairs import P, peft_and_fastprompt
from tests.tiny_models import batch

WINDOW = 9


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix"])
def test_within_the_window_equals_peft_beyond_it_refused(method):
    peft_model, ours = peft_and_fastprompt("mistral", method)
    peft_model.base_model.config.sliding_window = WINDOW  # one base model: PEFT's mask reads it per call
    assert ours.backbone.sliding_window == WINDOW
    input_ids, mask, _ = batch(3, WINDOW - P, padding="left")
    expected = peft_model(input_ids=input_ids, attention_mask=mask).logits[:, -(WINDOW - P):]
    actual = ours(input_ids=input_ids, attention_mask=mask).logits
    assert_close("logits", actual, expected, RTOL[torch.float32])
    longer_ids, longer_mask, _ = batch(3, WINDOW - P + 1, padding="left")
    # The shared prefix's attention applies no window, so it refuses; the concat path (not prefix tuning's)
    # is PEFT's own, the model's windowed attention, and equals it beyond the window too.
    with pytest.raises(ValueError, match=f"sliding_window={WINDOW}"):
        ours(input_ids=longer_ids, attention_mask=longer_mask, path="shared_prefix")
    if method != "prefix":
        expected = peft_model(input_ids=longer_ids, attention_mask=longer_mask).logits[:, -(WINDOW - P + 1):]
        actual = ours(input_ids=longer_ids, attention_mask=longer_mask, path="concat").logits
        assert_close("logits", actual, expected, RTOL[torch.float32])
    with pytest.raises(ValueError, match=f"sliding_window={WINDOW}.*at most 2"):
        ours.generate(input_ids=input_ids[:, -3:], max_new_tokens=3)
    ours.generate(input_ids=input_ids[:, -3:], max_new_tokens=2, eos_token_id=[])


def test_a_model_without_windowed_layers_has_no_window():
    peft_model, ours = peft_and_fastprompt("qwen2", "prompt_tuning")
    assert ours.backbone.sliding_window is None
