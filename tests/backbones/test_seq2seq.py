"""Encoder-decoders (T5, BART): same loss, logits, gradients, greedy tokens and checkpoints as PEFT's
PeftModelForSeq2SeqLM; mixed-task batches equal their rows alone."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import fastprompt
from tests.backbones.tiny_bidirectional import (
    P,
    PAD,
    batch,
    greedy_through_forward,
    peft,
    peft_and_fastprompt,
    peft_config,
    prompt_grads,
    targets,
    task_ids_for,
    tiny,
)
from tests.helpers import assert_close

METHODS = ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "mpt", "prefix", "prefix_projection"]
TASK = "SEQ_2_SEQ_LM"


def _pair(family, method, **kwargs):
    return peft_and_fastprompt(tiny(family, **kwargs), method, TASK)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_loss_logits_and_gradients_equal_peft(family, method, padding):
    peft_model, ours = _pair(family, method)
    ids, mask = batch(padding=padding)
    labels, decoder_mask = targets()
    task_ids = task_ids_for(method, len(ids))
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=decoder_mask,
                  task_ids=task_ids)

    expected = peft_model(**kwargs)
    expected.loss.backward()
    expected_grads = prompt_grads(peft_model.prompt_encoder["default"])
    actual = ours(**kwargs)
    actual.loss.backward()
    actual_grads = prompt_grads(ours.prompt_sources["default"])

    # PEFT's MPT forward also returns the logits of its decoder virtual tokens.
    assert_close("logits", actual.logits, expected.logits[:, -labels.shape[1]:], 1e-5)
    assert_close("loss", actual.loss, expected.loss, 1e-5)
    assert sorted(actual_grads) == sorted(expected_grads) and expected_grads
    for name, grad in expected_grads.items():
        assert_close(f"grad {name}", actual_grads[name], grad, 1e-4)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix"])
def test_mt5_equals_peft(method):
    peft_model, ours = _pair("mt5", method)
    ids, mask = batch()
    labels, decoder_mask = targets()
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=decoder_mask)
    expected, actual = peft_model(**kwargs), ours(**kwargs)
    assert_close("logits", actual.logits, expected.logits, 1e-5)
    assert_close("loss", actual.loss, expected.loss, 1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "mpt"])
def test_bart_scaled_embeddings_scale_tokens_not_prompts(method):
    peft_model, ours = _pair("bart", method, scale_embedding=True)
    ids, mask = batch()
    labels, _ = targets()
    task_ids = task_ids_for(method, len(ids))
    expected = peft_model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids)
    actual = ours(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids)
    assert_close("logits", actual.logits, expected.logits[:, -labels.shape[1]:], 1e-5)
    assert_close("loss", actual.loss, expected.loss, 1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_lstm", "prefix"])
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_greedy_generate_equals_peft_generate(family, method):
    # PEFT's generate is the reference where it decodes as PEFT's forward does; where it does not (PEFT 0.21.2's
    # prefix on transformers 5.25: it passes the prefix as past_key_values beside the model's own `cache`, and
    # the model keeps `cache`), greedy decoding through PEFT's forward is, as in every version.
    peft_model, ours = _pair(family, method)
    ids, mask = batch(padding="left")
    expected = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    start = peft_model.base_model.config.decoder_start_token_id
    through_forward = greedy_through_forward(
        lambda i, m, d: peft_model(input_ids=i, attention_mask=m, decoder_input_ids=d).logits, ids, mask, start, 6)
    if not torch.equal(expected, through_forward[:, :expected.shape[1]]):
        expected = through_forward
    actual = ours.generate(ids, mask, max_new_tokens=6)
    assert torch.equal(actual, expected[:, :actual.shape[1]]), f"\n{actual}\n!=\n{expected}"
    assert (expected[:, actual.shape[1]:] == PAD).all(), f"stopped before every row ended:\n{expected}"


def test_mpt_generate_decodes_after_the_decoder_prompt_its_forward_trains():
    # PEFT's MPT forward puts virtual tokens before the decoder's input; its generate leaves them out. Ours
    # decodes as the forward trains: greedy generate equals greedy decoding through PEFT's forward.
    peft_model, ours = _pair("t5", "mpt")
    ids, mask = batch(padding="left")
    task_ids = task_ids_for("mpt", len(ids))
    def peft_forward(input_ids, attention_mask, decoder_input_ids, task_ids):
        # PEFT's MPT forward builds the decoder input from labels: labels whose shift is the sequence.
        labels = torch.cat([decoder_input_ids[:, 1:], torch.full_like(decoder_input_ids[:, :1], PAD)], dim=1)
        out = peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, task_ids=task_ids)
        return out.logits[:, P:]

    expected = greedy_through_forward(peft_forward, ids, mask, PAD, 5, task_ids=task_ids)
    actual = ours.generate(ids, mask, task_ids=task_ids, max_new_tokens=5)
    assert torch.equal(actual, expected[:, :actual.shape[1]]), f"\n{actual}\n!=\n{expected}"


def _two_adapters(family, method):
    model = fastprompt.get_peft_model(tiny(family), peft_config(method, TASK))
    model.add_adapter("other", peft_config(method, TASK))
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.prompt_sources.parameters():
            param.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix"])
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_mixed_batch_rows_equal_rows_alone(family, method):
    model = _two_adapters(family, method)
    ids, mask = batch(padding="left")
    labels, decoder_mask = targets()
    names = ["other", "default", "other"]
    with torch.no_grad():
        mixed = model(ids, mask, labels=labels, decoder_attention_mask=decoder_mask, adapter_names=names).logits
        by_index = model(ids, mask, labels=labels, decoder_attention_mask=decoder_mask,
                         task_ids=torch.tensor([1, 0, 1])).logits
        generated = model.generate(ids, mask, adapter_names=names, max_new_tokens=5)
        for row, name in enumerate(names):
            one = slice(row, row + 1)
            alone = model(ids[one], mask[one], labels=labels[one], decoder_attention_mask=decoder_mask[one],
                          adapter_names=[name]).logits
            assert_close(f"row {row} logits", mixed[one], alone, 1e-5)
            single = model.generate(ids[one], mask[one], adapter_names=[name], max_new_tokens=5)
            assert torch.equal(generated[one, :single.shape[1]], single)
    assert_close("task_ids logits", by_index, mixed, 1e-6)


def _logits(model, ids, mask, labels, task_ids):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids)
    return out.logits[:, -labels.shape[1]:]


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_mlp", "mpt", "prefix"])
def test_checkpoints_load_both_ways(method, tmp_path):
    peft_model, ours = _pair("t5", method)
    ids, mask = batch()
    labels, _ = targets()
    task_ids = task_ids_for(method, len(ids))
    ours.save_pretrained(tmp_path / "ours")
    peft_model.save_pretrained(tmp_path / "peft")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["task_type"], config["num_transformer_submodules"]) == (TASK, 2)
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in peft_file.items()}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_loaded = peft.PeftModel.from_pretrained(tiny("t5"), tmp_path / "ours")
    ours_loaded = fastprompt.from_pretrained(tiny("t5"), tmp_path / "peft")
    assert isinstance(ours_loaded, fastprompt.Seq2SeqPromptModel)
    assert not any(p.requires_grad for p in ours_loaded.parameters())
    assert_close("PEFT loads ours", _logits(peft_loaded, ids, mask, labels, task_ids),
                 _logits(ours, ids, mask, labels, task_ids), 1e-5)
    assert_close("ours loads PEFT's", _logits(ours_loaded, ids, mask, labels, task_ids),
                 _logits(peft_model, ids, mask, labels, task_ids), 1e-5)


def test_fastprompt_config_on_t5_gets_peft_fields():
    model = fastprompt.get_peft_model(tiny("t5"), fastprompt.PromptTuningConfig(num_virtual_tokens=P))
    config = model.active_peft_config
    assert (config.task_type, config.num_transformer_submodules, config.num_layers) == (TASK, 2, 3)
    assert model.prompt_sources["default"].embedding.weight.shape == (2 * P, 32)


def test_num_items_in_batch_sums_the_loss():
    _, ours = _pair("t5", "prompt_tuning")
    ids, mask = batch()
    labels, _ = targets()
    mean = ours(ids, mask, labels=labels).loss
    summed = ours(ids, mask, labels=labels, num_items_in_batch=7).loss
    assert_close("loss", summed, mean * int((labels != -100).sum()) / 7, 1e-6)


def test_errors_name_the_argument():
    base = tiny("t5")
    model = fastprompt.get_peft_model(base, fastprompt.PromptTuningConfig(num_virtual_tokens=P))
    ids, mask = batch()
    with pytest.raises(ValueError, match="labels .* or decoder_input_ids"):
        model(ids, mask)
    with pytest.raises(ValueError, match="decoder_attention_mask"):
        model(ids, mask, labels=targets()[0], decoder_attention_mask=torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="task_type"):
        fastprompt.get_peft_model(tiny("t5"), fastprompt.PromptTuningConfig(num_virtual_tokens=P,
                                                                            task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="path"):
        fastprompt.get_peft_model(tiny("t5"), fastprompt.PromptTuningConfig(num_virtual_tokens=P),
                                  path="shared_prefix")
    with pytest.raises(ValueError, match="decoder layers"):
        deeper_decoder = tiny("t5")
        deeper_decoder.decoder.block.append(deeper_decoder.decoder.block[-1])
        fastprompt.get_peft_model(deeper_decoder, fastprompt.PrefixTuningConfig(num_virtual_tokens=P))
    with pytest.raises(ValueError, match="num_transformer_submodules"):
        fastprompt.get_peft_model(tiny("t5"), fastprompt.PromptTuningConfig(num_virtual_tokens=P,
                                                                            num_transformer_submodules=3))
    with pytest.raises(ValueError, match="wraps seq2seq"):
        fastprompt.Seq2SeqPromptModel(tiny("bert"))
    for family in ("t5", "bert"):  # the causal class refuses the other kinds and names the way out
        with pytest.raises(ValueError, match="wraps causal.*get_peft_model"):
            fastprompt.PromptModel(tiny(family), fastprompt.PromptTuningConfig(num_virtual_tokens=P))
