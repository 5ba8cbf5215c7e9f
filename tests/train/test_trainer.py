"""Trainer: exact resume, accumulation equals a larger batch, early stopping, schedules, task routing."""

import math

import pytest
import torch
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

import fastprompt
from fastprompt.train import Trainer, TrainingConfig, collate, lr_factor, read_log
from fastprompt.train.averaging import last_steps
from fastprompt.train.data import epoch_order
from tests.helpers import assert_close
from tests.train.common import classification_records, dataset, prompt_model, seq2seq_records


def _config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), steps=4, batch_size=4, lr=0.05, progress="none", plot=False)
    return TrainingConfig(**{**defaults, **kwargs})


@pytest.mark.parametrize("schedule, reference", [
    ("constant", get_constant_schedule_with_warmup),
    ("linear", get_linear_schedule_with_warmup),
    ("cosine", get_cosine_schedule_with_warmup),
])
def test_schedules_match_transformers(schedule, reference):
    total, warmup = 20, 5
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = (reference(optimizer, warmup) if schedule == "constant" else reference(optimizer, warmup, total))
    expected = []
    for _ in range(total):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [lr_factor(schedule, step, warmup, total) for step in range(total)]
    assert ours == pytest.approx(expected, abs=1e-12)
    assert ours[0] == 0.0 and ours[warmup] == 1.0
    if schedule == "cosine":
        assert ours[warmup + (total - warmup) // 2 + 0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4667)), abs=1e-3)


RESUME_CASES = [
    pytest.param(fastprompt.PromptTuningConfig(num_virtual_tokens=3),
                 dict(optimizer="adafactor", lr=0.3, schedule="cosine", warmup=2, grad_accum=2, batch_size=2),
                 id="prompt-tuning-adafactor-cosine-accum"),
    pytest.param(fastprompt.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16, encoder_dropout=0.2),
                 dict(optimizer="adamw", schedule="linear", warmup=1, eval_every=2, patience=5),
                 id="p-tuning-dropout-adamw-linear-eval"),
    pytest.param(fastprompt.PromptTuningConfig(num_virtual_tokens=3),   # the checkpoint (step 3) holds the mean
                 dict(optimizer="adamw", schedule="linear", average_last=4),   # of the tail's first step (3)
                 id="prompt-tuning-tail-average"),
]


