"""EncoderPromptModel(pooling="mean"): a BERT classifier's head reads the mean of each row's own final hidden
states, checked against a hand computation; errors; the model's pooler is back after every call."""

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from tests.backbones.tiny_bidirectional import P, batch, peft_config, prompt_grads, tiny
from tests.helpers import assert_close

LABELS = torch.tensor([2, 0, 1])


def _mean_model(method="prompt_tuning", seed=1):
    model = fastprompt.get_peft_model(tiny("bert"), peft_config(method, "SEQ_CLS"), pooling="mean")
    torch.manual_seed(seed)
    with torch.no_grad():  # random prompt and head, so that neither starts at an init a bug could hide behind
        for param in model.prompt_sources.parameters():
            param.normal_(0.0, 0.5)
    return model


def _types(ids, mask):
    return (torch.arange(ids.shape[1]) >= 4).long().expand_as(ids) * mask


@pytest.mark.parametrize("padding", ["right", "left"])
def test_prompt_tuning_head_reads_the_mean_of_the_rows_own_states(padding):
    model = _mean_model()
    ids, mask = batch(padding=padding)
    types = _types(ids, mask)
    source = model.prompt_sources["default"]
    prompt, head = source.source.embedding.weight, source.heads["classifier"]

    out = model(ids, mask, token_type_ids=types, labels=LABELS)
    out.loss.backward()
    actual_grads = {**prompt_grads(source.source), **prompt_grads(head)}
    model.prompt_sources.zero_grad()

    # By hand: the prompt before every row (attended, token type 0), the bare encoder, then the mean of the
    # final states at the row's non-padding tokens (positions P.. of the sequence) into the head.
    B, T = ids.shape
    embeds = torch.cat([prompt.expand(B, P, -1), model.base_model.get_input_embeddings()(ids)], dim=1)
    hidden = model.base_model.bert(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(B, P).long(), mask], 1),
                                   token_type_ids=torch.cat([torch.zeros(B, P).long(), types], 1)).last_hidden_state
    pooled = torch.stack([hidden[b, P:][mask[b].bool()].mean(dim=0) for b in range(B)])
    logits = head(pooled)
    loss = F.cross_entropy(logits, LABELS)
    loss.backward()

    assert_close("logits", out.logits, logits, 1e-5)
    assert_close("loss", out.loss, loss, 1e-5)
    expected_grads = {**prompt_grads(source.source), **prompt_grads(head)}
    assert sorted(actual_grads) == ["bias", "embedding.weight", "weight"]
    for name, grad in expected_grads.items():
        assert_close(f"grad {name}", actual_grads[name], grad, 1e-4)


def test_prefix_tuning_head_reads_the_mean_of_the_encoder_output():
    """Prefix tuning puts no virtual token in the sequence: the mean runs over the encoder's own outputs,
    taken here from a hook on the encoder during the same call."""
    model = _mean_model("prefix")
    ids, mask = batch(padding="right", seed=4)
    seen = []
    hook = model.base_model.bert.encoder.register_forward_hook(lambda m, i, o: seen.append(o.last_hidden_state))
    try:
        out = model(ids, mask, token_type_ids=_types(ids, mask), labels=LABELS)
    finally:
        hook.remove()
    (hidden,) = seen
    assert hidden.shape[:2] == ids.shape
    pooled = torch.stack([hidden[b][mask[b].bool()].mean(dim=0) for b in range(len(ids))])
    assert_close("logits", out.logits, model.prompt_sources["default"].heads["classifier"](pooled), 1e-5)


def test_first_pooling_is_unchanged_and_the_pooler_is_restored():
    mean = _mean_model()
    first = fastprompt.get_peft_model(tiny("bert"), peft_config("prompt_tuning", "SEQ_CLS"))
    first.prompt_sources.load_state_dict(mean.prompt_sources.state_dict())
    ids, mask = batch(padding="right", seed=3)
    pooler = mean.base_model.bert.pooler
    with torch.no_grad():
        by_mean, by_first = mean(ids, mask).logits, first(ids, mask).logits
    assert mean.base_model.bert.pooler is pooler and first.pooling == "first"
    assert not torch.allclose(by_mean, by_first)  # the two read different features
    handle = mean.prompt_sources["default"].heads["classifier"].register_forward_pre_hook(_fail)
    with pytest.raises(RuntimeError, match="head failed"):  # a call that fails puts the pooler back too
        mean(ids, mask)
    handle.remove()
    assert mean.base_model.bert.pooler is pooler


def _fail(module, args):
    raise RuntimeError("head failed")


def test_mean_pooling_survives_save_and_load(tmp_path):
    model = _mean_model()
    model.save_pretrained(tmp_path)
    loaded = fastprompt.from_pretrained(tiny("bert"), tmp_path, pooling="mean")
    ids, mask = batch(padding="left", seed=5)
    with torch.no_grad():
        assert_close("logits", loaded(ids, mask).logits, model(ids, mask).logits, 1e-6)


@pytest.mark.parametrize("family", ["roberta", "bert_mlm"])
def test_mean_pooling_needs_a_classifier_on_a_pooler(family):
    with pytest.raises(ValueError, match=r"pooling='mean' replaces the pooler.*use pooling='first'"):
        fastprompt.get_peft_model(tiny(family), fastprompt.PromptTuningConfig(num_virtual_tokens=P), pooling="mean")


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match=r"pooling must be one of \('first', 'mean'\), got 'max'"):
        fastprompt.get_peft_model(tiny("bert"), peft_config("prompt_tuning", "SEQ_CLS"), pooling="max")
