"""Everything worth measuring on a lent GPU, in one device call that ends inside 9 minutes.

    python3 bench/gpu_session.py              # stage "all": native tests, training, loss, attention, serving
    python3 bench/gpu_session.py train        # stage "train": issue 17's training targets alone (< 6 minutes)
    python3 bench/gpu_session.py scale        # stage "scale": issue 25's 8B cases, the loss vs Liger, the
                                              # longest T at B1, tokens/s against T and P (plot: bench/plot.py)
    python3 bench/gpu_session.py --only serving,loss      # chosen steps of "all", e.g. to rerun what timed out
    python3 bench/gpu_session.py --quick --out /tmp/x     # CPU dry run: the same plumbing, --quick benchmarks

A session is lent 15 minutes of device time in all, a machine's start (1-2 minutes) included, so a stage is
one call (device tool: `timeout_s=580`). Each step runs under its own limit, clipped to what is left of the
stage's budget: a step that overruns is killed, its output so far stays in the log and the next step runs.
It runs from the bare checkout (the device machine has no network, and nothing needs installing:
`fastprompt/kernels` links to `kernels/`), with the checkout first on PYTHONPATH. Wheels carried in `.whl/`
(git-ignored; the device tool's `carry: [".whl"]`) are installed first into a scratch folder put on
PYTHONPATH: liger-kernel for the loss's anchor, fetched here with
`pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel==0.8.5`.

Written to --out (default $OUT), as the device tool returns at most 8 files: <stage>.log (every step's
output), <stage>-junit.xml (native tests), <stage>-summary.txt (printed last, ending with the targets of
bench/targets.py that were measured) and one JSON file per suite (bench/results/ naming). Each benchmark
step writes into a scratch folder and its rows are merged into that suite's file as soon as the step ends,
so a time-out keeps everything measured before it. Exit status: 1 if a step failed or timed out, or a
benchmark refused a provider.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
STAGE_BUDGET_S = {"all": 530, "train": 350, "scale": 530}
MODEL = "llama-3.2-1b"


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]       # "{scratch}" is the step's scratch folder, "{out}" the output folder
    limit_s: int
    quick_argv: tuple[str, ...] | None = None   # the CPU dry run's form; None: the step needs a GPU


def _bench(*args: str) -> tuple[str, ...]:
    return (PY, "-m", "bench", *args)


def _script(name: str, *args: str) -> tuple[str, ...]:
    return (PY, f"bench/{name}.py", *args)


# The providers worth the lease: PEFT's two baselines, fastprompt's default (the whole step from a CUDA
# graph) and each eager path (peft-eager, fastprompt-torch and the loss-only graph, fastprompt-loss-graph,
# were measured on 2026-12-04, the last as fastprompt-graphed, and only explain: they set no target).
TRAINING_PROVIDERS = "peft-sdpa,peft-lora-r16,fastprompt,fastprompt-eager,fastprompt-shared,fastprompt-concat"


def _training_suite(name: str, limit_s: int, *, model: str, method: str, batch: int, seq_len: int, providers: str,
                    steps: int, extra: tuple[str, ...] = (), quick_extra: tuple[str, ...] = ()) -> Step:
    """A training-suite run in its own process (a time-out costs it alone): `method` on `model` at batch x
    seq_len, bf16, `providers`, 2 warm-up + `steps` timed steps, then `extra` (e.g. a sweep). Its dry run:
    tiny-llama, --quick, then `quick_extra`."""
    return Step(name,
                _bench("--suite", "training", "--models", model, "--methods", method, "--batch", str(batch),
                       "--seq-len", str(seq_len), *extra, "--providers", providers, "--warmup", "2", "--steps",
                       str(steps), "--out", "{scratch}"), limit_s,
                _bench("--quick", "--suite", "training", "--models", "tiny-llama", "--methods", method, *quick_extra,
                       "--providers", providers, "--out", "{scratch}"))


def _training(seq_len: int, method: str, limit_s: int) -> Step:
    """One training-suite case at the Llama-3.2-1B shape, B8: TRAINING_PROVIDERS, 6 timed steps."""
    return _training_suite(f"train-T{seq_len}-{method}", limit_s, model=MODEL, method=method, batch=8,
                           seq_len=seq_len, providers=TRAINING_PROVIDERS, steps=6)


def _profile(seq_len: int, method: str, limit_s: int) -> Step:
    """Host time against device time and the costliest ops of one step (bench/profile_training.py), into
    the log: what the next optimisation should aim at."""
    return Step(f"profile-T{seq_len}-{method}",
                _script("profile_training", "--model", MODEL, "--method", method, "--seq-len", str(seq_len),
                        "--providers", "fastprompt,peft-sdpa"), limit_s,
                _script("profile_training", "--model", "tiny-llama", "--method", method, "--seq-len", "32",
                        "--device", "cpu", "--rows", "5"))


VERSIONS = ("import torch, triton, transformers, fastprompt; "
            "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, "
            "'transformers', transformers.__version__, 'fastprompt', fastprompt.__path__[0]); "
            "print(torch.cuda.get_device_properties(0) if torch.cuda.is_available() else 'no CUDA')")

# In order of worth: the headline training cases first (each checks every provider's loss and gradients
# against fp32 before timing; neither shape has run the whole-step graph yet), then the native tests (a
# failing kernel explains a refused provider), the other training cases and a profile of the step; serving
# was measured on 2026-12-04 and the prefix attention kernel is off the training path on CUDA
# (attention_route), so they take what is left.
STEPS: tuple[Step, ...] = (
    Step("versions", (PY, "-c", VERSIONS), 40, (PY, "-c", VERSIONS)),
    _training(512, "prompt_tuning-P100", 75),
    _training(128, "prompt_tuning-P100", 50),
    Step("native-tests", (PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs", "-n", "8",
                          "--junitxml={out}/{stage}-junit.xml", "tests"), 160),
    _training(512, "prefix-P100", 55),
    _training(512, "mpt-P100", 60),
    _profile(512, "prompt_tuning-P100", 45),
    Step("loss", _script("bench_linear_cross_entropy", "--device", "cuda", "--reps", "5", "--out", "{scratch}"), 40,
         _script("bench_linear_cross_entropy", "--quick", "--out", "{scratch}")),
    # 8 adapters only: with 1 and 8 the suite ran past 70 s on 2026-12-04 (it writes its JSON at the end)
    Step("serving", _bench("--suite", "serving", "--models", MODEL, "--serve-tasks", "8", "--serve-reps", "1",
                           "--out", "{scratch}"), 70,
         _bench("--quick", "--suite", "serving", "--out", "{scratch}")),
    Step("prefix-attention", _script("bench_prefix_attention", "--device", "cuda", "--out", "{scratch}"), 60,
         _script("bench_prefix_attention", "--quick", "--out", "{scratch}")),
)
SCALE_MODEL = "llama-3.1-8b"
SCALE_PROVIDERS = "peft-sdpa,fastprompt,fastprompt-eager"
SWEEP_PROVIDERS = "peft-sdpa,fastprompt"
LONGEST_SEQ_LENS = "4096,8192,12288,16384,24576,32768"


def _scale(batch: int, seq_len: int, limit_s: int) -> Step:
    """Issue 25's 8B case: prompt tuning P=100 at the Llama-3.1-8B shape (random weights built on the device,
    one copy shared by every provider), SCALE_PROVIDERS, 5 timed steps."""
    return _training_suite(f"scale-8b-B{batch}-T{seq_len}", limit_s, model=SCALE_MODEL, method="prompt_tuning-P100",
                           batch=batch, seq_len=seq_len, providers=SCALE_PROVIDERS, steps=5,
                           quick_extra=("--batch", str(batch)))


def _longest(provider: str, limit_s: int) -> Step:
    """The longest sequence `provider` trains at batch 1 at the 8B shape (bench/longest.py), one provider
    per process: an out-of-memory inside a graph capture cannot spoil the next one."""
    return Step(f"longest-8b-{provider}",
                (PY, "-m", "bench.longest", "--model", SCALE_MODEL, "--providers", provider, "--seq-lens",
                 LONGEST_SEQ_LENS, "--out", "{scratch}"), limit_s,
                (PY, "-m", "bench.longest", "--quick", "--providers", provider, "--out", "{scratch}"))


def _sweep(flag: str, values: str, seq_len: int, limit_s: int) -> Step:
    """A sweep at the 1B shape, B8, prompt tuning (tokens/s against T or P, bench/plot.py draws it), beside
    its main-table case at `seq_len`: PEFT and the default only, 4 timed steps."""
    return _training_suite(f"sweep-{flag.removeprefix('--sweep-')}", limit_s, model=MODEL,
                           method="prompt_tuning-P100", batch=8, seq_len=seq_len, providers=SWEEP_PROVIDERS, steps=4,
                           extra=(flag, values), quick_extra=(flag, "4,8" if "seq" in flag else "5,10"))


# Issue 25's scale stage, for a session after the headline cases of "all" have run: the 8B cases first,
# then the loss against Liger at both heads (carry liger-kernel's wheel: `.whl`, see the device README),
# the longest sequences at B1, and the T and P sweeps at 1B.
SCALE_STEPS: tuple[Step, ...] = (
    _scale(4, 1024, 120),
    _scale(8, 512, 100),
    Step("loss-8b", _script("bench_linear_cross_entropy", "--device", "cuda", "--dim", "4096", "--reps", "5", "--out",
                            "{scratch}"), 45,
         _script("bench_linear_cross_entropy", "--quick", "--out", "{scratch}")),
    _longest("fastprompt", 90),
    _longest("peft-sdpa", 60),
    _sweep("--sweep-seq-lens", "128,256,512,1024,2048,4096", 128, 110),
    _sweep("--sweep-num-virtual", "10,25,50,100,200,400", 512, 100),
)
STEPS += SCALE_STEPS
STAGES = {"all": tuple(s.name for s in STEPS if s not in SCALE_STEPS),
          "train": ("versions", "train-T512-prompt_tuning-P100", "train-T128-prompt_tuning-P100",
                    "train-T512-prefix-P100", "train-T512-mpt-P100", "loss"),
          "scale": ("versions", *(s.name for s in SCALE_STEPS[:3]), "loss", *(s.name for s in SCALE_STEPS[3:]))}


def step_argv(step: Step, quick: bool) -> tuple[str, ...] | None:
    """The step's command line (None: skipped in a dry run); native tests drop -n without pytest-xdist."""
    argv = step.quick_argv if quick else step.argv
    if argv is not None and "-n" in argv and importlib.util.find_spec("xdist") is None:
        i = argv.index("-n")
        argv = argv[:i] + argv[i + 2:]
    return argv


