"""Benchmark: fused LM-head cross-entropy vs its two matmuls and F.cross_entropy(hidden @ weight.T),
forward + backward to hidden.

Providers: "two-matmuls" (the floor: hidden @ weight.T and a [N, V] d-logits @ weight, both torch.mm on
cuBLAS, nothing else; fwd = the first alone), "unfused" (logits = hidden @ weight.T in the model's dtype,
F.cross_entropy on the fp32 logits, as HF's ForCausalLMLoss does; the weight is frozen, so no weight
gradient), "fastprompt-torch" (the chunked PyTorch path) and, on CUDA, "fastprompt" (cuBLAS matmuls per
chunk + the Triton chunk kernel) and "liger" (Liger-Kernel's LigerFusedLinearCrossEntropyLoss, issue 25's
anchor: every row's `ratio_vs_liger` is its time over Liger's; a "skipped" row where liger-kernel is not
installed). Reports milliseconds (median, p20, p80), the ratio to the unfused path,
the ratio to the two matmuls (`ratio_vs_two_matmuls`; issue 17's GPU target: fwd+bwd <= 1.3x, recorded
as `meets_target` on CUDA) and peak memory above the inputs. A provider whose loss or d hidden disagrees
with the unfused path is refused (exit status 1). Writes
<--out, default bench/results>/linear_cross_entropy-<device>-<date>.json.

    python bench/bench_linear_cross_entropy.py            # Llama-3.2-1B head: V128256 d2048, N 8x1024, bf16
    python bench/bench_linear_cross_entropy.py --dim 4096  # Llama-3.1-8B's head
    python bench/bench_linear_cross_entropy.py --quick    # tiny shapes on CPU, torch paths only (smoke test)
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (  # noqa: E402
    WrongOutput, add_run_options, apply_run_options, check_or_refuse, dtype_name, exit_status, peak_memory_mb,
    print_table, time_ms, write_results)
from fastprompt import ops  # noqa: E402


TARGET_RATIO_VS_TWO_MATMULS = 1.3     # issue 17: loss forward + backward within 1.3x its two matmuls (GPU)


def two_matmuls(hidden, weight, d_logits):
    """What the loss must cost at least: the logits, and d hidden from [N, V] d logits (no softmax)."""
    torch.mm(hidden, weight.t())
    return torch.mm(d_logits, weight)


def unfused(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)


def fastprompt_provider(backend: str):
    def run(hidden, weight, labels):
        return ops.linear_cross_entropy(hidden, weight, labels, backend=backend)
    return run


def liger_provider():
    """Liger-Kernel's fused linear cross-entropy (issue 25's anchor for the loss), mean over labelled tokens."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    return lambda hidden, weight, labels: loss(weight, hidden, labels)


