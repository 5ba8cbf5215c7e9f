"""bench/gpu_session.py: a stage keeps inside its budget, a step that overruns is killed without costing
the others, and every step's JSON rows reach the output as soon as it ends (the device tool returns at most
8 files)."""

from __future__ import annotations

import json
import sys

from bench import gpu_session as gs


def _writer(name: str, rows: list[dict]) -> tuple[str, ...]:
    code = f"import json, sys; open(sys.argv[1] + '/{name}', 'w').write(json.dumps({rows!r}))"
    return (sys.executable, "-c", code, "{scratch}")


def test_a_stage_merges_rows_as_it_goes_and_survives_a_timeout(tmp_path):
    steps = (
        gs.Step("first", _writer("training-x.json", [{"suite": "training", "case": 1}]), 60, None),
        gs.Step("hangs", (sys.executable, "-c", "import time; time.sleep(60)"), 1, None),
        gs.Step("second", _writer("training-x.json", [{"suite": "training", "case": 2}]), 60, None),
        gs.Step("fails", (sys.executable, "-c", "raise SystemExit(3)"), 60, None),
    )
    statuses = gs.run_stage("all", steps, tmp_path, quick=False, budget_s=60)
    assert statuses == {"first": "ok", "hangs": "timed out after 1 s", "second": "ok", "fails": "failed (rc 3)"}
    assert [r["case"] for r in json.loads((tmp_path / "training-x.json").read_text())] == [1, 2]
    assert "===== hangs: timed out" in (tmp_path / "all.log").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.log", "training-x.json"]   # no scratch left


def test_a_spent_budget_runs_no_further_step(tmp_path):
    steps = (gs.Step("slow", (sys.executable, "-c", "import time; time.sleep(60)"), 60, None),
             gs.Step("after", _writer("serving-x.json", [{}]), 60, None))
    statuses = gs.run_stage("all", steps, tmp_path, quick=False, budget_s=6)
    assert statuses["slow"] == "timed out after 6 s"
    assert statuses["after"].startswith("not run")
    assert not (tmp_path / "serving-x.json").exists()


def test_the_stages_fit_the_lent_device_time():
    """15 minutes of device time a task, a machine's start included: "all" ends inside 9 minutes and issue 17's
    "train" inside 6."""
    assert gs.STAGE_BUDGET_S["all"] <= 9 * 60 - 10 and gs.STAGE_BUDGET_S["train"] <= 6 * 60 - 10
    names = {step.name for step in gs.STEPS}
    for stage, steps in gs.STAGES.items():
        assert set(steps) <= names, stage
    train_steps = [s for s in gs.STEPS if s.name in gs.STAGES["train"]]
    assert sum(s.limit_s for s in train_steps) <= gs.STAGE_BUDGET_S["train"]


def test_native_tests_run_in_parallel_when_xdist_is_there(monkeypatch):
    (native,) = [s for s in gs.STEPS if s.name == "native-tests"]
    monkeypatch.setattr(gs.importlib.util, "find_spec", lambda name: object())
    argv = gs.step_argv(native, quick=False)
    assert argv[argv.index("-n") + 1] == "8"
    monkeypatch.setattr(gs.importlib.util, "find_spec", lambda name: None)
    assert "-n" not in gs.step_argv(native, quick=False)
    assert gs.step_argv(native, quick=True) is None   # a dry run skips the GPU-only step
