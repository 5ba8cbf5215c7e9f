"""Benchmark: fused prompt embedding (prompt tuning and MPT) vs PEFT's path, forward and forward+backward.

PEFT's path, written here with plain torch ops: embedding lookup, a per-row prompt tensor [B, P, d] (for MPT:
index_select of the task factors, a batched matmul and an elementwise product, materialised per row), then
torch.cat. fastprompt's path writes the final [B, P + T, d] sequence once (MPT's prompt computed in-kernel).

Reports milliseconds (median, p20, p80), effective bandwidth (bytes a minimal implementation must move over
time) next to the device's copy bandwidth (`torch.empty_like(x).copy_(x)` of a tensor the output's size),
the ratio to PEFT's path and peak memory. A provider whose output or gradients disagree with the reference
is refused. Writes bench/results/prompt_embed-<device>.json.

    python bench/bench_prompt_embed.py                 # B64 T512 P100 d4096 bf16 model, fp32 prompts, CUDA
    python bench/bench_prompt_embed.py --quick         # tiny shapes on CPU, torch paths only (smoke test)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (  # noqa: E402
    WrongOutput, check_or_refuse, peak_memory_mb, print_table, time_ms, write_results)
from fastprompt import ops  # noqa: E402
from fastprompt.ops import reference  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------------
# providers: each takes (inputs, params) and returns the [B, P + T, d] embeddings
# ---------------------------------------------------------------------------------------------------------
def peft_prompt(inputs, params):
    """PEFT prompt tuning: embed the tokens, build a per-row prompt tensor, concatenate."""
    (prompts,) = params
    tokens = F.embedding(inputs["input_ids"], inputs["weight"])
    row_prompts = prompts.index_select(0, inputs["task_ids"]).to(tokens.dtype)          # [B, P, d]
    return torch.cat([row_prompts, tokens], dim=1)


def peft_mpt(inputs, params):
    """PEFT MultitaskPromptEmbedding: shared prompt per row, task factors per row, matmul, product, cat."""
    shared, task_cols, task_rows = params
    B = inputs["input_ids"].shape[0]
    tokens = F.embedding(inputs["input_ids"], inputs["weight"])
    prompt = shared[None].expand(B, -1, -1)                                             # embedding(indices)
    cols = torch.index_select(task_cols, 0, inputs["task_ids"])                         # [B, P, r]
    rows = torch.index_select(task_rows, 0, inputs["task_ids"])                         # [B, r, d]
    row_prompts = (prompt * torch.matmul(cols, rows)).to(tokens.dtype)                  # [B, P, d]
    return torch.cat([row_prompts, tokens], dim=1)


def fastprompt_provider(backend: str, mpt: bool):
    def run(inputs, params):
        if mpt:
            return ops.mpt_prompt_embed(inputs["input_ids"], inputs["weight"], *params, inputs["task_ids"],
                                        backend=backend)
        return ops.prompt_embed(inputs["input_ids"], inputs["weight"], *params, inputs["task_ids"],
                                backend=backend)
    return run


# ---------------------------------------------------------------------------------------------------------
def make_case(args, device, mpt: bool):
    gen = torch.Generator().manual_seed(0)
    dtype, pdtype = DTYPES[args.dtype], DTYPES[args.param_dtype]
    B, T, P, d = args.batch, args.tokens, args.virtual, args.dim
    inputs = {
        "input_ids": torch.randint(0, args.vocab, (B, T), generator=gen).to(device),
        "weight": (torch.randn(args.vocab, d, generator=gen) * 0.02).to(device, dtype),
        "task_ids": torch.randint(0, args.tasks, (B,), generator=gen).to(device),
    }
    if mpt:
        shapes = ((P, d), (args.tasks, P, args.rank), (args.tasks, args.rank, d))
    else:
        shapes = ((args.tasks, P, d),)
    params = [torch.randn(*s, generator=gen).to(device, pdtype).requires_grad_() for s in shapes]
    grad_out = torch.randn(B, P + T, d, generator=gen).to(device, dtype)
    return inputs, params, grad_out


def min_bytes(args, mpt: bool, backward: bool) -> int:
    """Bytes a minimal implementation moves: token rows read, prompt rows read (per row, as if uncached),
    the output written; backward adds the gradient of the virtual positions read and the prompt
    gradient written once per task."""
    es = DTYPES[args.dtype].itemsize
    ps = DTYPES[args.param_dtype].itemsize
    B, T, P, d = args.batch, args.tokens, args.virtual, args.dim
    prompt_read = (P * d * ps + P * args.rank * ps + args.rank * d * ps) if mpt else P * d * ps
    fwd = B * T * d * es + B * prompt_read + B * (P + T) * d * es + B * T * 8
    if not backward:
        return fwd
    n_param = (P * d + args.tasks * (P + d) * args.rank) if mpt else args.tasks * P * d
    return fwd + B * P * d * es + n_param * ps


def reference_result(inputs, params, grad_out, mpt: bool):
    """fp32 reference output and gradients from the same inputs upcast."""
    leaves = [p.detach().float().requires_grad_() for p in params]
    fn = reference.mpt_prompt_embed if mpt else reference.prompt_embed
    out = fn(inputs["input_ids"], inputs["weight"].float(), *leaves, inputs["task_ids"])
    out.backward(grad_out.float())
    return out.detach(), [leaf.grad for leaf in leaves]


def bench_case(args, device, mpt: bool, providers: dict, copy_ms: float, copy_gbps: float) -> list[dict]:
    inputs, params, grad_out = make_case(args, device, mpt)
    ref_out, ref_grads = reference_result(inputs, params, grad_out, mpt)
    rtol = 1e-4 if DTYPES[args.dtype] == torch.float32 and DTYPES[args.param_dtype] == torch.float32 else 2e-2
    op = "mpt_prompt_embed" if mpt else "prompt_embed"
    shape = f"B{args.batch}-T{args.tokens}-P{args.virtual}-d{args.dim}" + (f"-r{args.rank}" if mpt else "")
    rows = []
    for name, fn in providers.items():
        for p in params:
            p.grad = None
        try:
            out = fn(inputs, params)
            check_or_refuse(f"{op}/{name}", out.detach(), ref_out, rtol)
            out.backward(grad_out)
            for i, (p, g) in enumerate(zip(params, ref_grads)):
                check_or_refuse(f"{op}/{name} grad {i}", p.grad, g, rtol)
        except WrongOutput as err:                      # no speed for a wrong provider, only the refusal
            print(f"REFUSED {err}")
            rows.append({"op": op, "provider": name, "mode": "refused", "shape": shape, "dtype": args.dtype,
                         "param_dtype": args.param_dtype, "refused": str(err)})
            continue
        del out

        def fwd():
            with torch.no_grad():
                return fn(inputs, params)

        def fwd_bwd():
            for p in params:
                p.grad = None
            fn(inputs, params).backward(grad_out)

        for mode, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            timing = time_ms(call, device, warmup=args.warmup, reps=args.reps)
            nbytes = min_bytes(args, mpt, mode == "fwd+bwd")
            gbps = nbytes / timing["ms"] / 1e6
            rows.append({"op": op, "provider": name, "mode": mode, "shape": shape, "dtype": args.dtype,
                         "param_dtype": args.param_dtype, "tasks": args.tasks, **timing,
                         "GB/s": gbps, "copy_GB/s": copy_gbps, "frac_copy_bw": gbps / copy_gbps,
                         "peak_mb": peak_memory_mb(call, device)})
    for mode in ("fwd", "fwd+bwd"):
        base = next((r["ms"] for r in rows if r["mode"] == mode and r["provider"] == "peft-path"), None)
        for r in rows:
            if r["mode"] == mode and base:
                r["speedup_vs_peft"] = base / r["ms"]
    return rows


def copy_bandwidth(args, device) -> tuple[float, float]:
    """ms and GB/s (read + write) of a plain copy of a tensor the size of the output."""
    x = torch.randn(args.batch, args.virtual + args.tokens, args.dim, device=device).to(DTYPES[args.dtype])
    ms = time_ms(lambda: torch.empty_like(x).copy_(x), device, warmup=args.warmup, reps=args.reps)["ms"]
    return ms, 2 * x.numel() * x.element_size() / ms / 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU, torch paths only")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--virtual", type=int, default=100)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=int, default=1, help="MPT rank r (the MPT paper uses 1)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="model (embedding) dtype")
    parser.add_argument("--param-dtype", default="float32", choices=sorted(DTYPES), help="prompt parameters")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)

    if args.quick:
        args.device = args.device or "cpu"
        args.batch, args.tokens, args.virtual, args.dim, args.vocab, args.tasks = 3, 13, 7, 40, 61, 4
        args.warmup, args.reps = 1, 3
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick and device.type != "cpu":
        parser.error("--quick runs on the CPU")

    rows = []
    copy_ms, copy_gbps = copy_bandwidth(args, device)
    print(f"device {device}: copy of the output size {copy_ms:.3f} ms, {copy_gbps:.1f} GB/s")
    for mpt in (False, True):
        providers = {"peft-path": peft_mpt if mpt else peft_prompt,
                     "fastprompt-torch": fastprompt_provider("torch", mpt)}
        if device.type == "cuda":
            providers["fastprompt"] = fastprompt_provider("triton", mpt)
        rows += bench_case(args, device, mpt, providers, copy_ms, copy_gbps)

    print_table(rows, ["op", "provider", "mode", "shape", "dtype", "ms", "ms_p20", "ms_p80", "GB/s",
                       "frac_copy_bw", "speedup_vs_peft", "peak_mb"])
    name = "prompt_embed-quick" if args.quick else "prompt_embed"
    print(f"wrote {write_results(name, rows, device)}")


if __name__ == "__main__":
    main()
