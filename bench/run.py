"""`python -m bench`: fastprompt against PEFT, training and serving, side by side in one run.

    python -m bench                                  # everything, on the GPU, bf16
    python -m bench --suite training --sweep         # + throughput vs sequence length and P, memory vs batch
    python -m bench --quick --suite all              # tiny models, a few steps: a CPU smoke run (~15 s)
    python -m bench --suite serving --serve-tasks 1,8,64 --plot

Suites: training (bench/training.py), serving (bench/serving.py), kernels (the three kernel
micro-benchmarks, bench/bench_*.py, each with its own shapes, given this run's --dtype, --out and
--threads; they write <out>/<op>-<device>-<date>.json themselves), all. Training and serving print a
table with ratios to PEFT and write <out>/<suite>-<device>-<date>.json (<suite>-quick-... with --quick,
which git ignores; <out> defaults to bench/results). Each suite ends with the issue's targets it
measured (bench/targets.py; the prefix-attention script prints its own). `--plot` draws the PNGs of
bench/plot.py from the training and serving results. Exit status 1 when a provider was refused (wrong
outputs) or failed with an error, in any suite; out of memory is a result, not a failure.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from bench import serving, training
from bench.harness import dtype_name, print_table, write_results
from bench.targets import targets

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SUITES = ("training", "serving", "kernels")
KERNEL_SCRIPTS = ("bench_prefix_attention", "bench_prompt_embed", "bench_linear_cross_entropy")

# Settings that --quick shrinks; an explicit option wins over either column.
DEFAULTS = {
    "models": ("llama-3.2-1b,gpt2-medium", "tiny-llama,tiny-gpt2"),
    "batch": (8, 4),
    "seq_len": (512, 16),
    "warmup": (5, 3),
    # --quick judges the CPU targets: a tiny step is a few milliseconds on a shared machine, so a median of
    # 3 moved the ratios by +-30%; 15 steps keep the suite under a minute.
    "steps": (20, 15),
    "sweep_seq_lens": ("128,256,512,1024,2048", "8,16,32"),
    "sweep_batches": ("1,2,4,8,16,32", "1,2,4"),
    "sweep_num_virtual": ("10,25,50,100,200,400", "2,5,10"),
    "serve_rows": (64, 8),
    "serve_tasks": ("1,8,64", "1,2,8"),
    "serve_prompt_len": (128, 8),
    "serve_new_tokens": (64, 6),
    "serve_virtual": (100, 20),
    "serve_reps": (2, 1),
    "threads": (None, 1),
}

TRAINING_COLUMNS = ["model", "method", "batch", "seq_len", "provider", "status", "step_ms", "tokens_per_s",
                    "tokens_per_s_vs_peft", "peak_mb", "peak_mb_vs_peft", "saved_mb", "saved_mb_vs_peft", "mfu",
                    "mfu_datasheet", "loss_rel_err", "grad_rel_err", "error"]
SERVING_COLUMNS = ["model", "n_tasks", "rows", "provider", "status", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50",
                   "itl_ms_p99", "tokens_per_s", "tokens_per_s_vs_peft", "itl_ms_p50_vs_peft", "peak_mb", "error"]

SWEEPS = ("sweep_seq_lens", "sweep_batches", "sweep_num_virtual")   # training_cases' keyword arguments


def positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and resolve the command line: device, dtype and every --quick-dependent default filled in."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=(*SUITES, "all"), default="all")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--quick", action="store_true", help="tiny models and shapes, few steps (a CPU smoke run)")
    p.add_argument("--out", type=Path, help="results folder (default bench/results)")
    p.add_argument("--plot", action="store_true", help="draw bench/plot.py's PNGs beside the results")
    p.add_argument("--threads", type=int, help="CPU threads for torch (--quick: 1, steadier on a shared machine)")
    g = p.add_argument_group("training")
    g.add_argument("--models", help="comma-separated, from bench/models.py (sweeps and serving use the first)")
    g.add_argument("--methods", help="comma-separated labels, e.g. prompt_tuning-P100,mpt-P100 (default: all)")
    g.add_argument("--providers", help="comma-separated, from bench/training.py's PROVIDERS (default: all; "
                                       "peft-sdpa, the baseline of every ratio, always runs)")
    g.add_argument("--batch", type=int)
    g.add_argument("--seq-len", type=int)
    g.add_argument("--warmup", type=int, help="untimed steps before timing")
    g.add_argument("--steps", type=int, help="timed steps (the median is reported)")
    g.add_argument("--sweep", action="store_true",
                   help="also sweep sequence length, batch and virtual tokens (prompt tuning, P=100 in the first "
                        "two); a --sweep-* list given alone runs that sweep alone")
    g.add_argument("--sweep-seq-lens", type=positive_ints, help="e.g. 128,256,512,1024,2048 (at --batch)")
    g.add_argument("--sweep-batches", type=positive_ints, help="e.g. 1,2,4,8,16,32 (at --seq-len)")
    g.add_argument("--sweep-num-virtual", type=positive_ints, help="e.g. 10,25,50,100,200,400 (at --batch x --seq-len)")
    g = p.add_argument_group("serving")
    g.add_argument("--serve-rows", type=int)
    g.add_argument("--serve-tasks", type=positive_ints, help="numbers of distinct tasks, e.g. 1,8,64")
    g.add_argument("--serve-prompt-len", type=int)
    g.add_argument("--serve-new-tokens", type=int)
    g.add_argument("--serve-virtual", type=int, help="virtual tokens per adapter")
    g.add_argument("--serve-reps", type=int, help="timed runs after the checked warm-up run")
    args = p.parse_args(argv)

    sweeps = [name for name in SWEEPS if args.sweep or getattr(args, name) is not None]
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            value = quick if args.quick else full
            setattr(args, name, positive_ints(value) if name.startswith(("sweep_", "serve_tasks")) else value)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models:
        p.error("--models: name at least one model")
    args.suites = SUITES if args.suite == "all" else (args.suite,)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    if "kernels" in args.suites and not args.quick and args.device != "cuda":
        p.error("the kernels suite needs --device cuda; add --quick for its CPU smoke run")
    args.dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    args.device = torch.device(args.device)
    args.methods = _methods(p, args.methods)
    args.providers = _providers(p, args.providers)
    for name in ("batch", "seq_len", "steps", "serve_rows", "serve_prompt_len", "serve_virtual", "serve_reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    try:  # the case lists check shapes against the models before anything is built
        args.training_cases = training.training_cases(
            args.models, args.methods, args.batch, args.seq_len,
            **{name: getattr(args, name) if name in sweeps else () for name in SWEEPS})
        args.serving_cases = serving.serving_cases(args.models[0], args.serve_rows, args.serve_tasks,
                                                   args.serve_prompt_len, args.serve_new_tokens, args.serve_virtual)
    except ValueError as error:
        p.error(str(error))
    return args


def _providers(parser: argparse.ArgumentParser, text: str | None) -> dict:
    """The training providers named (in PROVIDERS' order), the baseline always among them."""
    if text is None:
        return training.PROVIDERS
    names = {t.strip() for t in text.split(",") if t.strip()}
    unknown = sorted(names - set(training.PROVIDERS))
    if unknown or not names:
        parser.error(f"--providers: unknown {unknown or text!r}; choose from {', '.join(training.PROVIDERS)}")
    names.add(training.BASELINE)
    return {name: build for name, build in training.PROVIDERS.items() if name in names}


def _methods(parser: argparse.ArgumentParser, text: str | None) -> tuple[training.Method, ...]:
    known = {m.label: m for m in training.METHODS}
    if text is None:
        return training.METHODS
    labels = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in labels if t not in known]
    if unknown or not labels:
        parser.error(f"--methods: unknown {unknown or text!r}; choose from {', '.join(known)}")
    return tuple(known[t] for t in labels)


