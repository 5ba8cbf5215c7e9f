"""Prompt ensembles trained in one mixed batch: members, replicated data, routing, the mean-score answer."""

import pytest
import torch

from fastprompt.train import Trainer, TrainingConfig
from fastprompt.train.ensembles import ensemble_classify, member_names, replicate
from tests.train.common import classification_records, dataset, prompt_model, seq2seq_records

VERBALIZERS = {"positive": "good", "negative": "bad"}


def _config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), steps=3, batch_size=8, lr=0.05, progress="none", plot=False)
    return TrainingConfig(**{**defaults, **kwargs})


def test_member_names():
    assert member_names(3) == ["member0", "member1", "member2"]
    for count in (1, 0, True, 2.0):
        with pytest.raises(ValueError, match="at least 2 members"):
            member_names(count)


def test_replicate_routes_one_copy_per_member(tmp_path):
    data = dataset(tmp_path, classification_records(5), verbalizers=VERBALIZERS)
    copies = replicate(data, ["a", "b"])
    assert len(copies) == 10 and copies.tasks == ["a", "b"]
    assert [e.input_ids for e in copies.examples[:5]] == [e.input_ids for e in data.examples]
    assert [e.task for e in copies.examples] == ["a"] * 5 + ["b"] * 5
    assert copies.choices == {"a": data.choices[None], "b": data.choices[None]}
    assert all(e.task is None for e in data.examples)      # the original is untouched


def test_replicate_refuses_multitask_data(tmp_path):
    data = dataset(tmp_path, seq2seq_records(4, tasks=["x", "y"]))
    with pytest.raises(ValueError, match=r"one task's data; got examples of tasks \['x', 'y'\]"):
        replicate(data, ["a", "b"])


def test_members_train_side_by_side_on_their_own_rows(tmp_path):
    data = dataset(tmp_path, classification_records(12), verbalizers=VERBALIZERS)
    names = member_names(2)
    model = prompt_model(names=names)
    start = {n: model.prompt_sources[n].embedding.weight.detach().clone() for n in names}
    Trainer(model, _config(tmp_path), replicate(data, names)).train()
    after = {n: model.prompt_sources[n].embedding.weight for n in names}
    assert all(not torch.equal(after[n], start[n]) for n in names)
    # Same start, different rows: the members part ways.
    model_same = prompt_model(names=names)
    with torch.no_grad():
        model_same.prompt_sources["member1"].embedding.weight.copy_(
            model_same.prompt_sources["member0"].embedding.weight)
    Trainer(model_same, _config(tmp_path), replicate(data, names)).train()
    assert not torch.equal(model_same.prompt_sources["member0"].embedding.weight,
                           model_same.prompt_sources["member1"].embedding.weight)


def test_ensemble_answer_is_the_label_with_the_best_mean_score(tmp_path):
    data = dataset(tmp_path, classification_records(10, seed=3), verbalizers=VERBALIZERS)
    names = member_names(3)
    model = prompt_model(names=names)
    model.set_adapter("member1")
    trainer = Trainer(model, _config(tmp_path), data)
    per_member = []
    for name in names:
        model.set_adapter(name)
        per_member.append(trainer.label_scores(data.examples, data.choices))
    model.set_adapter("member1")
    expected = []
    for k in range(len(data)):
        mean = {label: sum(scores[k][label] for scores in per_member) / 3 for label in per_member[0][k]}
        expected.append(max(mean, key=mean.get))
    assert ensemble_classify(trainer, data, names) == expected
    assert model.active_adapter == "member1"
    # One member alone is that member's own answer.
    model.set_adapter("member2")
    assert ensemble_classify(trainer, data, ["member2"]) == trainer.classify(data.examples, data.choices)


def test_ensemble_classify_names_missing_members(tmp_path):
    data = dataset(tmp_path, classification_records(4), verbalizers=VERBALIZERS)
    model = prompt_model(names=member_names(2))
    trainer = Trainer(model, _config(tmp_path), data)
    with pytest.raises(ValueError, match=r"missing \['member5'\]"):
        ensemble_classify(trainer, data, ["member0", "member5"])


def test_ensemble_classify_answers_one_task(tmp_path):
    data = dataset(tmp_path, seq2seq_records(4, tasks=["x", "y"]))
    model = prompt_model(names=member_names(2))
    trainer = Trainer(model, _config(tmp_path), dataset(tmp_path, classification_records(4), "c.jsonl",
                                                         verbalizers=VERBALIZERS))
    with pytest.raises(ValueError, match=r"one task's data; got examples of tasks \['x', 'y'\]"):
        ensemble_classify(trainer, data, member_names(2))
