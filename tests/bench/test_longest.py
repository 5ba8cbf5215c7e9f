"""bench/longest.py: per provider, ascending sequence lengths at batch 1 until one does not fit."""

import json
import re

import pytest
import torch

from bench import longest, training
from bench.models import build_model

pytest.importorskip("peft")

CPU = torch.device("cpu")
SETTINGS = training.Settings(CPU, torch.float32)


def _fits_below(limit: int):
    """fastprompt-eager, out of memory from `limit` tokens on (the batch reaches the runner's loss)."""
    def build(base, method, state):
        runner = training.PROVIDERS["fastprompt-eager"](base, method, state)

        def loss(batch):
            if batch.input_ids.shape[1] >= limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
            return runner.loss(batch)
        return training.Runner(runner.module, runner.params, loss)
    return build


def test_each_provider_climbs_until_a_length_does_not_fit():
    base = build_model("tiny-llama", torch.float32, CPU)
    providers = {"peft-sdpa": training.PROVIDERS["peft-sdpa"], "small": _fits_below(12),
                 "fastprompt-loss-graph": training.PROVIDERS["fastprompt-loss-graph"]}
    rows = longest.longest(base, "tiny-llama", (16, 5, 9), SETTINGS, providers, log=lambda line: None)
    assert [(r["provider"], r["seq_len"], r["status"]) for r in rows] == [
        ("peft-sdpa", 5, "ok"), ("peft-sdpa", 9, "ok"), ("peft-sdpa", 16, "ok"),
        ("small", 5, "ok"), ("small", 9, "ok"), ("small", 16, "oom"),
        ("fastprompt-loss-graph", 5, "n/a")]          # CUDA graphs: not applicable on the CPU, tried once
    for row in rows:
        assert row["suite"] == "training" and row["sweep"] == "longest" and row["batch"] == 1
        assert row["method"] == training.SWEEP_METHOD.label and set(training.ROW_KEYS) <= set(row)
        if row["status"] == "ok":
            assert row["step_ms"] > 0 and row["tokens_per_s"] == pytest.approx(row["seq_len"] / row["step_ms"] * 1e3)
        else:
            assert row["step_ms"] is None and row["error"]
    assert longest.longest_fitting(rows) == {"peft-sdpa": 16, "small": 9, "fastprompt-loss-graph": None}


def test_quick_run_writes_dated_rows_and_names_a_bad_argument(tmp_path, capsys):
    assert longest.main(["--quick", "--device", "cpu", "--providers", "fastprompt,peft-sdpa", "--seq-lens", "4,6",
                         "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.iterdir()
    assert re.fullmatch(r"longest-quick-cpu-[a-z0-9._-]+-\d{4}-\d{2}-\d{2}\.json", path.name), path.name
    rows = json.loads(path.read_text())
    assert [(r["provider"], r["seq_len"], r["status"]) for r in rows] == [
        ("fastprompt", 4, "ok"), ("fastprompt", 6, "ok"), ("peft-sdpa", 4, "ok"), ("peft-sdpa", 6, "ok")]
    assert "tiny-llama B1 prompt_tuning-P100: fastprompt trains at most T=6 of those tried" in capsys.readouterr().out
    for argv, message in ((["--providers", "fastprompt,peft"], "--providers: unknown ['peft']"),
                          (["--model", "tiny-gpt2", "--seq-lens", "500"], "exceed tiny-gpt2's 512 positions"),
                          (["--model", "llama-9b"], "model must be one of")):
        with pytest.raises(SystemExit) as exit_info:
            longest.main(["--quick", "--device", "cpu", *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
