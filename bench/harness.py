"""One benchmark harness: timed medians, peak memory, and JSON rows that name everything measured.

Every benchmark script builds rows with `measure` and writes them with `write_results`, which puts
`bench/results/<name>-<device>.json` beside this file (device, dtype, shapes, versions and commit in
each row). A provider whose output disagrees with the reference is refused (`check_or_refuse`).
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class WrongOutput(AssertionError):
    """Raised instead of reporting a speed for a provider whose output is wrong."""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.processor() or platform.machine()}"


def versions() -> dict:
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
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 5, reps: int = 20) -> dict:
    """Median, p20 and p80 milliseconds of `fn`, device-synchronised."""
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup * 5, rep=reps * 5,
                                                   quantiles=[0.5, 0.2, 0.8])
        return {"ms": median, "ms_p20": p20, "ms_p80": p80}
    samples = []
    for i in range(warmup + reps):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            samples.append((time.perf_counter() - start) * 1e3)
    q = torch.tensor(samples).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()
    return {"ms": q[0], "ms_p20": q[1], "ms_p80": q[2]}


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak device memory of one call of `fn` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def check_or_refuse(provider: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Raise WrongOutput when ‖actual − expected‖ / ‖expected‖ > rtol."""
    rel = float((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12))
    if not rel <= rtol:
        raise WrongOutput(f"{provider}: output differs from the reference (relative error {rel:.2e} > "
                          f"{rtol:.0e}); refusing to report its speed")


def write_results(name: str, rows: list[dict], device: torch.device) -> Path:
    """Write rows (each stamped with device, versions and commit) to bench/results/<name>-<device>.json."""
    stamp = {"device": device_name(device), "versions": versions(), "commit": commit(),
             "date": time.strftime("%Y-%m-%d")}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", stamp["device"]).strip("-").lower()
    path = RESULTS_DIR / f"{name}-{slug}.json"
    path.write_text(json.dumps([{**stamp, **row} for row in rows], indent=1) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
