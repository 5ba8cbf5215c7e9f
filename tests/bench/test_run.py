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
                                             "fastprompt-torch"]
    for row in rows:
        assert row["status"] == "ok" and row["dtype"] == "float32" and row["model"] == "tiny-gpt2"
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is visible")
def test_cuda_without_a_gpu_is_refused(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err
