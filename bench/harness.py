"""One benchmark harness: timed medians, peak memory, and JSON rows that name everything measured.

Every benchmark builds its rows and writes them with `write_results`, which puts
`bench/results/<name>-<device>.json` beside this file, or `<name>-<device>-<date>.json` with
`dated=True` (device, versions, commit and date stamped on each row; the rows carry dtype and shapes).
A provider whose output disagrees with the reference is refused (`check_or_refuse`); `add_ratios`
puts each row next to its baseline provider.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from fastprompt.io import atomic_write

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# ‖out − ref‖ / ‖ref‖ allowed against an fp32 reference (ARCHITECTURE.md, "Tolerances").
RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
# `python -m bench`'s short names, and torch's (which the kernel scripts took first), for the same dtypes.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WrongOutput(AssertionError):
    """Raised instead of reporting a speed for a provider whose output is wrong."""


def device_name(device: torch.device) -> str:
    """The GPU's marketing name ("NVIDIA H100 80GB HBM3"), or "cpu-<processor>"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.processor() or platform.machine()}"


def versions() -> dict:
    """Versions of torch, triton, transformers and peft (None where peft is not installed)."""
    import transformers
    import triton

    found = {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__}
    try:
        import peft

        found["peft"] = peft.__version__
    except ImportError:
        found["peft"] = None
    return found


