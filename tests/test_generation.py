"""Sampling and stopping in PromptModel.generate."""

import pytest
import torch

import fastprompt
from fastprompt.generation import sample_next
from tests.tiny_models import batch, tiny_model


def _model():
    torch.manual_seed(0)
    return fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=4))


def test_sampling_is_seeded_and_varies():
    model = _model()
    ids, mask, _ = batch(padding="left")
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=1.5, eos_token_id=[])
    first, again = model.generate(ids, seed=7, **kwargs), model.generate(ids, seed=7, **kwargs)
    other = model.generate(ids, seed=8, **kwargs)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.shape == (3, ids.shape[1] + 8)


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = _model()
    ids, mask, _ = batch(padding="left")
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    for kwargs in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, seed=3,
                                 eos_token_id=[], **kwargs)
        assert torch.equal(sampled, greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, do_sample=True, temperature=1.0, top_k=0, top_p=0.7, generator=generator))
             for _ in range(200)}
    assert draws == {0, 1}


def test_eos_stops_rows_and_pads_them():
    model = _model()
    ids, mask, _ = batch(padding="left")
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    eos = int(greedy[0, ids.shape[1] + 1])  # row 0's second new token
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    row = out[0, ids.shape[1]:]
    stop = int((row == eos).nonzero()[0])
    assert (row[stop + 1:] == 0).all()
    if not (out[:, ids.shape[1]:] == eos).any(-1).all():
        assert out.shape[1] == ids.shape[1] + 6  # some row never stopped: all steps ran


def test_zero_new_tokens_returns_the_input():
    model = _model()
    ids, mask, _ = batch()
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=0), ids)


def test_a_cache_larger_than_memory_is_refused_before_allocating(monkeypatch):
    """max_new_tokens=10**12 would need ~10**14 bytes: a ValueError naming it and the most that fits, and
    nothing allocated (the allocator never sees the request)."""
    model = _model()
    ids, mask, _ = batch()
    allocated = []
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: allocated.append(a) or real_zeros(*a, **k))
    with pytest.raises(ValueError, match=r"^max_new_tokens=1000000000000 needs a .* at most about \d+ new") as error:
        model.generate(ids, attention_mask=mask, max_new_tokens=10**12)
    message = str(error.value)
    assert not any(isinstance(a[0], tuple) and 10**12 <= max(a[0]) for a in allocated if a)
    fits = int(message.rsplit("at most about ", 1)[1].split()[0])
    assert 0 < fits < 10**12


def test_the_cache_check_uses_the_memory_the_device_has(monkeypatch):
    model = _model()
    ids, mask, _ = batch()
    B, T = ids.shape
    backbone = model.backbone
    per_token = 2 * backbone.num_layers * B * backbone.num_kv_heads * backbone.head_dim * backbone.dtype.itemsize
    monkeypatch.setattr(fastprompt.generation, "available_bytes", lambda device: per_token * (T + 5))
    assert model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[]).shape == (B, T + 5)
    with pytest.raises(ValueError, match="max_new_tokens=6 .* at most about 5 new tokens"):
        model.generate(ids, attention_mask=mask, max_new_tokens=6)