@pytest.mark.parametrize("config, options", RESUME_CASES)
def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, config, options):
    data = dataset(tmp_path, seq2seq_records(10))
    steps = 6
    full = Trainer(prompt_model(config), _config(tmp_path / "a", steps=steps, **options), data, data)
    expected = full.train().losses
    assert len(expected) == steps

    first = Trainer(prompt_model(config), _config(tmp_path / "b", steps=steps, save_every=3, **options), data, data)
    original = Trainer.step_batches

    def interrupted(self, step):
        if step == 4:
            raise KeyboardInterrupt("stopped between checkpoints")
        return original(self, step)

    monkeypatch.setattr(Trainer, "step_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    monkeypatch.setattr(Trainer, "step_batches", original)
    assert [r["step"] for r in read_log(tmp_path / "b" / "out" / "train_log.jsonl") if "loss" in r] == [1, 2, 3, 4]

    resumed_model = prompt_model(config)
    torch.manual_seed(1234)  # the checkpoint's RNG state must win over whatever came before
    resumed = Trainer(resumed_model, _config(tmp_path / "b", steps=steps, save_every=3, **options), data, data)
    result = resumed.train(resume=True)
    assert result.losses == expected[3:]  # bit for bit
    log = [r["loss"] for r in read_log(tmp_path / "b" / "out" / "train_log.jsonl") if "loss" in r]
    assert log == expected
    for (name, a), b in zip(full.model.prompt_sources.named_parameters(), resumed_model.prompt_sources.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("change", [dict(seed=1), dict(stratify=True)], ids=["seed", "stratify"])
def test_resume_refuses_a_different_data_order(tmp_path, change):
    data = dataset(tmp_path, seq2seq_records(8))
    Trainer(prompt_model(), _config(tmp_path, steps=2, save_every=2), data).train()
    with pytest.raises(ValueError, match="data order"):
        Trainer(prompt_model(), _config(tmp_path, steps=4, **change), data).train(resume=True)


def test_stratified_batches_hold_each_label_at_its_share(tmp_path):
    data = dataset(tmp_path, classification_records(30, seed=2))
    labels = [e.label for e in data.examples]
    trainer = Trainer(prompt_model(), _config(tmp_path, batch_size=8, stratify=True, seed=3), data)
    order = epoch_order(len(data), seed=3, epoch=0, strata=[(None, label) for label in labels])
    for step in range(3):
        rows = order[step * 8:(step + 1) * 8]
        assert torch.equal(trainer.step_batches(step)[0]["input_ids"], collate([data[i] for i in rows])["input_ids"])
        share = 8 * labels.count("positive") / len(labels)
        assert abs(sum(labels[i] == "positive" for i in rows) - share) < 2


def test_stratify_needs_shuffled_data(tmp_path):
    with pytest.raises(ValueError, match="stratify .* shuffle=True"):
        _config(tmp_path, stratify=True, shuffle=False)


@pytest.mark.parametrize("config", [fastprompt.PromptTuningConfig(num_virtual_tokens=3),
                                    fastprompt.PrefixTuningConfig(num_virtual_tokens=3)], ids=["prompt", "prefix"])
def test_accumulation_equals_a_larger_batch(tmp_path, config):
    # Targets of 1-4 tokens: micro-batches hold different token counts, so a mean of micro-batch means
    # would weight them wrongly; the step's loss must be the token mean over the whole batch.
    data = dataset(tmp_path, seq2seq_records(12, seed=5))
    options = dict(steps=3, max_grad_norm=None, lr=0.05)
    big = Trainer(prompt_model(config), _config(tmp_path / "big", batch_size=6, grad_accum=1, **options), data)
    small = Trainer(prompt_model(config), _config(tmp_path / "small", batch_size=2, grad_accum=3, **options), data)
    big_log, small_log = big.train().log, small.train().log
    for a, b in zip(big_log, small_log):
        assert a["target_tokens"] == b["target_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)  # the gradient's scale, too
    for a, b in zip(big.model.prompt_sources.parameters(), small.model.prompt_sources.parameters()):
        assert_close("prompt", b, a, 1e-5)


def test_early_stopping_stops(tmp_path):
    data = dataset(tmp_path, classification_records(8), verbalizers={"positive": "good", "negative": "bad"})
    trainer = Trainer(prompt_model(), _config(tmp_path, steps=50, lr=0.0, eval_every=2, patience=2,
                                              metric="eval_loss"), data, data)
    result = trainer.train()
    assert result.stopped_early and result.step == 6     # best at 2, no gain at 4 and 6
    evals = [r for r in result.log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6] and "eval_accuracy" in evals[0]
    assert (tmp_path / "out" / "best" / "adapter_config.json").is_file()


def _scripted_evaluations(trainer, accuracies):
    """Make `trainer.evaluate` report `accuracies` in turn, keeping a copy of the prompt at each evaluation."""
    seen, script = [], iter(accuracies)

    def evaluate(data=None):
        seen.append(trainer.model.prompt_sources["default"].embedding.weight.detach().clone())
        return {"eval_loss": 1.0, "eval_accuracy": next(script)}

    trainer.evaluate = evaluate
    return seen


@pytest.mark.parametrize("restore_best", [True, False])
def test_training_ends_with_the_best_evaluations_prompt(tmp_path, restore_best):
    data = dataset(tmp_path, classification_records(8), verbalizers={"positive": "good", "negative": "bad"})
    trainer = Trainer(prompt_model(), _config(tmp_path, steps=4, eval_every=1, restore_best=restore_best), data, data)
    seen = _scripted_evaluations(trainer, [0.5, 0.9, 0.6, 0.7])
    result = trainer.train()
    assert (result.best_step, result.best_metric, result.restored_best) == (2, 0.9, restore_best)
    final = trainer.model.prompt_sources["default"].embedding.weight
    expected = seen[1] if restore_best else seen[3]
    assert not torch.equal(seen[1], seen[3])
    assert torch.equal(final, expected)
    saved = fastprompt.io.read_tensors(tmp_path / "out" / "adapter_model.safetensors")
    assert torch.equal(saved["prompt_embeddings"], expected)


def test_restore_best_keeps_the_last_prompt_when_the_last_evaluation_is_best(tmp_path):
    data = dataset(tmp_path, classification_records(8), verbalizers={"positive": "good", "negative": "bad"})
    trainer = Trainer(prompt_model(), _config(tmp_path, steps=4, eval_every=2), data, data)
    seen = _scripted_evaluations(trainer, [0.5, 0.9])
    result = trainer.train()
    assert (result.best_step, result.restored_best) == (4, False)
    assert torch.equal(trainer.model.prompt_sources["default"].embedding.weight, seen[1])


def test_the_best_step_survives_a_checkpoint(tmp_path, capsys):
    data = dataset(tmp_path, classification_records(8), verbalizers={"positive": "good", "negative": "bad"})
    config = _config(tmp_path, steps=2, eval_every=1, save_every=2, progress="print")
    first = Trainer(prompt_model(), config, data, data)
    _scripted_evaluations(first, [0.9, 0.5])
    first.train()
    resumed = Trainer(prompt_model(), _config(tmp_path, steps=4, eval_every=1, save_every=2, progress="print"),
                      data, data)
    _scripted_evaluations(resumed, [0.6, 0.7])
    result = resumed.train(resume=True)
    # The copy of step 1's prompt was not kept across processes: the run says so and ends with step 4's.
    assert (result.best_step, result.best_metric, result.restored_best) == (1, 0.9, False)
    assert "the best evaluation (step 1) predates the resume" in capsys.readouterr().out


def test_tail_averaging_ends_with_the_mean_of_the_last_steps_prompts(tmp_path):
    data = dataset(tmp_path, classification_records(8), verbalizers={"positive": "good", "negative": "bad"})
    snapshots = []

    class Snapshots(Trainer):   # the prompt after each step, as its log record is written
        def _log(self, path, record, result):
            super()._log(path, record, result)
            snapshots.append(self.model.prompt_sources["default"].embedding.weight.detach().clone())

    torch.manual_seed(0)
    last = Snapshots(prompt_model(), _config(tmp_path / "a", steps=5, schedule="linear"), data).train()
    torch.manual_seed(0)
    trainer = Trainer(prompt_model(), _config(tmp_path / "b", steps=5, schedule="linear", average_last=3), data)
    result = trainer.train()
    assert result.averaged and not last.averaged and result.losses == last.losses
    final = trainer.model.prompt_sources["default"].embedding.weight
    assert not torch.allclose(final, snapshots[-1])
    torch.testing.assert_close(final, torch.stack(snapshots[2:]).mean(0))
    saved = fastprompt.io.read_tensors(tmp_path / "b" / "out" / "adapter_model.safetensors")
    assert torch.equal(saved["prompt_embeddings"], final)


@pytest.mark.parametrize("accuracies, restored", [([0.5, 0.9, 0.7], True), ([0.5, 0.6, 0.9], False)])
def test_the_averaged_prompt_is_evaluated_and_kept_only_when_best(tmp_path, accuracies, restored):
    data = dataset(tmp_path, classification_records(8), verbalizers={"positive": "good", "negative": "bad"})
    trainer = Trainer(prompt_model(), _config(tmp_path, steps=4, eval_every=2, average_last=2), data, data)
    seen = _scripted_evaluations(trainer, accuracies)
    result = trainer.train()
    evals = [r for r in result.log if "eval_accuracy" in r]
    assert [(r["step"], r.get("averaged_last")) for r in evals] == [(2, None), (4, None), (4, 2)]
    assert result.averaged and result.restored_best == restored and result.best_step == 4
    assert not torch.equal(seen[1], seen[2])
    final = trainer.model.prompt_sources["default"].embedding.weight
    assert torch.equal(final, seen[1] if restored else seen[2])


def test_a_tail_share_that_rounds_to_one_step_does_not_average():
    assert [last_steps(steps, 0.25) for steps in (100, 8, 7, 4, 1)] == [25, 2, 0, 0, 0]


def test_a_resume_that_would_average_other_steps_is_refused(tmp_path):
    data = dataset(tmp_path, seq2seq_records(8))
    Trainer(prompt_model(), _config(tmp_path, steps=4, save_every=2, average_last=3), data).train()
    with pytest.raises(ValueError, match="holds a mean of the prompts from step 2, but this run averages from step 4"):
        Trainer(prompt_model(), _config(tmp_path, steps=4, average_last=1), data).train(
            resume=str(tmp_path / "out" / "checkpoint-2"))
    with pytest.raises(ValueError, match="average_last must be an int from 0 to steps \\(4\\), got 5"):
        _config(tmp_path, steps=4, average_last=5)


def test_classification_accuracy_learns(tmp_path):
    data = dataset(tmp_path, classification_records(16), verbalizers={"positive": "review", "negative": "film"})
    trainer = Trainer(prompt_model(fastprompt.PromptTuningConfig(num_virtual_tokens=4)),
                      _config(tmp_path, steps=25, lr=0.2, plot=True), data, data)
    result = trainer.train()
    assert result.losses[-1] < result.losses[0] / 2
    assert trainer.evaluate()["eval_accuracy"] == 1.0
    assert (tmp_path / "out" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_prompt_parameters_train(tmp_path):
    data = dataset(tmp_path, seq2seq_records(8))
    model = prompt_model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    Trainer(model, _config(tmp_path, steps=2), data).train()
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    assert changed == ["prompt_sources.default.embedding.weight"]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_multitask_rows_reach_their_adapters_by_name(tmp_path):
    data = dataset(tmp_path, seq2seq_records(8, tasks=["up", "down"]))
    model = prompt_model(names=("up", "down", "unused"))
    before = {n: p.clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, _config(tmp_path, steps=2), data)
    batch = trainer.step_batches(0)[0]
    assert trainer.model_inputs(batch)["adapter_names"] == batch["tasks"] and set(batch["tasks"]) == {"up", "down"}
    trainer.train()
    changed = {n.split(".")[1] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"up", "down"}
    assert (tmp_path / "out" / "up" / "adapter_config.json").is_file()


def test_multitask_mpt_rows_get_task_ids(tmp_path):
    data = dataset(tmp_path, seq2seq_records(8, tasks=["a", "c"]))
    model = prompt_model(fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=3, num_tasks=3))
    before = {n: p.clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, _config(tmp_path, steps=2), data)
    batch = trainer.step_batches(0)[0]
    assert trainer.model_inputs(batch)["task_ids"].tolist() == [{"a": 0, "c": 1}[t] for t in batch["tasks"]]
    trainer.train()
    source = model.prompt_sources["default"]
    for name in ("prefix_task_cols", "prefix_task_rows"):
        now, then = getattr(source, name), before[f"prompt_sources.default.{name}"]
        assert not torch.equal(now[:2], then[:2]) and torch.equal(now[2], then[2]), name


def test_unknown_task_adapter_is_an_error(tmp_path):
    data = dataset(tmp_path, seq2seq_records(4, tasks=["up", "down"]))
    with pytest.raises(ValueError, match="'down' has no adapter"):
        Trainer(prompt_model(), _config(tmp_path), data)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_trains(tmp_path, precision):
    data = dataset(tmp_path, seq2seq_records(8))
    result = Trainer(prompt_model(), _config(tmp_path, steps=2, precision=precision), data).train()
    assert all(math.isfinite(x) for x in result.losses)


def test_keep_checkpoints_prunes_old_ones(tmp_path):
    data = dataset(tmp_path, seq2seq_records(8))
    Trainer(prompt_model(), _config(tmp_path, steps=4, save_every=1, keep_checkpoints=2), data).train()
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
