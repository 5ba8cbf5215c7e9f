"""The loss-curve PNG: drawn with matplotlib; without it the figure is skipped with a one-line note."""

import sys

import pytest

from fastprompt.train import Trainer, TrainingConfig, plot_loss_curve
from tests.train.common import dataset, prompt_model, seq2seq_records

RECORDS = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}, {"step": 3, "loss": 1.2}]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_with_matplotlib_the_curve_is_written_as_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    notes = []
    path = plot_loss_curve(RECORDS, tmp_path / "curve.png", say=notes.append)
    assert path == tmp_path / "curve.png" and path.read_bytes()[:8] == PNG_SIGNATURE
    assert notes == []


def test_without_training_records_nothing_is_drawn(tmp_path):
    assert plot_loss_curve([{"step": 2, "eval_loss": 1.7}], tmp_path / "curve.png") is None
    assert not (tmp_path / "curve.png").exists()


def test_without_matplotlib_the_trainer_skips_the_curve_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    data = dataset(tmp_path, seq2seq_records(8))
    config = TrainingConfig(output_dir=str(tmp_path / "out"), steps=2, batch_size=4, progress="print", plot=True)
    Trainer(prompt_model(), config, data).train()
    assert not (tmp_path / "out" / "loss_curve.png").exists()
    notes = [line for line in capsys.readouterr().out.splitlines() if "loss curve" in line]
    assert notes == ["matplotlib is not installed: skipped the loss curve loss_curve.png (pip install matplotlib)"]
    assert (tmp_path / "out" / "train_log.jsonl").is_file()  # the run's other files are unaffected
