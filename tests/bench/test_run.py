"""`python -m bench` end to end on the CPU (--quick, one tiny model and method), and its argument checks."""

import json
import re

import pytest
import torch

from bench import run

pytest.importorskip("peft")

def test_quick_training_run_prints_ratios_and_writes_a_dated_quick_json(tmp_path, capsys):
    argv = ["--quick", "--device", "cpu", "--suite", "training", "--models", "tiny-gpt2", "--methods",
            "prompt_tuning-P20", "--batch", "3", "--seq-len", "5", "--warmup", "0", "--steps", "1",
            "--out", str(tmp_path)]
    assert run.main(argv) == 0
    (path,) = tmp_path.iterdir()
    assert re.fullmatch(r"training-quick-cpu-[a-z0-9._-]+-\d{4}-\d{2}-\d{2}\.json", path.name), path.name
    rows = json.loads(path.read_text())
    assert [r["provider"] for r in rows] == ["peft-sdpa", "peft-eager", "peft-lora-r16", "fastprompt",
                                             "fastprompt-eager", "fastprompt-shared", "fastprompt-concat",
                                             "fastprompt-torch", "fastprompt-loss-graph"]
    for row in rows:
        assert row["status"] == ("n/a" if row["provider"] == "fastprompt-loss-graph" else "ok") and row["dtype"] == "float32" and row["model"] == "tiny-gpt2"
        assert row["model_shape"]["layers"] == 2 and row["device"].startswith("cpu-") and "commit" in row
        assert set(row["versions"]) == {"torch", "triton", "transformers", "peft"}
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("model "))
    assert "tokens_per_s_vs_peft" in header and "saved_mb_vs_peft" in header and "peak_mb" not in header
    assert f"wrote {path}" in out


@pytest.mark.parametrize("argv, message", [
    (["--methods", "prompt_tuning-P7"], "--methods: unknown"),
    (["--serve-rows", "4", "--serve-tasks", "1,8"], "1..rows=4"),
    (["--models", "tiny-gpt2", "--seq-len", "500"], "exceeds tiny-gpt2's 512 positions"),
    (["--models", "llama-9b"], "model must be one of"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--providers", "fastprompt,peft-sdpa2"], "--providers: unknown ['peft-sdpa2']"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["--quick", "--device", "cpu", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_quick_defaults_on_the_cpu():
    args = run.parse_args(["--quick", "--device", "cpu"])
    assert args.dtype == torch.float32 and args.device == torch.device("cpu") and args.threads == 1
    assert args.models == ["tiny-llama", "tiny-gpt2"] and args.suites == ("training", "serving", "kernels")
    assert len(args.training_cases) == 2 * len(run.training.METHODS)
    assert [c.n_tasks for c in args.serving_cases] == [1, 2, 8]


def test_sweeps_run_all_with_sweep_or_each_alone_when_its_list_is_given():
    common = ["--quick", "--device", "cpu", "--models", "tiny-llama", "--methods", "prefix-P100"]
    every = run.parse_args([*common, "--sweep"]).training_cases
    assert [(c.sweep, c.batch, c.seq_len, c.method.label) for c in every] == [
        (None, 4, 16, "prefix-P100"),
        *[("seq_len", 4, t, "prompt_tuning-P100") for t in (8, 16, 32)],
        *[("batch", b, 16, "prompt_tuning-P100") for b in (1, 2, 4)],
        *[("num_virtual", 4, 16, f"prompt_tuning-P{p}") for p in (2, 5, 10)]]
    alone = run.parse_args([*common, "--sweep-num-virtual", "3,400"]).training_cases
    assert [(c.sweep, c.method.num_virtual) for c in alone] == [(None, 100), ("num_virtual", 3), ("num_virtual", 400)]
    assert [c.sweep for c in run.parse_args(common).training_cases] == [None]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is visible")
def test_cuda_without_a_gpu_is_refused(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_quick_serving_run_judges_its_targets_and_plots(tmp_path, capsys):
    argv = ["--quick", "--device", "cpu", "--suite", "serving", "--models", "tiny-llama", "--serve-rows", "3",
            "--serve-tasks", "1,3", "--serve-prompt-len", "5", "--serve-new-tokens", "3", "--serve-virtual", "4",
            "--out", str(tmp_path), "--plot"]
    assert run.main(argv) == 0
    png_path, json_path = sorted(tmp_path.iterdir())     # "serving-l..." sorts before "serving-q..."
    assert re.fullmatch(r"serving-quick-cpu-[a-z0-9._-]+-\d{4}-\d{2}-\d{2}\.json", json_path.name), json_path.name
    assert png_path.name == "serving-latency-vs-tasks-tiny-llama-float32.png"
    assert png_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    rows = json.loads(json_path.read_text())
    assert {(r["n_tasks"], r["provider"]) for r in rows} == {(n, p) for n in (1, 3) for p in run.serving.PROVIDERS}
    assert all(r["status"] == "ok" for r in rows)
    out = capsys.readouterr().out
    assert "tiny-llama: fastprompt-engine ITL p50, 3 adapters vs 1: " in out
    assert "tiny-llama: fastprompt-engine tokens/s vs PEFT at 3 adapters: " in out
    assert out.count("(a GPU target; informational on this device)") == 2
    assert f"plotted {png_path}" in out


def test_kernels_suite_passes_dtype_out_and_threads_and_writes_dated_files(tmp_path, capsys):
    threads = torch.get_num_threads()
    argv = ["--quick", "--device", "cpu", "--suite", "kernels", "--dtype", "fp32", "--threads", "1",
            "--out", str(tmp_path)]
    try:
        assert run.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [re.sub(r"-cpu-[a-z0-9._-]+-\d{4}-\d{2}-\d{2}\.json$", "", n) for n in names] == [
        "linear_cross_entropy-quick", "prefix_attention-quick", "prompt_embed-quick"], names
    for path in tmp_path.iterdir():
        rows = json.loads(path.read_text())
        assert rows and all(r["dtype"] == "float32" and r["cpu_threads"] == 1 for r in rows), path.name
        assert not any(r.get("refused") for r in rows), path.name
    out = capsys.readouterr().out
    assert "bench/bench_prompt_embed.py --quick --dtype float32 --out " in out and "--threads 1" in out
    assert "prefix_attention: decode at batch 4, one task per row vs one task" in out


def test_a_kernel_script_that_refuses_makes_the_run_fail(monkeypatch, capsys):
    import importlib

    seen = {}

    def fake_main(script):
        def main(argv):
            seen[script] = argv
            return 1 if script == "bench_prompt_embed" else 0
        return main

    for script in run.KERNEL_SCRIPTS:
        monkeypatch.setattr(importlib.import_module(f"bench.{script}"), "main", fake_main(script))
    assert run.main(["--quick", "--device", "cpu", "--suite", "kernels", "--dtype", "bf16"]) == 1
    assert list(seen) == list(run.KERNEL_SCRIPTS)
    assert all(argv == ["--quick", "--dtype", "bfloat16", "--threads", "1"] for argv in seen.values())
    assert "REFUSED: kernels bench/bench_prompt_embed.py refused a provider" in capsys.readouterr().err


def test_providers_are_chosen_in_suite_order_with_the_baseline(tmp_path):
    args = run.parse_args(["--quick", "--device", "cpu", "--providers", "fastprompt-concat, fastprompt"])
    assert list(args.providers) == ["peft-sdpa", "fastprompt", "fastprompt-concat"]
    assert run.parse_args(["--quick", "--device", "cpu"]).providers is run.training.PROVIDERS