def commit() -> str | None:
    """The repository's short commit hash, or None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 5, reps: int = 20) -> dict:
    """Median, p20 and p80 milliseconds of `fn`, device-synchronised (triton's do_bench on CUDA, which
    sizes its own repetitions from a time budget: meant for kernels of micro- to milliseconds)."""
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup * 5, rep=reps * 5,
                                                   quantiles=[0.5, 0.2, 0.8])
        return {"ms": median, "ms_p20": p20, "ms_p80": p80}
    return time_steps_ms(fn, device, warmup=warmup, reps=reps)


def time_steps_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, reps: int) -> dict:
    """Median, p20 and p80 milliseconds over exactly `reps` calls of `fn` after `warmup` calls, each
    call timed on its own between two device synchronisations (for whole training steps, where a fixed
    count of steps matters more than a time budget)."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    samples = []
    for i in range(warmup + reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            samples.append((time.perf_counter() - start) * 1e3)
    q = torch.tensor(samples, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return {"ms": q[0].item(), "ms_p20": q[1].item(), "ms_p80": q[2].item()}


def time_interleaved_ms(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int,
                        reps: int) -> dict[str, dict | Exception]:
    """`time_steps_ms` of several functions at once, interleaved: each of `warmup + reps` rounds calls every
    function once, each call timed on its own between two device synchronisations. On a shared machine the
    load drifts over seconds; interleaving gives every function the same share of it, so their ratios hold
    where timing one after another moved them by +-30%. A function that raises is dropped from the rounds
    and gets its exception instead of a timing."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    samples: dict[str, list[float]] = {name: [] for name in fns}
    failed: dict[str, Exception] = {}
    # Python's cyclic garbage collector off while timing (as timeit does): a collection costs milliseconds
    # with several models resident, and since it fires after a fixed count of allocations it fell on the
    # same function of every round, making one of two identical functions 1.7x slower.
    gc.collect()
    gc.disable()
    try:
        for i in range(warmup + reps):
            for name, fn in fns.items():
                if name in failed:
                    continue
                synchronize(device)
                start = time.perf_counter()
                try:
                    fn()
                    synchronize(device)
                except Exception as error:  # reported in the result, the others go on
                    failed[name] = error
                    continue
                if i >= warmup:
                    samples[name].append((time.perf_counter() - start) * 1e3)
    finally:
        gc.enable()
    quantiles = torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
    result: dict[str, dict | Exception] = {}
    for name in fns:
        if name in failed:
            result[name] = failed[name]
            continue
        q = torch.tensor(samples[name], dtype=torch.float64).quantile(quantiles)
        result[name] = {"ms": q[0].item(), "ms_p20": q[1].item(), "ms_p80": q[2].item()}
    return result


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Call `fn` once; return the peak device memory during the call above what was allocated before it
    (MiB), or None off CUDA (the call still runs, so callers may collect what it produces)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def release_memory(device: torch.device) -> None:
    """On CUDA, collect garbage (models hold reference cycles) and return cached blocks, so the next
    provider's peak counts only what it allocates. Nothing on the CPU, where a collection costs more
    than a tiny model's whole step and no peak is measured."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def failure_status(error: Exception) -> tuple[str, str]:
    """(status, message) for a provider that raised: ("oom", "out of memory") when the device ran out of
    memory (a result: this batch does not fit), else ("error", "Type: message") with the traceback
    printed to stderr (a bug somewhere, not a measurement)."""
    if isinstance(error, torch.OutOfMemoryError):
        return "oom", "out of memory"
    traceback.print_exc(file=sys.stderr)
    return "error", f"{type(error).__name__}: {error}"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in fp32 (any shapes that match; tensors may live on any device)."""
    expected = expected.detach().float()
    diff = actual.detach().float().to(expected.device) - expected
    return float(diff.norm() / expected.norm().clamp_min(1e-12))


def check_or_refuse(provider: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Raise WrongOutput when ‖actual − expected‖ / ‖expected‖ > rtol."""
    rel = relative_error(actual, expected)
    if not rel <= rtol:
        raise WrongOutput(f"{provider}: output differs from the reference (relative error {rel:.2e} > "
                          f"{rtol:.0e}); refusing to report its speed")


def add_run_options(parser: argparse.ArgumentParser, *, dtype: str) -> None:
    """Add the options `python -m bench` passes to a kernel script: --dtype (default `dtype`, a key of
    DTYPES), --out (results folder) and --threads (torch's CPU threads)."""
    parser.add_argument("--dtype", default=dtype, choices=list(DTYPES), help=f"model dtype (default {dtype})")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")


def apply_run_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.dtype:
    """Set torch's thread count from --threads (a parser error when < 1); returns --dtype as a torch dtype."""
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return DTYPES[args.dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: how every result row names its dtype."""
    return str(dtype).removeprefix("torch.")


def exit_status(rows: list[dict]) -> int:
    """A kernel script's exit status: 1 when a provider was refused (its row carries "refused"), else 0."""
    return 1 if any(r.get("refused") for r in rows) else 0


def write_results(name: str, rows: list[dict], device: torch.device, *, dated: bool = False,
                  out_dir: str | Path | None = None) -> Path:
    """Write rows, each stamped with device, versions, commit, date and torch's CPU thread count, to
    <out_dir>/<name>-<device>.json (<name>-<device>-<YYYY-MM-DD>.json when `dated`); out_dir defaults
    to bench/results. The file is written to a temporary name and renamed into place. Returns its path."""
    stamp = {"device": device_name(device), "versions": versions(), "commit": commit(),
             "date": time.strftime("%Y-%m-%d"), "cpu_threads": torch.get_num_threads()}
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", stamp["device"]).strip("-").lower()
    stem = f"{name}-{slug}-{stamp['date']}" if dated else f"{name}-{slug}"
    path = Path(out_dir if out_dir is not None else RESULTS_DIR) / f"{stem}.json"
    text = json.dumps([{**stamp, **row} for row in rows], indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def add_ratios(rows: list[dict], *, group_by: tuple[str, ...], baseline: str, metrics: tuple[str, ...],
               label: str = "peft") -> list[dict]:
    """Set row[f"{metric}_vs_{label}"] = row[metric] / baseline_row[metric] on every row, where the
    baseline row is the one whose "provider" is `baseline` among rows with equal `group_by` values.

    A ratio is None where either value is missing (None, absent, zero) — a refused or failed provider,
    or a metric the device does not report. Returns `rows`, changed in place.
    """
    def key(row):
        return tuple(row.get(k) for k in group_by)

    base = {key(r): r for r in rows if r.get("provider") == baseline}
    for row in rows:
        reference = base.get(key(row), {})
        for metric in metrics:
            value, ref = row.get(metric), reference.get(metric)
            row[f"{metric}_vs_{label}"] = value / ref if value and ref else None
    return rows


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print the given keys of each row as aligned columns (absent values print as None)."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(value) -> str:
    if not isinstance(value, float):
        return str(value)
    # Four significant digits whatever the magnitude (0.0123 MFU, 1.83x, 12,345 tokens/s).
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
