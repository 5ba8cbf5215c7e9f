"""BERT and RoBERTa: same loss, logits and gradients (prompt and classifier head) as PEFT's
PeftModelForSequenceClassification; masked-LM scoring, templates and verbalizers against a reference;
per-adapter heads in mixed batches; checkpoints both ways."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, BertModel

import fastprompt
from tests.backbones.tiny_bidirectional import (
    _BERT,
    NUM_LABELS,
    P,
    batch,
    peft,
    peft_and_fastprompt,
    peft_config,
    prompt_grads,
    task_ids_for,
    tiny,
)
from tests.helpers import assert_close
from tests.peft_pairs import peft_forward

METHODS = ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "mpt", "prefix", "prefix_projection"]
MASK = 4  # the [MASK] id of the tests


def _inputs(family, padding="right", seed=1):
    pad_id = 1 if family.startswith("roberta") else 0
    ids, mask = batch(padding=padding, seed=seed, pad_id=pad_id)
    types = None
    if family.startswith("bert"):
        types = (torch.arange(ids.shape[1]) >= 4).long().expand_as(ids).clone() * mask
    return ids, mask, types


def _peft_head(peft_model):
    return peft_model.base_model.classifier.modules_to_save["default"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_sequence_classification_equals_peft(family, method):
    peft_model, ours = peft_and_fastprompt(tiny(family), method, "SEQ_CLS")
    with torch.no_grad():  # the head copies start equal; make them differ from the frozen original
        for param in _peft_head(peft_model).parameters():
            param.add_(torch.randn_like(param) * 0.1)
        ours.prompt_sources["default"].heads["classifier"].load_state_dict(_peft_head(peft_model).state_dict())
    ids, mask, types = _inputs(family)
    labels = torch.tensor([2, 0, 1])
    kwargs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels,
                  task_ids=task_ids_for(method, len(ids)))

    expected = peft_forward(peft_model, **kwargs)
    expected.loss.backward()
    actual = ours(**kwargs)
    actual.loss.backward()

    assert_close("logits", actual.logits, expected.logits, 1e-5)
    assert_close("loss", actual.loss, expected.loss, 1e-5)
    expected_grads = prompt_grads(peft_model.prompt_encoder["default"])
    actual_grads = prompt_grads(ours.prompt_sources["default"].source)
    assert sorted(actual_grads) == sorted(expected_grads) and expected_grads
    for name, grad in expected_grads.items():
        assert_close(f"grad {name}", actual_grads[name], grad, 1e-4)
    head_grads = prompt_grads(ours.prompt_sources["default"].heads["classifier"])
    for name, grad in prompt_grads(_peft_head(peft_model)).items():
        assert_close(f"grad classifier.{name}", head_grads[name], grad, 1e-4)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix"])
def test_left_padding_equals_peft(method):
    peft_model, ours = peft_and_fastprompt(tiny("bert"), method, "SEQ_CLS")
    ids, mask, types = _inputs("bert", padding="left")
    expected = peft_forward(peft_model, input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert_close("logits", ours(ids, mask, types).logits, expected, 1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix"])
@pytest.mark.parametrize("family", ["bert_mlm", "roberta_mlm"])
def test_masked_lm_logits_equal_peft_feature_extraction(family, method):
    peft_model, ours = peft_and_fastprompt(tiny(family), method, "FEATURE_EXTRACTION")
    ids, mask, _ = _inputs(family)  # PEFT's feature extraction drops token_type_ids
    expected = peft_model(input_ids=ids, attention_mask=mask).logits
    actual = ours(ids, mask)
    assert_close("logits", actual.logits, expected[:, -ids.shape[1]:], 1e-5)  # PEFT's include the virtual tokens


def test_template_positions_place_blocks_before_the_named_tokens():
    insert_before = torch.tensor([[1, 4], [1, 1], [0, 6]])
    actual = fastprompt.template_positions(insert_before, [2, 3], 6)
    for row, (first, second) in enumerate(insert_before.tolist()):
        expected = []
        for t in range(7):
            expected += [-1, -2] if t == first else []
            expected += [-3, -4, -5] if t == second else []
            expected += [t] if t < 6 else []
        assert actual[row].tolist() == expected, (row, actual[row].tolist(), expected)


def _template(ids, mask):
    """A Liu et al. template around the [MASK]: [CLS] v0 v1 <text ... v2 v3 v4 [MASK] ? [SEP] (an anchor ? and
    the [MASK] in each row; right padding)."""
    ids = ids.clone()
    lengths = mask.sum(1)
    for row, n in enumerate(lengths.tolist()):
        ids[row, n - 3], ids[row, n - 2] = MASK, 5  # [MASK], then the anchor token 5
    mask_index = (ids == MASK).long().argmax(1)
    positions = fastprompt.template_positions(torch.stack([torch.ones_like(mask_index), mask_index], 1), [2, 3],
                                              ids.shape[1])
    return ids, positions, mask_index


def _reference_hidden(model, prompts, ids, mask, types, positions):
    """Encoder output at the input tokens, the template built row by row by hand: [B, T, d]."""
    embeddings = model.get_input_embeddings().weight
    rows, row_masks, row_types, places = [], [], [], []
    for b in range(len(ids)):
        rows.append(torch.stack([prompts[b, -p - 1] if p < 0 else embeddings[ids[b, p]] for p in positions[b]]))
        row_masks.append(torch.tensor([1 if p < 0 else int(mask[b, p]) for p in positions[b]]))
        row_types.append(torch.tensor([0 if p < 0 else int(types[b, p]) for p in positions[b]]))
        places.append([positions[b].tolist().index(t) for t in range(ids.shape[1])])
    hidden = model.base_model(inputs_embeds=torch.stack(rows), attention_mask=torch.stack(row_masks),
                              token_type_ids=torch.stack(row_types)).last_hidden_state
    return torch.stack([hidden[b, places[b]] for b in range(len(ids))])


def _two_prompt_model():
    base = tiny("bert_mlm")
    model = fastprompt.get_peft_model(base, fastprompt.PromptTuningConfig(num_virtual_tokens=P))
    model.add_adapter("other", fastprompt.PromptTuningConfig(num_virtual_tokens=P))
    torch.manual_seed(5)
    with torch.no_grad():
        for param in model.prompt_sources.parameters():
            param.normal_(0.0, 0.5)
    return model


def test_template_masked_lm_and_verbalizer_equal_reference():
    model = _two_prompt_model()
    ids, mask, types = _inputs("bert_mlm")
    ids, positions, mask_index = _template(ids, mask)
    names = ["other", "default", "other"]
    verbalizer = [[7, 8], [9], [10, 11, 12]]
    labels = torch.tensor([1, 2, 0])
    mlm_labels = torch.full_like(ids, -100).scatter(1, mask_index[:, None], torch.tensor([[7], [9], [12]]))
    mlm = model(ids, mask, types, positions=positions, adapter_names=names, labels=mlm_labels)
    scored = model(ids, mask, types, positions=positions, adapter_names=names, verbalizer=verbalizer,
                   mask_token_id=MASK, labels=labels)
    scored.loss.backward()

    weights = {n: model.prompt_sources[n].embedding.weight.detach().clone().requires_grad_() for n in ("default",
                                                                                                     "other")}
    prompts = torch.stack([weights[n] for n in names])
    hidden = _reference_hidden(model.base_model, prompts, ids, mask, types, positions)
    logits = model.base_model.cls(hidden)
    at_mask = logits[torch.arange(3), mask_index].log_softmax(-1)
    scores = torch.stack([at_mask[:, words].logsumexp(-1) for words in verbalizer], dim=-1)
    loss = F.cross_entropy(scores, labels)
    loss.backward()
    assert_close("masked-LM logits", mlm.logits, logits, 1e-5)
    assert_close("masked-LM loss", mlm.loss, F.cross_entropy(logits.flatten(0, 1), mlm_labels.flatten(),
                                                             ignore_index=-100), 1e-5)
    assert_close("verbalizer scores", scored.logits, scores, 1e-5)
    assert_close("loss", scored.loss, loss, 1e-5)
    for name in ("default", "other"):
        assert_close(f"grad {name}", model.prompt_sources[name].embedding.weight.grad, weights[name].grad, 1e-4)


def _two_classifiers(method):
    model = fastprompt.get_peft_model(tiny("bert"), peft_config(method, "SEQ_CLS"))
    model.add_adapter("other", peft_config(method, "SEQ_CLS"))
    torch.manual_seed(6)
    with torch.no_grad():
        for param in model.prompt_sources.parameters():
            param.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix"])
def test_mixed_batch_each_row_uses_its_adapters_prompt_and_head(method):
    model = _two_classifiers(method)
    ids, mask, types = _inputs("bert")
    labels = torch.tensor([2, 0, 1])
    names = ["other", "default", "other"]
    mixed = model(ids, mask, types, labels=labels, adapter_names=names)
    mixed.loss.backward()
    mixed_grads = {n: prompt_grads(model.prompt_sources[n].heads) for n in ("default", "other")}
    alone_grads = {n: {} for n in ("default", "other")}
    for row, name in enumerate(names):
        model.zero_grad()
        one = slice(row, row + 1)
        alone = model(ids[one], mask[one], types[one], labels=labels[one], adapter_names=[name])
        (alone.loss / len(names)).backward()  # the mixed loss is the mean over the rows
        assert_close(f"row {row} logits", mixed.logits[one], alone.logits, 1e-5)
        for key, grad in prompt_grads(model.prompt_sources[name].heads).items():
            alone_grads[name][key] = alone_grads[name].get(key, 0) + grad
    for name in ("default", "other"):
        assert sorted(mixed_grads[name]) == sorted(alone_grads[name]) and mixed_grads[name]
        for key, grad in alone_grads[name].items():
            assert_close(f"{name} head grad {key}", mixed_grads[name][key], grad, 1e-4)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix"])
def test_checkpoints_with_the_head_load_both_ways(method, tmp_path):
    peft_model, ours = peft_and_fastprompt(tiny("roberta"), method, "SEQ_CLS")
    with torch.no_grad():
        for param in ours.prompt_sources["default"].heads.parameters():
            param.normal_(0.0, 0.3)
    ids, mask, _ = _inputs("roberta")
    ours.save_pretrained(tmp_path / "ours")
    peft_model.save_pretrained(tmp_path / "peft")
    keys = sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert keys == sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.classifier.out_proj.weight" in keys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_loaded = peft.PeftModel.from_pretrained(tiny("roberta"), tmp_path / "ours")
    ours_loaded = fastprompt.from_pretrained(tiny("roberta"), tmp_path / "peft")
    with torch.no_grad():
        assert_close("PEFT loads ours", peft_forward(peft_loaded, input_ids=ids, attention_mask=mask).logits,
                     ours(ids, mask).logits, 1e-5)
        assert_close("ours loads PEFT's", ours_loaded(ids, mask).logits,
                     peft_forward(peft_model, input_ids=ids, attention_mask=mask).logits, 1e-5)


def test_encoder_without_a_head_trains_a_new_classifier(tmp_path):
    # A sentence encoder ships as a bare BertModel (no masked-LM head): load it as a classifier, whose new
    # head trains with the prompt (PEFT's modules_to_save) and is saved in the adapter.
    torch.manual_seed(0)
    BertModel(BertConfig(**_BERT), add_pooling_layer=True).save_pretrained(tmp_path / "encoder")
    with pytest.raises(ValueError, match="AutoModelForSequenceClassification"):
        fastprompt.get_peft_model(BertModel.from_pretrained(tmp_path / "encoder"),
                                  fastprompt.PromptTuningConfig(num_virtual_tokens=P))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "newly initialized: classifier"
        base = BertForSequenceClassification.from_pretrained(tmp_path / "encoder", num_labels=NUM_LABELS)
    model = fastprompt.get_peft_model(base, fastprompt.PromptTuningConfig(num_virtual_tokens=P))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_sources.default.source.embedding.weight",
                         "prompt_sources.default.heads.classifier.weight",
                         "prompt_sources.default.heads.classifier.bias"}
    frozen = {n: p.clone() for n, p in base.named_parameters()}
    ids, mask, types = _inputs("bert")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {k: v.clone() for k, v in model.prompt_sources["default"].peft_state_dict().items()}
    model(ids, mask, types, labels=torch.tensor([0, 1, 2])).loss.backward()
    optimizer.step()
    after = model.prompt_sources["default"].peft_state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p, frozen[n]) for n, p in base.named_parameters())
    model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = BertForSequenceClassification.from_pretrained(tmp_path / "encoder", num_labels=NUM_LABELS)
    reloaded = fastprompt.from_pretrained(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert_close("reloaded logits", reloaded(ids, mask, types).logits, model(ids, mask, types).logits, 1e-6)


def test_errors_name_the_argument():
    classifier = fastprompt.get_peft_model(tiny("bert"), fastprompt.PromptTuningConfig(num_virtual_tokens=P))
    mlm = fastprompt.get_peft_model(tiny("bert_mlm"), fastprompt.PromptTuningConfig(num_virtual_tokens=P))
    prefix = fastprompt.get_peft_model(tiny("bert"), fastprompt.PrefixTuningConfig(num_virtual_tokens=P))
    ids, mask, _ = _inputs("bert")
    with pytest.raises(ValueError, match="masked-LM model"):
        classifier(ids, mask, verbalizer=[[7], [8]], mask_token_id=MASK)
    with pytest.raises(ValueError, match="exactly one mask_token_id"):
        mlm(ids, mask, verbalizer=[[7], [8]], mask_token_id=MASK)
    with pytest.raises(ValueError, match="verbalizer"):
        mlm(_template(ids, mask)[0], mask, verbalizer=[[7], []], mask_token_id=MASK)
    with pytest.raises(ValueError, match="positions"):
        prefix(ids, mask, positions=fastprompt.template_positions(torch.zeros(3, 1, dtype=torch.long), [P], 9))
    with pytest.raises(ValueError, match="positions must hold each input token"):
        mlm(ids, mask, positions=torch.full((3, 9 + P), -1))
    with pytest.raises(ValueError, match="token_type_ids"):
        classifier(ids, mask, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="insert_before"):
        fastprompt.template_positions(torch.tensor([[3, 1]]), [1, 1], 9)
    with pytest.raises(ValueError, match="generate"):
        mlm.generate(ids)


def test_peft_default_head_names_a_model_lacks_are_not_an_error():
    """PEFT 0.22 adds "pre_classifier" (DistilBERT's) to every sequence classifier's modules_to_save, as it adds
    "classifier" and "score": a model without some of them copies the ones it has; any other missing name is
    refused, naming it."""
    from torch import nn

    from fastprompt.heads import copy_heads

    model = nn.Module()
    model.classifier, model.body = nn.Linear(3, 2), nn.Linear(3, 3)
    heads = copy_heads(model, ["classifier", "score", "pre_classifier"], trainable=True)
    assert list(heads) == ["classifier"] and heads["classifier"] is not model.classifier
    with pytest.raises(ValueError, match=r"has no module named \['head'\]"):
        copy_heads(model, ["classifier", "head"], trainable=True)
