"""The issue's targets, judged from hand-made training rows."""

from bench.targets import targets


def _row(method, provider, **values):
    return {"suite": "training", "sweep": None, "status": "ok", "model": "llama-3.2-1b", "method": method,
            "provider": provider, **values}


ROWS = [
    _row("prompt_tuning-P100", "peft-sdpa", tokens_per_s=1000.0, tokens_per_s_vs_peft=1.0, peak_mb_vs_peft=1.0,
         step_ms=40.0),
    _row("prompt_tuning-P100", "fastprompt", tokens_per_s=2100.0, tokens_per_s_vs_peft=2.1, peak_mb_vs_peft=0.6,
         step_ms=19.0),
    _row("prompt_tuning-P100", "fastprompt-torch", tokens_per_s=900.0, tokens_per_s_vs_peft=0.9, step_ms=44.4),
    _row("prompt_tuning-P100", "peft-lora-r16", tokens_per_s=1900.0, step_ms=20.0),
    _row("mpt-P100", "fastprompt", tokens_per_s=2058.0, step_ms=19.4),
    {**_row("prompt_tuning-P100", "fastprompt", tokens_per_s=1.0, tokens_per_s_vs_peft=0.01), "sweep": "batch"},
]


def test_gpu_targets_met_missed_and_unmeasured():
    found = {t.what: t for t in targets(ROWS, "cuda")}
    assert list(found) == ["fastprompt tokens/s vs PEFT", "fastprompt peak memory vs PEFT",
                           "fastprompt step time vs PEFT LoRA r=16", "MPT mixed rows tokens/s vs prompt tuning"]
    assert found["fastprompt tokens/s vs PEFT"].value == 2.1 and found["fastprompt tokens/s vs PEFT"].met
    memory = found["fastprompt peak memory vs PEFT"]
    assert memory.met is False and str(memory).endswith("0.60x (target <= 0.5x): MISSED")
    assert found["fastprompt step time vs PEFT LoRA r=16"].value == 19.0 / 20.0
    assert found["MPT mixed rows tokens/s vs prompt tuning"].value == 0.98


def test_cpu_target_is_the_pytorch_path_against_peft():
    (torch_path, mixed) = targets(ROWS, "cpu")
    assert torch_path.what == "fastprompt-torch tokens/s vs PEFT" and torch_path.met is False
    without_torch_path = [r for r in ROWS if r["provider"] != "fastprompt-torch"]
    assert targets(without_torch_path, "cpu")[0].met is None
    assert "not measured" in str(targets(without_torch_path, "cpu")[0])
