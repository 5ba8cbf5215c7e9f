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
    # The step gets what is left of the 6 s: a busy machine spends part of a second before it starts.
    assert statuses["slow"] in ("timed out after 6 s", "timed out after 5 s")
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


def test_the_scale_stage_runs_the_8b_cases_first_and_fits_the_budget():
    assert gs.STAGES["scale"][:3] == ("versions", "scale-8b-B4-T1024", "scale-8b-B8-T512")
    assert gs.STAGE_BUDGET_S["scale"] <= 9 * 60 - 10
    by_name = {s.name: s for s in gs.STEPS}
    for name in ("scale-8b-B4-T1024", "scale-8b-B8-T512", "longest-8b-fastprompt", "longest-8b-peft-sdpa"):
        assert "llama-3.1-8b" in by_name[name].argv and by_name[name].quick_argv is not None, name
    assert "--dim" in by_name["loss-8b"].argv and "4096" in by_name["loss-8b"].argv
    assert not set(gs.STAGES["scale"]) - {"versions", "loss"} & set(gs.STAGES["all"])


def _wheel(folder, name="carried_probe", version="1.0"):
    """A minimal pure-Python wheel holding module `name` (what pip needs: the module, METADATA, WHEEL, RECORD)."""
    import zipfile

    info = f"{name}-{version}.dist-info"
    files = {f"{name}.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    folder.mkdir()
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)


def test_carried_wheels_are_installed_and_put_on_the_steps_path(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "ROOT", tmp_path)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    with open(tmp_path / "log", "w") as log:
        assert gs.install_carried_wheels(tmp_path / "site", log) == []          # no .whl folder: nothing
        _wheel(tmp_path / ".whl")
        assert gs.install_carried_wheels(tmp_path / "site", log) == ["carried_probe-1.0-py3-none-any.whl"]
    assert (tmp_path / "site" / "carried_probe.py").is_file()
    assert gs.os.environ["PYTHONPATH"] == f"{tmp_path / 'site'}{gs.os.pathsep}/elsewhere"