def run_step(argv: tuple[str, ...], name: str, limit_s: float, log) -> str:
    """Run one command with the checkout first on PYTHONPATH, its output appended to `log`; returns "ok",
    "failed (rc N)" or "timed out after N s"."""
    log.write(f"\n===== {name}: {' '.join(argv)} (limit {limit_s:.0f} s)\n")
    log.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    start = time.monotonic()
    try:
        rc = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=limit_s).returncode
    except subprocess.TimeoutExpired:
        status = f"timed out after {limit_s:.0f} s"
    else:
        status = "ok" if rc == 0 else f"failed (rc {rc})"
    log.write(f"===== {name}: {status} in {time.monotonic() - start:.0f} s\n")
    log.flush()
    return status


def merge_results(scratch: Path, out: Path) -> list[Path]:
    """Append the rows of every JSON file in `scratch` to the file of the same name in `out` (created if
    new), each written to a temporary name and renamed into place; returns the files written."""
    written = []
    for path in sorted(scratch.glob("*.json")):
        target = out / path.name
        rows = json.loads(target.read_text()) if target.exists() else []
        rows += json.loads(path.read_text())
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        tmp.replace(target)
        written.append(target)
    return written


def install_carried_wheels(site: Path, log) -> list[str]:
    """Install the wheels carried in <checkout>/.whl (the device machine has no network: liger-kernel, the
    loss's anchor, travels this way) into `site` and put it on PYTHONPATH for every step; returns the
    wheels' names (none: nothing to do). A failed install is logged and the steps run without them."""
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    if not wheels:
        return []
    status = run_step((PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                       "--no-cache-dir", "--target", str(site), *wheels), "carried wheels", 60, log)
    if status == "ok":
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(site), os.environ.get("PYTHONPATH"))))
    return [Path(w).name for w in wheels]


