"""Where a training step's time goes: host time against device time, and the costliest ops, per provider.

    python bench/profile_training.py --model llama-3.2-1b --method prompt_tuning-P100 --seq-len 512
    python bench/profile_training.py --model tiny-llama --method mpt-P20 --device cpu     # a CPU dry run

For each provider (bench/training.py's builders, the same models as the training suite) it warms up, then
times one step (forward, backward, gradients cleared; a provider that runs its whole step, the default
`fastprompt` on CUDA, runs that step at learning rate 0) twice: the host's time to issue it without a
synchronisation, and the wall time with one. When the first is near the second the step is host-bound:
the device idles while Python and the dispatcher issue kernels. Then one step under torch.profiler:
the ops by device time and by host (self CPU) time, and the number of kernel launches. Prints only;
bench/gpu_session.py keeps the output in its log.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.harness import release_memory, synchronize  # noqa: E402
from bench.models import build_model  # noqa: E402
from bench.training import METHODS, PROVIDERS, Batch, Case, NotApplicable  # noqa: E402


def profile_provider(name: str, base, case: Case, batch: Batch, device: torch.device, warmup: int, rows: int) -> None:
    """Print one provider's host/wall split and profiler tables."""
    from torch.profiler import ProfilerActivity, profile

    try:
        runner = PROVIDERS[name](base, case.method, None)
    except NotApplicable as why:
        print(f"== {name}: n/a ({why})")
        return

    def step():
        if runner.step is not None:
            runner.step(batch, 0.0)
        else:
            runner.loss(batch).backward()
        for p in runner.params.values():
            p.grad = None

    for _ in range(warmup):
        step()
    synchronize(device)
    host, wall = [], []
    for _ in range(3):
        start = time.perf_counter()
        step()
        host.append(time.perf_counter() - start)
        synchronize(device)
        wall.append(time.perf_counter() - start)
    host_ms, wall_ms = sorted(host)[1] * 1e3, sorted(wall)[1] * 1e3
    print(f"== {name}: one step {wall_ms:.1f} ms wall, {host_ms:.1f} ms to issue it "
          f"({100 * host_ms / wall_ms:.0f}% of the wall: {'host-bound' if host_ms > 0.8 * wall_ms else 'device-bound'})")
    planner = getattr(runner.module, "planner", None)  # fastprompt's plans by shape (fastprompt/planner.py)
    if planner is not None and planner.plans:
        print(f"   planned: {sorted({(plan.path, plan.packed_form) for plan in planner.plans.values()}, key=str)}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    averages = prof.key_averages()
    if device.type == "cuda":
        kernels = sum(e.count for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"   kernel launches per step: {kernels}")
        print(averages.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=64))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=64))
    del runner
    release_memory(device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.2-1b", help="a name from bench/models.py")
    methods = {m.label: m for m in METHODS}   # the training suite's
    parser.add_argument("--method", default="prompt_tuning-P100", choices=sorted(methods))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--providers", default="fastprompt,peft-sdpa",
                        help=f"comma-separated, from: {', '.join(PROVIDERS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=18, help="ops per profiler table")
    args = parser.parse_args(argv)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        parser.error(f"--providers: unknown {unknown}; known: {', '.join(PROVIDERS)}")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    case = Case(args.model, methods[args.method], args.batch, args.seq_len)
    base = build_model(args.model, dtype, device)
    for p in base.parameters():
        p.requires_grad_(False)
    batch = Batch.random(case, base.config.vocab_size, device)
    print(f"profile: {args.model} {case.method.label} B{args.batch} T{args.seq_len} {dtype} on {device}")
    for name in providers:
        profile_provider(name, base, case, batch, device, args.warmup, args.rows)


if __name__ == "__main__":
    main()
