"""The longest sequence each provider trains at batch 1 on this device (issue 25's scale question).

    python -m bench.longest --model llama-3.1-8b --providers fastprompt --seq-lens 4096,8192,16384,32768
    python -m bench.longest --quick      # tiny-llama on the CPU: the same plumbing, nothing runs out

For each provider (bench/training.py's PROVIDERS, in the order given), prompt tuning P=100 at batch 1: the
sequence lengths are tried in ascending order, each with a fresh runner on the model's shared weights, until
one does not fit (status "oom", the last row of that provider). A row per length tried: one training step
timed after a first (which captures a CUDA graph where the provider replays one), tokens/s, and the peak
memory of building the runner and its first step above what was allocated before (the model's weights are
"before"). Nothing is checked against a reference here: the main table (`python -m bench`) checks every
provider, and an fp32 reference at 32k tokens would not fit itself. Rows are training rows with sweep
"longest", written to <out>/longest-<device>-<date>.json (longest-quick-... with --quick, which git ignores).

Run one provider per process on a GPU (bench/gpu_session.py does): a CUDA error after an out-of-memory
inside a graph capture cannot spoil the next provider's lengths.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from bench.harness import (failure_status, peak_memory_mb, print_table, release_memory, time_steps_ms,
                           write_results)
from bench.models import build_model, max_positions, model_shape
from bench.training import (LR, PROVIDERS, SWEEP_METHOD, Batch, Builder, Case, NotApplicable, Settings,
                            case_columns, result_row, training_step)

COLUMNS = ["model", "method", "batch", "seq_len", "provider", "status", "step_ms", "tokens_per_s", "peak_mb", "error"]


def probe(base: torch.nn.Module, case: Case, build: Builder, provider: str, settings: Settings) -> dict:
    """One row: `provider`'s training step on `case` (random tokens, PEFT's start for the prompt), its time
    and the peak memory of its build and first step; status "ok", "oom", "n/a" or "error"."""
    common = case_columns(case, settings.dtype, model_shape(base))
    batch = Batch.random(case, common["model_shape"]["vocab"], settings.device)
    made: dict = {}

    def build_and_first_step():
        torch.manual_seed(0)
        runner = build(base, case.method, None)
        optimizer = torch.optim.AdamW(list(runner.params.values()), lr=LR)
        made["step"] = training_step(runner, batch, optimizer)
        made["step"]()

    try:
        peak = peak_memory_mb(build_and_first_step, settings.device)
        timing = time_steps_ms(made["step"], settings.device, warmup=0, reps=1)
    except NotApplicable as reason:
        return result_row(common, provider=provider, status="n/a", error=str(reason))
    except Exception as error:  # out of memory is the answer; anything else is reported as an error
        status, message = failure_status(error)
        return result_row(common, provider=provider, status=status, error=message)
    finally:
        made.clear()
        release_memory(settings.device)
    return result_row(common, provider=provider, status="ok", step_ms=timing["ms"], peak_mb=peak,
                      tokens_per_s=case.batch * case.seq_len / (timing["ms"] / 1e3))


def longest(base: torch.nn.Module, model: str, seq_lens: tuple[int, ...], settings: Settings,
            providers: dict[str, Builder], log=print) -> list[dict]:
    """Rows of every (provider, length) tried: per provider, ascending lengths up to the first that does
    not fit ("oom") or fails."""
    rows = []
    for name, build in providers.items():
        for seq_len in sorted(seq_lens):
            row = probe(base, Case(model, SWEEP_METHOD, 1, seq_len, "longest"), build, name, settings)
            rows.append(row)
            log(f"longest {model} B1 T{seq_len} {name}: {row['status']}"
                + (f" {row['step_ms']:.0f} ms/step, peak {row['peak_mb']} MB" if row["status"] == "ok"
                   else f" ({row['error']})"))
            if row["status"] != "ok":
                break
    return rows


def longest_fitting(rows: list[dict]) -> dict[str, int | None]:
    """Per provider, the longest sequence length whose row is "ok" (None where none was)."""
    found: dict[str, int | None] = {}
    for row in rows:
        best = found.get(row["provider"])
        if row["status"] == "ok" and (best is None or row["seq_len"] > best):
            best = row["seq_len"]
        found[row["provider"]] = best
    return found


def main(argv=None) -> int:
    """Probe every provider; returns 1 if one failed with an error (out of memory is a result)."""
    from bench.run import DTYPES, positive_ints

    parser = argparse.ArgumentParser(prog="python -m bench.longest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="from bench/models.py (default llama-3.1-8b; --quick tiny-llama)")
    parser.add_argument("--providers", default="peft-sdpa,fastprompt",
                        help=f"comma-separated, probed in this order, from: {', '.join(PROVIDERS)}")
    parser.add_argument("--seq-lens", type=positive_ints,
                        help="lengths to try (default 2048,4096,...,65536; --quick 8,16,32)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--quick", action="store_true", help="tiny-llama, short lengths (a CPU smoke run)")
    parser.add_argument("--out", help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.providers.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown or not names:
        parser.error(f"--providers: unknown {unknown or args.providers!r}; choose from {', '.join(PROVIDERS)}")
    model = args.model or ("tiny-llama" if args.quick else "llama-3.1-8b")
    seq_lens = args.seq_lens or ((8, 16, 32) if args.quick else (2048, 4096, 8192, 16384, 32768, 65536))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    try:
        limit = max_positions(model)
    except ValueError as error:
        parser.error(f"--model: {error}")
    too_long = [t for t in seq_lens if limit is not None and t + SWEEP_METHOD.num_virtual > limit]
    if too_long:
        parser.error(f"--seq-lens: {too_long} with {SWEEP_METHOD.num_virtual} virtual tokens exceed {model}'s "
                     f"{limit} positions")
    base = build_model(model, dtype, device)
    settings = Settings(device, dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="peft")
        rows = longest(base, model, seq_lens, settings, {n: PROVIDERS[n] for n in names},
                       log=lambda line: print(line, file=sys.stderr, flush=True))
    print_table(rows, COLUMNS)
    for provider, seq_len in longest_fitting(rows).items():
        print(f"{model} B1 {SWEEP_METHOD.label}: {provider} trains at most T={seq_len} of those tried")
    path = write_results("longest-quick" if args.quick else "longest", rows, device, dated=True, out_dir=args.out)
    print(f"wrote {path}")
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