def run_stage(stage: str, steps: tuple[Step, ...], out: Path, quick: bool, budget_s: float) -> dict[str, str]:
    """Run `steps` in order within `budget_s` seconds, merging each step's JSON into `out` as it ends;
    returns each step's status ("skipped" in a dry run for GPU-only steps, "not run" once the budget is
    spent)."""
    deadline = time.monotonic() + budget_s
    statuses: dict[str, str] = {}
    with open(out / f"{stage}.log", "a") as log, tempfile.TemporaryDirectory(prefix="gpu-session-") as tmp:
        if not quick:
            install_carried_wheels(Path(tmp) / "site", log)
        for step in steps:
            argv = step_argv(step, quick)
            left = deadline - time.monotonic()
            if argv is None:
                statuses[step.name] = "skipped"
                continue
            if left < 5:
                statuses[step.name] = "not run (stage budget spent)"
                continue
            scratch = Path(tmp) / step.name
            scratch.mkdir()
            fill = {"{scratch}": str(scratch), "{out}": str(out), "{stage}": stage}
            argv = tuple(_fill(a, fill) for a in argv)
            statuses[step.name] = run_step(argv, step.name, min(step.limit_s, left), log)
            merge_results(scratch, out)
    return statuses


def _fill(arg: str, fill: dict[str, str]) -> str:
    for key, value in fill.items():
        arg = arg.replace(key, value)
    return arg


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
        if suite == "training" and all(r.get("sweep") == "longest" for r in rows):
            from bench.longest import longest_fitting

            lines += _table(rows, ["model", "batch", "seq_len", "provider", "status", "step_ms", "tokens_per_s",
                                   "peak_mb"])
            lines += [f"   {provider}: longest T trained at B1: {seq_len}"
                      for provider, seq_len in longest_fitting(rows).items()]
        elif suite == "training":
            lines += _table(rows, ["model", "method", "batch", "seq_len", "provider", "status", "step_ms",
                                   "tokens_per_s_vs_peft", "peak_mb_vs_peft", "mfu", "grad_rel_err"])
        elif suite == "serving":
            lines += _table(rows, ["n_tasks", "provider", "status", "tokens_per_s", "tokens_per_s_vs_peft",
                                   "ttft_ms_p50", "itl_ms_p50", "itl_ms_p50_vs_peft"])
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
    parser.add_argument("stage", nargs="?", choices=sorted(STAGES), default="all")
    parser.add_argument("--only", help=f"comma-separated steps of the stage to run: {', '.join(STAGES['all'])}")
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="output folder (default $OUT)")
    parser.add_argument("--quick", action="store_true", help="CPU dry run: --quick benchmarks, GPU-only steps skipped")
    parser.add_argument("--budget", type=float,
                        help="seconds for the whole stage (default: all 530, train 350, scale 530)")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out: give an output folder (or set $OUT)")
    names = STAGES[args.stage]
    if args.only:
        chosen = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(chosen) - set(names))
        if unknown:
            parser.error(f"--only: {unknown} are not steps of stage {args.stage!r}; its steps: {', '.join(names)}")
        names = tuple(n for n in names if n in chosen)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    started = time.monotonic()
    by_name = {s.name: s for s in STEPS}
    steps = tuple(by_name[name] for name in names)   # in the stage's order
    statuses = run_stage(args.stage, steps, out, args.quick, args.budget or STAGE_BUDGET_S[args.stage])
    lines = [f"== stage {args.stage} ({'quick, ' if args.quick else ''}{time.monotonic() - started:.0f} s): "
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
