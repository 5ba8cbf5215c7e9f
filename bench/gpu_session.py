"""One lent-GPU call per stage: install, run, write everything under $OUT, print a compact summary last.

    python3 bench/gpu_session.py check        # install, nvidia-smi, versions, every @pytest.mark.gpu test
    python3 bench/gpu_session.py train        # frozen-backward (Llama-3.2-1B shape) + training suite, Llama
    python3 bench/gpu_session.py kernels      # the three kernel micro-benchmarks
    python3 bench/gpu_session.py serve        # the serving suite (1, 8, 64 adapters)
    python3 bench/gpu_session.py train-gpt2   # the training suite on GPT-2 medium (if device time is left)
    python3 bench/gpu_session.py STAGE --quick --out /tmp/x   # CPU dry run: the same plumbing, --quick runs

Each stage fits one 10-minute device call: every step runs under its own time limit (a step that overruns
is killed, its output so far stays in the log and the next step runs), and the stage as a whole stays under
9 minutes. Written to --out (default $OUT): <stage>.log (every step's output), <stage>-summary.txt (what
is printed last) and the JSON results (bench/results/ naming, at most 8 files, none in sub-folders, as
the device tool returns them). The summary ends with the targets of bench/targets.py where the stage
measured them. Exit status: 1 if a step failed or timed out, or a benchmark refused a provider.
Uses only the standard library until fastprompt is installed (`pip install --no-deps
--no-build-isolation -e .`, as the device machine has no network).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]       # "{out}" is replaced by the output folder
    timeout_s: int
    gpu_only: bool = False      # skipped by --quick (needs a GPU, has no CPU smoke form)


def _bench(*args: str) -> tuple[str, ...]:
    return (PY, "-m", "bench", *args)


def _script(name: str, *args: str) -> tuple[str, ...]:
    return (PY, f"bench/{name}.py", *args)


VERSIONS = ("import torch, triton, transformers, peft, fastprompt; "
            "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, "
            "'transformers', transformers.__version__, 'peft', peft.__version__, 'fastprompt', fastprompt.__file__); "
            "print(torch.cuda.get_device_properties(0) if torch.cuda.is_available() else 'no CUDA')")

# Full runs; QUICK below swaps in the CPU smoke form of a step with the same name.
STAGES: dict[str, list[Step]] = {
    "check": [
        Step("nvidia-smi", ("nvidia-smi",), 30, gpu_only=True),
        Step("versions", (PY, "-c", VERSIONS), 60),
        Step("pytest-gpu", (PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs",
                            "--junitxml={out}/check-junit.xml", "tests"), 480),
    ],
    "train": [
        Step("frozen-backward", _script("bench_frozen_backward"), 150),
        Step("training-llama", _bench("--suite", "training", "--models", "llama-3.2-1b", "--out", "{out}"), 370),
    ],
    "train-gpt2": [
        Step("training-gpt2", _bench("--suite", "training", "--models", "gpt2-medium", "--out", "{out}"), 520),
    ],
    "kernels": [  # the short ones first, so a long prefix-attention run cannot cost them
        Step("prompt-embed", _script("bench_prompt_embed", "--device", "cuda", "--out", "{out}"), 90),
        Step("linear-cross-entropy", _script("bench_linear_cross_entropy", "--device", "cuda", "--out", "{out}"), 90),
        Step("prefix-attention", _script("bench_prefix_attention", "--device", "cuda", "--out", "{out}"), 340),
    ],
    "serve": [
        Step("serving", _bench("--suite", "serving", "--out", "{out}"), 520),
    ],
}
QUICK: dict[str, tuple[str, ...]] = {
    "frozen-backward": _script("bench_frozen_backward", "--quick"),
    "training-llama": _bench("--quick", "--suite", "training", "--models", "tiny-llama", "--out", "{out}"),
    "training-gpt2": _bench("--quick", "--suite", "training", "--models", "tiny-gpt2", "--out", "{out}"),
    "prompt-embed": _script("bench_prompt_embed", "--quick", "--out", "{out}"),
    "linear-cross-entropy": _script("bench_linear_cross_entropy", "--quick", "--out", "{out}"),
    "prefix-attention": _script("bench_prefix_attention", "--quick", "--out", "{out}"),
    "serving": _bench("--quick", "--suite", "serving", "--out", "{out}"),
}
# Files a stage's JSON results are renamed to (several stages write "training-<device>-<date>.json").
RENAME = {"train-gpt2": ("training-", "training-gpt2-medium-")}


def run_step(step: Step, out: Path, log, quick: bool) -> str:
    """Run one step (its output appended to `log`, a text file); returns "ok", "failed (rc N)",
    "timed out after N s" or "skipped"."""
    if quick and step.gpu_only:
        return "skipped"
    argv = [a.replace("{out}", str(out)) for a in (QUICK.get(step.name, step.argv) if quick else step.argv)]
    log.write(f"\n===== {step.name}: {' '.join(argv)} (limit {step.timeout_s} s)\n")
    log.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    try:
        rc = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                            timeout=step.timeout_s).returncode
    except subprocess.TimeoutExpired:
        status = f"timed out after {step.timeout_s} s"
    else:
        status = "ok" if rc == 0 else f"failed (rc {rc})"
    log.write(f"===== {step.name}: {status} in {time.monotonic() - start:.0f} s\n")
    log.flush()
    return status


def install(log) -> str:
    """`pip install --no-deps --no-build-isolation -e .` of this checkout; returns the step status."""
    return run_step(Step("install", (PY, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                     "-e", "."), 180), Path("."), log, quick=False)


def collect_results(since: float, out: Path) -> None:
    """Copy the JSON results written into bench/results/ since `since` (epoch s) to `out` (the
    frozen-backward script's; the others write to `out` directly)."""
    for path in sorted(RESULTS.glob("*.json")):
        if path.stat().st_mtime >= since and path.parent != out:
            shutil.copy2(path, out / path.name)


# ---------------------------------------------------------------------------------------------------------
# the summary: short tables read back from the JSON files
# ---------------------------------------------------------------------------------------------------------
def _table(rows: list[dict], columns: list[str]) -> list[str]:
    from bench.harness import print_table

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        print_table(rows, columns)
    return text.getvalue().splitlines()


def summarize(out: Path) -> list[str]:
    """Lines summing up every JSON result and junit file in `out`, the targets of each file last."""
    from bench.targets import targets

    lines: list[str] = []
    judged = []
    for path in sorted(out.glob("*.json")):
        rows = json.loads(path.read_text())
        lines.append(f"-- {path.name} ({len(rows)} rows, {rows[0].get('device') if rows else '?'})")
        if not rows:
            continue
        judged += targets(rows, "cpu" if str(rows[0].get("device")).startswith("cpu") else "cuda")
        suite = rows[0].get("suite")
        if suite == "training":
            lines += _table(rows, ["model", "method", "batch", "seq_len", "provider", "status", "step_ms",
                                   "tokens_per_s_vs_peft", "peak_mb_vs_peft", "mfu", "mfu_datasheet",
                                   "grad_rel_err"])
        elif suite == "serving":
            lines += _table(rows, ["n_tasks", "provider", "status", "tokens_per_s", "tokens_per_s_vs_peft",
                                   "ttft_ms_p50", "itl_ms_p50", "itl_ms_p50_vs_peft"])
        elif rows[0].get("op") == "prompt_tuning_step":
            lines += _table(rows, ["provider", "shape", "ms", "ms_vs_peft", "peak_mb_vs_peft", "saved_mb_vs_peft",
                                   "refused", "error"])
        else:
            lines += _kernel_lines(rows)
    for path in sorted(out.glob("*junit.xml")):
        lines += _junit_lines(path)
    if judged:
        lines.append("-- targets (bench/targets.py)")
        lines += [str(t) for t in judged]
    return lines


def _kernel_lines(rows: list[dict]) -> list[str]:
    """A kernel benchmark in a few lines: per (op, kind, mode, other provider), fastprompt's speed-up over
    it (that provider's time / fastprompt's on the same shape: geometric mean, min, max over shapes), then
    every provider that was refused or skipped."""
    def key(r):
        return r.get("op"), r.get("shape"), r.get("mode"), r.get("dtype")

    ours = {key(r): r["ms"] for r in rows if r.get("provider") == "fastprompt" and "ms" in r}
    ratios: dict[tuple, list[float]] = {}
    for r in rows:
        if r.get("provider") != "fastprompt" and "ms" in r and key(r) in ours:
            group = (r.get("op"), r.get("kind", ""), r.get("mode"), r["provider"])
            ratios.setdefault(group, []).append(r["ms"] / ours[key(r)])
    lines = [f"   fastprompt speed-up over {provider} ({op} {kind} {mode}, {len(v)} shapes): "
             f"{math.exp(sum(map(math.log, v)) / len(v)):.2f}x geomean, {min(v):.2f}-{max(v):.2f}x"
             for (op, kind, mode, provider), v in sorted(ratios.items())]
    if not ours:
        lines.append("   no fastprompt timing in this file")
    for r in rows:
        for status in ("refused", "skipped"):
            if r.get(status):
                lines.append(f"   {status.upper()} {r['provider']} {r.get('shape', '')}: {str(r[status])[:160]}")
    return lines


def _junit_lines(path: Path) -> list[str]:
    import xml.etree.ElementTree as ET

    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped", "time")}
    lines = [f"-- {path.name}: " + ", ".join(f"{k} {v}" for k, v in counts.items())]
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            lines.append(f"   FAILED {case.get('classname')}::{case.get('name')}")
    return lines


def main(argv=None) -> int:
    """Run one stage; returns the exit status (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="output folder (default $OUT)")
    parser.add_argument("--quick", action="store_true", help="CPU dry run: --quick benchmarks, no install")
    parser.add_argument("--no-install", action="store_true", help="fastprompt is installed already")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out: give an output folder (or set $OUT)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    started = time.time()
    statuses = {}
    with open(out / f"{args.stage}.log", "a") as log:
        if not (args.quick or args.no_install):
            statuses["install"] = install(log)
        for step in STAGES[args.stage]:
            statuses[step.name] = run_step(step, out, log, args.quick)
    collect_results(started, out)
    old, new = RENAME.get(args.stage, (None, None))
    for path in out.glob(f"{old}*.json") if old else ():
        if not path.name.startswith(new):
            path.rename(out / (new + path.name[len(old):]))
    lines = [f"== stage {args.stage} ({'quick, ' if args.quick else ''}{time.time() - started:.0f} s): "
             + ", ".join(f"{k} {v}" for k, v in statuses.items())]
    try:
        lines += summarize(out)
    except Exception as error:  # a half-written or unexpected file: the log and the JSON are still there
        lines.append(f"summary failed: {type(error).__name__}: {error}")
    text = "\n".join(lines) + "\n"
    (out / f"{args.stage}-summary.txt").write_text(text)
    print(text, end="")
    failed = any(s not in ("ok", "skipped") for s in statuses.values()) or "REFUSED" in text
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
