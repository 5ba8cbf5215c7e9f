"""The benchmark harness: ratios to the baseline, dated result files, step timing, failures, refusal."""

import json
import re

import pytest
import torch

from bench import harness

CPU = torch.device("cpu")


def test_ratios_are_to_the_baseline_row_of_the_same_group():
    rows = [
        {"provider": "peft", "batch": 3, "tps": 120.0, "mem": 50.0},
        {"provider": "fast", "batch": 3, "tps": 300.0, "mem": 20.0},
        {"provider": "wrong", "batch": 3, "tps": None, "mem": None},      # refused: no measurement
        {"provider": "peft", "batch": 5, "tps": 70.0, "mem": None},       # the device reports no memory
        {"provider": "fast", "batch": 5, "tps": 175.0, "mem": 9.0},
        {"provider": "fast", "batch": 7, "tps": 400.0, "mem": 11.0},      # its baseline ran out of memory
    ]
    out = harness.add_ratios(rows, group_by=("batch",), baseline="peft", metrics=("tps", "mem"))
    assert out is rows
    assert [r["tps_vs_peft"] for r in rows] == [1.0, 2.5, None, 1.0, 2.5, None]
    assert [r["mem_vs_peft"] for r in rows] == [1.0, 0.4, None, None, None, None]


def test_dated_results_name_the_suite_device_and_day_and_stamp_every_row(tmp_path):
    rows = [{"provider": "peft", "dtype": "float32", "batch": 3}, {"provider": "fast", "dtype": "float32", "batch": 3}]
    path = harness.write_results("training-quick", rows, CPU, dated=True, out_dir=tmp_path)
    assert re.fullmatch(r"training-quick-cpu-[a-z0-9._-]+-\d{4}-\d{2}-\d{2}\.json", path.name), path.name
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]       # no temporary file left behind
    written = json.loads(path.read_text())
    assert [r["provider"] for r in written] == ["peft", "fast"]
    for row in written:
        assert row["device"].startswith("cpu-") and row["date"] in path.name and "commit" in row
        assert set(row["versions"]) == {"torch", "triton", "transformers", "peft"}
        assert row["versions"]["torch"] == torch.__version__
        assert row["cpu_threads"] == torch.get_num_threads()
    undated = harness.write_results("op", rows, CPU, out_dir=tmp_path)
    assert re.fullmatch(r"op-cpu-[a-z0-9._-]+\.json", undated.name), undated.name


def test_step_timing_calls_exactly_warmup_plus_reps_times():
    calls = []
    timing = harness.time_steps_ms(lambda: calls.append(sum(range(1000))), CPU, warmup=2, reps=5)
    assert len(calls) == 7
    assert 0 <= timing["ms_p20"] <= timing["ms"] <= timing["ms_p80"]
    with pytest.raises(ValueError, match="reps"):
        harness.time_steps_ms(lambda: None, CPU, warmup=0, reps=0)


def test_peak_memory_still_runs_the_call_off_cuda():
    calls = []
    assert harness.peak_memory_mb(lambda: calls.append(1), CPU) is None
    assert calls == [1]


def test_out_of_memory_is_a_result_and_anything_else_an_error():
    assert harness.failure_status(torch.OutOfMemoryError("CUDA out of memory")) == ("oom", "out of memory")
    try:
        raise ValueError("bad shape")
    except ValueError as error:
        assert harness.failure_status(error) == ("error", "ValueError: bad shape")


def test_check_or_refuse_refuses_a_wrong_output_only():
    expected = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    harness.check_or_refuse("close", expected * (1 + 3e-5), expected, 1e-4)
    with pytest.raises(harness.WrongOutput, match="wrong: output differs"):
        harness.check_or_refuse("wrong", expected.roll(1, dims=1), expected, 1e-4)


def test_interleaved_timing_takes_turns_and_reports_a_failure_in_place():
    from bench.harness import time_interleaved_ms

    calls = []

    def fails():
        calls.append("b")
        raise RuntimeError("broken step")

    result = time_interleaved_ms({"a": lambda: calls.append("a"), "b": fails, "c": lambda: calls.append("c")},
                                 torch.device("cpu"), warmup=1, reps=2)
    assert calls == ["a", "b", "c", "a", "c", "a", "c"]   # turns; a failed function leaves the rounds
    assert isinstance(result["b"], RuntimeError) and str(result["b"]) == "broken step"
    for name in ("a", "c"):
        assert result[name]["ms_p20"] <= result[name]["ms"] <= result[name]["ms_p80"]