def run_kernels(args) -> int:
    """The kernel micro-benchmarks, each as its own script would run (--quick: their CPU smoke runs), with
    this run's dtype, results folder and threads; returns 1 if any of them refused a provider."""
    import importlib

    argv = ["--quick"] if args.quick else ["--device", "cuda"]
    argv += ["--dtype", dtype_name(args.dtype)]
    argv += ["--out", str(args.out)] if args.out else []
    argv += ["--threads", str(args.threads)] if args.threads else []
    status = 0
    for script in KERNEL_SCRIPTS:
        print(f"\n== kernels: bench/{script}.py {' '.join(argv)}")
        if importlib.import_module(f"bench.{script}").main(argv):
            print(f"REFUSED: kernels bench/{script}.py refused a provider", file=sys.stderr)
            status = 1
    return status


def main(argv=None) -> int:
    """Run the chosen suites; returns the exit status (1 if any provider was refused or failed)."""
    import transformers

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    verbosity = transformers.logging.get_verbosity()
    try:
        # Random-weight configs and PEFT's wrappers warn about things that do not matter to a benchmark.
        transformers.logging.set_verbosity_error()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="peft")
            return _run_suites(args)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _run_suites(args) -> int:
    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    written, failed, kernels_status = [], [], 0
    for suite in args.suites:
        if suite == "kernels":
            kernels_status = run_kernels(args)
            continue
        if suite == "training":
            rows = training.run(args.training_cases, training.Settings(args.device, args.dtype, args.warmup,
                                                                         args.steps), args.providers, log=log)
        else:
            rows = serving.run(args.serving_cases, serving.Settings(args.device, args.dtype, args.serve_reps), log=log)
        columns = TRAINING_COLUMNS if suite == "training" else SERVING_COLUMNS
        if args.device.type != "cuda":  # CUDA-only measurements would print as a column of None
            columns = [c for c in columns if not c.startswith(("peak_mb", "mfu_datasheet"))]
        if all(r["error"] is None for r in rows):
            columns.remove("error")
        print(f"\n== {suite}: {args.device.type}, {dtype_name(args.dtype)}; ratios are to "
              f"{training.BASELINE if suite == 'training' else serving.BASELINE}")
        print_table(rows, columns)
        for target in targets(rows, args.device.type):
            print(target)
        path = write_results(f"{suite}-quick" if args.quick else suite, rows, args.device, dated=True,
                             out_dir=args.out)
        print(f"wrote {path}")
        written.append(path)
        failed += [r for r in rows if r["status"] in ("refused", "error")]
    if args.plot and written:
        from bench import plot

        for path in plot.draw(written, out_dir=args.out or written[0].parent):
            print(f"plotted {path}")
    for row in failed:
        print(f"{row['status'].upper()}: {row['suite']} {row['provider']}: {row['error']}", file=sys.stderr)
    return 1 if failed or kernels_status else 0
