"""Trainer(cuda_graphs=True) without a GPU: its refusals, the bucketed padding, and its step logic (shares of
the graph's token-mean loss, gradients moved out of the graph's buffers between micro-batches) with the graph
replaced by an eager stand-in that keeps CudaGraphLoss's contract. The replays themselves are tested natively
in tests/gpu/test_cuda_graphs_native.py."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

import fastprompt
from fastprompt.train import Trainer, TrainingConfig, collate
from fastprompt.train import trainer as trainer_module
from fastprompt.train.data import bucket_length
from tests.helpers import assert_close
from tests.train.common import dataset, prompt_model, seq2seq_records


def _config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), steps=4, batch_size=4, lr=0.05, progress="none", plot=False)
    return TrainingConfig(**{**defaults, **kwargs})


class EagerGraphStandIn:
    """CudaGraphLoss's contract, eagerly: the token-mean loss; every trainable .grad must be None."""

    shapes: list = []

    def __init__(self, model, max_shapes):
        self.model = model

    def __call__(self, input_ids, attention_mask=None, labels=None, task_ids=None):
        stale = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is not None]
        assert not stale, f"a replay would overwrite these gradients: {stale}"
        EagerGraphStandIn.shapes.append(tuple(input_ids.shape))
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, task_ids=task_ids).loss


def test_refused_off_cuda(tmp_path):
    data = dataset(tmp_path, seq2seq_records(4))
    with pytest.raises(ValueError, match="cuda_graphs=True: it needs the model on a CUDA device, got cpu"):
        Trainer(prompt_model(), _config(tmp_path, cuda_graphs=True), data)


def test_refused_with_rows_routed_to_adapters_by_name(tmp_path, monkeypatch):
    model = prompt_model(names=("up", "down"))
    monkeypatch.setattr(type(model.backbone), "device", property(lambda self: torch.device("cuda")))
    data = dataset(tmp_path, seq2seq_records(4, tasks=["up", "down"]))
    with pytest.raises(ValueError, match=r"routes rows to adapters \['down', 'up'\] by name"):
        Trainer(model, _config(tmp_path, cuda_graphs=True), data)


def _on_fake_cuda(model, monkeypatch):
    monkeypatch.setattr(type(model.backbone), "device", property(lambda self: torch.device("cuda")))
    return model


def test_graphs_are_the_default_wherever_they_can_serve(tmp_path, monkeypatch, capsys):
    """cuda_graphs=None (the default): graphs on CUDA with nothing to say; off CUDA eager and silent."""
    data = dataset(tmp_path, seq2seq_records(4))
    assert TrainingConfig(output_dir=str(tmp_path)).cuda_graphs is None
    assert not Trainer(prompt_model(), _config(tmp_path), data).use_graphs
    model = _on_fake_cuda(prompt_model(), monkeypatch)
    assert not Trainer(model, _config(tmp_path, cuda_graphs=False), data).use_graphs
    assert Trainer(model, _config(tmp_path), data).use_graphs
    assert capsys.readouterr().err == ""


class _OwnLoss(Trainer):
    def compute_loss(self, batch, norms):
        return super().compute_loss(batch, norms)


@pytest.mark.parametrize("case, reason", [
    ("by name", r"routes rows to adapters \['down', 'up'\] by name"),
    ("own loss", "_OwnLoss computes its own loss, which is not graphed"),
])
def test_where_a_graph_cannot_serve_the_default_runs_eagerly_and_says_why(tmp_path, monkeypatch, capsys, case,
                                                                           reason):
    if case == "by name":
        model, trainer_class = prompt_model(names=("up", "down")), Trainer
        data = dataset(tmp_path, seq2seq_records(4, tasks=["up", "down"]))
    else:
        model, trainer_class = prompt_model(), _OwnLoss
        data = dataset(tmp_path, seq2seq_records(4))
    _on_fake_cuda(model, monkeypatch)
    trainer = trainer_class(model, _config(tmp_path), data)
    assert not trainer.use_graphs
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastprompt: training without CUDA graphs: ")
    assert re.search(reason, lines[0])
    with pytest.raises(ValueError, match="cuda_graphs=True: .*" + reason):
        trainer_class(model, _config(tmp_path, cuda_graphs=True), data)


def test_the_cli_flag_is_three_way(tmp_path):
    from fastprompt.train.cli import add_data_options, add_training_options, training_config

    parser = argparse.ArgumentParser()
    add_training_options(parser)
    add_data_options(parser)
    values = [training_config(parser.parse_args(["--out", str(tmp_path), *flag])).cuda_graphs
              for flag in ([], ["--cuda-graphs"], ["--no-cuda-graphs"])]
    assert values == [None, True, False]


def test_bucket_lengths_and_filler_rows(tmp_path):
    assert [bucket_length(t, 1000) for t in (1, 16, 17, 25, 33, 49, 65, 97, 129)] == [16, 16, 24, 32, 48, 64, 96,
                                                                                        128, 192]
    assert bucket_length(40, 41) == 41          # never past the run's longest example
    data = dataset(tmp_path, seq2seq_records(3))
    batch = collate(data.examples[:2], pad_token_id=0, rows=4, length=16)
    assert batch["input_ids"].shape == (4, 16) and batch["tasks"] == [None] * 4 and batch["rows"] == 2
    assert torch.equal(batch["input_ids"][2], batch["input_ids"][0])       # filler rows: real tokens ...
    assert (batch["labels"][2:] == -100).all() and batch["attention_mask"][3].sum() > 0   # ... and no labels


@pytest.mark.parametrize("config", [fastprompt.PromptTuningConfig(num_virtual_tokens=3),
                                    fastprompt.PrefixTuningConfig(num_virtual_tokens=3),
                                    fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=3, num_tasks=2)],
                         ids=["prompt", "prefix", "mpt"])
def test_graph_steps_equal_eager_steps(tmp_path, monkeypatch, config):
    """Same losses, gradient norms and prompts as an eager run, with accumulation over 2 micro-batches and
    an epoch's short last batch (7 examples, batches of 2)."""
    tasks = ["a", "b"] if config.peft_type == "MULTITASK_PROMPT_TUNING" else None
    data = dataset(tmp_path, seq2seq_records(7, seed=5, tasks=tasks))
    options = dict(steps=4, batch_size=2, grad_accum=2, max_grad_norm=None, lr=0.05)
    eager = Trainer(prompt_model(config), _config(tmp_path / "eager", **options), data)
    monkeypatch.setattr(Trainer, "_graph_obstacle", lambda self: None)
    monkeypatch.setattr(trainer_module, "CudaGraphLoss", EagerGraphStandIn)
    EagerGraphStandIn.shapes = []
    graphed = Trainer(prompt_model(config), _config(tmp_path / "graphed", cuda_graphs=True, **options), data)
    eager_log, graphed_log = eager.train().log, graphed.train().log
    for a, b in zip(eager_log, graphed_log, strict=True):
        assert b["target_tokens"] == a["target_tokens"] and b["tokens"] == a["tokens"]   # filler rows not counted
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for a, b in zip(eager.model.prompt_sources.parameters(), graphed.model.prompt_sources.parameters()):
        assert_close("prompt", b, a, 1e-5)
    rows = {shape[0] for shape in EagerGraphStandIn.shapes}
    lengths = {shape[1] for shape in EagerGraphStandIn.shapes}
    assert rows == {2} and lengths <= {16, data.longest}, EagerGraphStandIn.shapes