def main(argv=None) -> int:
    """Check and time every provider; returns the exit status (1 when a provider was refused)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU, torch paths only")
    parser.add_argument("--device", default=None)
    parser.add_argument("--tokens", type=int, default=8 * 1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    add_run_options(parser, dtype="bf16")
    args = parser.parse_args(argv)
    dtype = apply_run_options(parser, args)
    if args.quick:
        args.device = args.device or "cpu"
        args.tokens, args.vocab, args.dim, args.warmup, args.reps = 256, 1000, 64, 3, 5
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick and device.type != "cpu":
        parser.error("--quick runs on the CPU")
    N, V, d = args.tokens, args.vocab, args.dim

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, d, generator=gen).to(device, dtype)
    weight = (torch.randn(V, d, generator=gen) * d**-0.5).to(device, dtype)
    labels = torch.randint(0, V, (N,), generator=gen).to(device)
    labels[:: 7] = -100

    providers = {"unfused": unfused, "fastprompt-torch": fastprompt_provider("torch")}
    shape = f"N{N}-V{V}-d{d}"
    rows = []
    if device.type == "cuda":
        providers["fastprompt"] = fastprompt_provider("triton")
        if importlib.util.find_spec("liger_kernel") is not None:
            providers["liger"] = liger_provider()
        else:
            rows.append({"op": "linear_cross_entropy", "provider": "liger", "mode": "skipped", "shape": shape,
                         "dtype": dtype_name(dtype), "skipped": "liger-kernel is not installed (pip install "
                         "liger-kernel; on the lent GPU it travels as a wheel, bench/gpu_session.py)"})

    leaf = hidden.clone().requires_grad_(True)
    ref_loss = unfused(leaf, weight, labels)
    ref_loss.backward()
    ref_grad, leaf.grad = leaf.grad, None
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, fn in providers.items():
        leaf.grad = None
        try:
            loss = fn(leaf, weight, labels)
            check_or_refuse(f"{name} loss", loss.detach()[None], ref_loss.detach()[None], rtol)
            loss.backward()
            check_or_refuse(f"{name} d hidden", leaf.grad, ref_grad, rtol)
        except WrongOutput as err:
            print(f"REFUSED {err}")
            rows.append({"op": "linear_cross_entropy", "provider": name, "mode": "refused", "shape": shape,
                         "dtype": dtype_name(dtype), "refused": str(err)})
            continue
        finally:
            leaf.grad = None
        del loss

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(leaf, weight, labels)

        def fwd_bwd(fn=fn):
            leaf.grad = None
            fn(leaf, weight, labels).backward()

        for mode, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            timing = time_ms(call, device, warmup=args.warmup, reps=args.reps)
            rows.append({"op": "linear_cross_entropy", "provider": name, "mode": mode, "shape": shape,
                         "dtype": dtype_name(dtype), **timing, "peak_mb": peak_memory_mb(call, device)})
    with torch.no_grad():
        d_logits = torch.randn(N, V, generator=gen).to(device, dtype)
        h = hidden.detach()
        for mode, call in (("fwd", lambda: torch.mm(h, weight.t())), ("fwd+bwd", lambda: two_matmuls(h, weight, d_logits))):
            timing = time_ms(call, device, warmup=args.warmup, reps=args.reps)
            rows.append({"op": "linear_cross_entropy", "provider": "two-matmuls", "mode": mode, "shape": shape,
                         "dtype": dtype_name(dtype), **timing, "peak_mb": peak_memory_mb(call, device)})
        del d_logits
    for mode in ("fwd", "fwd+bwd"):
        base = next((r["ms"] for r in rows if r["mode"] == mode and r["provider"] == "unfused"), None)
        floor = next((r["ms"] for r in rows if r["mode"] == mode and r["provider"] == "two-matmuls"), None)
        liger = next((r["ms"] for r in rows if r["mode"] == mode and r["provider"] == "liger"), None)
        for r in rows:
            if r["mode"] == mode and base:
                r["speedup_vs_unfused"] = base / r["ms"]
            if r["mode"] == mode and liger:
                r["ratio_vs_liger"] = r["ms"] / liger
            if r["mode"] == mode and floor:
                r["ratio_vs_two_matmuls"] = r["ms"] / floor
            if mode == "fwd+bwd" and device.type == "cuda" and r["provider"].startswith("fastprompt") and floor:
                r["target_ratio_vs_two_matmuls"] = TARGET_RATIO_VS_TWO_MATMULS
                r["meets_target"] = r["ratio_vs_two_matmuls"] <= TARGET_RATIO_VS_TWO_MATMULS
    print_table(rows, ["op", "provider", "mode", "shape", "dtype", "ms", "ms_p20", "ms_p80", "speedup_vs_unfused",
                       "ratio_vs_two_matmuls", "ratio_vs_liger", "peak_mb"])
    name = "linear_cross_entropy-quick" if args.quick else "linear_cross_entropy"
    print(f"wrote {write_results(name, rows, device, dated=True, out_dir=args.out)}")
    return exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
