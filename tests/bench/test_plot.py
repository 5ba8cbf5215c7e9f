"""bench/plot.py draws its PNGs from result rows, and only the figures the rows allow."""

import json

import pytest

from bench import plot

matplotlib = pytest.importorskip("matplotlib", reason="bench/plot.py draws with matplotlib (pinned in CI)")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAMP = {"device": "cpu-x86_64", "dtype": "float32", "model": "tiny-llama", "date": "2026-01-02"}


def _training(provider, sweep, batch, seq_len, tokens_per_s, saved_mb, status="ok", num_virtual=100):
    return {**STAMP, "suite": "training", "method": f"prompt_tuning-P{num_virtual}", "provider": provider,
            "sweep": sweep, "batch": batch, "seq_len": seq_len, "num_virtual_tokens": num_virtual,
            "tokens_per_s": tokens_per_s, "peak_mb": None, "saved_mb": saved_mb, "status": status}


def _serving(provider, n_tasks, tokens_per_s, ttft, itl):
    return {**STAMP, "suite": "serving", "provider": provider, "n_tasks": n_tasks, "rows": 8, "new_tokens": 6,
            "tokens_per_s": tokens_per_s, "ttft_ms_p50": ttft, "itl_ms_p50": itl, "status": "ok"}


def _write(path, rows):
    path.write_text(json.dumps(rows))
    return path


def test_draws_the_four_figures_from_json(tmp_path):
    training = [_training(p, "seq_len", 4, t, tps * t, None) for p, tps in (("peft-sdpa", 90.5), ("fastprompt", 171.0))
                for t in (8, 16, 32)]
    training += [_training(p, "num_virtual", 4, 16, tps / (1 + v / 16), None, num_virtual=v)
                 for p, tps in (("peft-sdpa", 900.0), ("fastprompt", 1700.0)) for v in (2, 5, 10)]
    training += [_training(p, "batch", b, 16, None, mb * b) for p, mb in (("peft-sdpa", 3.9), ("fastprompt", 1.2))
                 for b in (1, 2, 4)]
    training += [_training("broken", "batch", 2, 16, None, None, status="refused"),
                 _training("peft-sdpa", None, 4, 16, 1234.0, 3.3)]       # a main-table row: in no figure
    serving = [_serving(p, n, 900.0 / n, 3.0 * n, 1.5) for p in ("peft", "fastprompt-engine") for n in (1, 2, 8)]
    paths = plot.draw([_write(tmp_path / "training.json", training), _write(tmp_path / "serving.json", serving)],
                      tmp_path / "png")
    assert [p.name for p in paths] == ["training-throughput-vs-seq-len-tiny-llama-float32.png",
                                       "training-throughput-vs-num-virtual-tiny-llama-float32.png",
                                       "training-memory-vs-batch-tiny-llama-float32.png",
                                       "serving-latency-vs-tasks-tiny-llama-float32.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, path.name
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == sorted(p.name for p in paths)  # no temp files


def test_rows_without_a_sweep_draw_only_what_they_have(tmp_path):
    rows = [_training("peft-sdpa", None, 4, 16, 1234.0, 3.3), _serving("peft", 1, 900.0, 3.0, 1.5)]
    paths = plot.draw([_write(tmp_path / "r.json", rows)], tmp_path)
    assert [p.name for p in paths] == ["serving-latency-vs-tasks-tiny-llama-float32.png"]


def test_a_file_that_is_not_a_list_of_rows_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="bad.json: expected a JSON list of result rows"):
        plot.load_rows([bad])
