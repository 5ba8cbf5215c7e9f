"""Benchmark: fused prompt embedding (prompt tuning and MPT) vs PEFT's own prompt modules, forward and forward+backward.

The baseline ("peft") is PEFT's PromptEmbedding / MultitaskPromptEmbedding holding the very parameters
fastprompt reads, called as PeftModelForCausalLM.forward calls it: word embeddings of the tokens, the prompt
encoder on prompt_tokens (arange(P) expanded to [B, P]; MPT also gets task_ids), which materialises a
[B, P, d] tensor by embedding lookup (MPT then multiplies it by the per-row task factors), a cast to the
model's dtype, torch.cat. Prompt tuning runs one adapter (PEFT cannot mix prompt-tuning adapters in a
batch); MPT mixes `--tasks` tasks across the rows. fastprompt's path writes the final [B, P + T, d]
sequence once (MPT's prompt computed in-kernel).

Reports milliseconds (median, p20, p80), effective bandwidth (bytes a minimal implementation must move over
time) next to the device's copy bandwidth (`torch.empty_like(x).copy_(x)` of a tensor the output's size),
the ratio to PEFT and peak memory. A provider whose output or gradients disagree with the fp32 reference
is refused (exit status 1). Writes <--out, default bench/results>/prompt_embed-<device>-<date>.json.

    python bench/bench_prompt_embed.py                 # B64 T512 P100 d4096 bf16 model, fp32 prompts, CUDA
    python bench/bench_prompt_embed.py --quick         # tiny shapes on CPU, torch paths only (smoke test)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (  # noqa: E402
    DTYPES, WrongOutput, add_run_options, apply_run_options, check_or_refuse, dtype_name, exit_status,
    peak_memory_mb, print_table, time_ms, write_results)
from fastprompt import ops  # noqa: E402
from fastprompt.ops import reference  # noqa: E402


# ---------------------------------------------------------------------------------------------------------
# providers: each builds, from (inputs, params), the call that returns the [B, P + T, d] embeddings
# ---------------------------------------------------------------------------------------------------------
def peft_provider(mpt: bool):
    """PEFT's prompt module for the method, its parameters replaced by `params` (PEFT's layout: prompt
    tuning embedding.weight [P, d]; MPT embedding.weight [P, d], prefix_task_cols [n_tasks, P, r],
    prefix_task_rows [n_tasks, r, d]), so the gradients land on the same leaves as fastprompt's."""
    def build(inputs, params):
        import peft
        from peft.tuners.multitask_prompt_tuning import MultitaskPromptEmbedding
        from peft.tuners.prompt_tuning import PromptEmbedding

        word_embeddings = torch.nn.Embedding.from_pretrained(inputs["weight"], freeze=True)
        P, d = params[0].shape
        common = dict(task_type="CAUSAL_LM", num_virtual_tokens=P, token_dim=d, num_transformer_submodules=1)
        if mpt:
            n_tasks, _, rank = params[1].shape
            config = peft.MultitaskPromptTuningConfig(num_tasks=n_tasks, num_ranks=rank, **common)
            encoder = MultitaskPromptEmbedding(config, word_embeddings)
            encoder.embedding.weight, encoder.prefix_task_cols, encoder.prefix_task_rows = params
        else:
            encoder = PromptEmbedding(peft.PromptTuningConfig(**common), word_embeddings)
            encoder.embedding.weight = params[0]
        virtual = torch.arange(P, device=inputs["input_ids"].device)   # PEFT's prompt_tokens of the adapter
        task_args = (inputs["task_ids"],) if mpt else ()

        def run():
            tokens = word_embeddings(inputs["input_ids"])
            prompt_tokens = virtual.unsqueeze(0).expand(tokens.shape[0], -1)
            prompts = encoder(prompt_tokens, *task_args).to(tokens.dtype)
            return torch.cat((prompts, tokens), dim=1)
        return run
    return build


def fastprompt_provider(backend: str, mpt: bool):
    def build(inputs, params):
        def run():
            if mpt:
                return ops.mpt_prompt_embed(inputs["input_ids"], inputs["weight"], *params, inputs["task_ids"],
                                            backend=backend)
            return ops.prompt_embed(inputs["input_ids"], inputs["weight"], params[0][None], inputs["task_ids"],
                                    backend=backend)
        return run
    return build


# ---------------------------------------------------------------------------------------------------------
def fastprompt_args(params, mpt: bool) -> tuple:
    """The prompt arguments of fastprompt's op (and of its reference) from PEFT's parameter layout:
    prompt tuning's [P, d] table becomes a bank of one task, [1, P, d]; MPT's factors pass unchanged."""
    return tuple(params) if mpt else (params[0][None],)


def make_case(args, device, dtype, mpt: bool):
    """(inputs, params, grad_out): random token ids [B, T], word embeddings [V, d] in `dtype`, task ids [B]
    (MPT: random over --tasks tasks; prompt tuning: all 0, one adapter), the prompt parameters in PEFT's
    layout as nn.Parameters in --param-dtype, and a random output gradient [B, P + T, d]."""
    gen = torch.Generator().manual_seed(0)
    pdtype = DTYPES[args.param_dtype]
    B, T, P, d = args.batch, args.tokens, args.virtual, args.dim
    n_tasks = args.tasks if mpt else 1
    inputs = {
        "input_ids": torch.randint(0, args.vocab, (B, T), generator=gen).to(device),
        "weight": (torch.randn(args.vocab, d, generator=gen) * 0.02).to(device, dtype),
        "task_ids": torch.randint(0, n_tasks, (B,), generator=gen).to(device),
    }
    shapes = ((P, d), (n_tasks, P, args.rank), (n_tasks, args.rank, d)) if mpt else ((P, d),)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen).to(device, pdtype)) for s in shapes]
    grad_out = torch.randn(B, P + T, d, generator=gen).to(device, dtype)
    return inputs, params, grad_out


def min_bytes(args, dtype, mpt: bool, backward: bool) -> int:
    """Bytes a minimal implementation moves: token rows read, prompt rows read (per row, as if uncached),
    the output written; backward adds the gradient of the virtual positions read and the prompt
    gradient written once per task."""
    es = dtype.itemsize
    ps = DTYPES[args.param_dtype].itemsize
    B, T, P, d = args.batch, args.tokens, args.virtual, args.dim
    prompt_read = (P * d * ps + P * args.rank * ps + args.rank * d * ps) if mpt else P * d * ps
    fwd = B * T * d * es + B * prompt_read + B * (P + T) * d * es + B * T * 8
    if not backward:
        return fwd
    n_param = (P * d + args.tasks * (P + d) * args.rank) if mpt else P * d
    return fwd + B * P * d * es + n_param * ps


def reference_result(inputs, params, grad_out, mpt: bool):
    """fp32 reference output and gradients (PEFT's layout) from the same inputs upcast."""
    leaves = [p.detach().float().requires_grad_() for p in params]
    fn = reference.mpt_prompt_embed if mpt else reference.prompt_embed
    out = fn(inputs["input_ids"], inputs["weight"].float(), *fastprompt_args(leaves, mpt), inputs["task_ids"])
    out.backward(grad_out.float())
    return out.detach(), [leaf.grad for leaf in leaves]


def bench_case(args, device, dtype, mpt: bool, providers: dict, copy_gbps: float) -> list[dict]:
    """Rows of every provider (a builder of the call, see above) on one case: fwd and fwd+bwd timings,
    or a refusal; speedup_vs_peft = PEFT's ms / the provider's."""
    inputs, params, grad_out = make_case(args, device, dtype, mpt)
    ref_out, ref_grads = reference_result(inputs, params, grad_out, mpt)
    rtol = 1e-4 if dtype == torch.float32 and DTYPES[args.param_dtype] == torch.float32 else 2e-2
    op = "mpt_prompt_embed" if mpt else "prompt_embed"
    shape = f"B{args.batch}-T{args.tokens}-P{args.virtual}-d{args.dim}" + (f"-r{args.rank}" if mpt else "")
    common = {"op": op, "shape": shape, "dtype": dtype_name(dtype),
              "param_dtype": dtype_name(DTYPES[args.param_dtype]), "tasks": args.tasks if mpt else 1}
    rows = []
    for name, build in providers.items():
        fn = build(inputs, params)
        for p in params:
            p.grad = None
        try:
            out = fn()
            check_or_refuse(f"{op}/{name}", out.detach(), ref_out, rtol)
            out.backward(grad_out)
            for i, (p, g) in enumerate(zip(params, ref_grads)):
                check_or_refuse(f"{op}/{name} grad {i}", p.grad, g, rtol)
        except WrongOutput as err:                      # no speed for a wrong provider, only the refusal
            print(f"REFUSED {err}")
            rows.append({**common, "provider": name, "mode": "refused", "refused": str(err)})
            continue
        del out

        def fwd():
            with torch.no_grad():
                return fn()

        def fwd_bwd():
            for p in params:
                p.grad = None
            fn().backward(grad_out)

        for mode, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            timing = time_ms(call, device, warmup=args.warmup, reps=args.reps)
            gbps = min_bytes(args, dtype, mpt, mode == "fwd+bwd") / timing["ms"] / 1e6
            rows.append({**common, "provider": name, "mode": mode, **timing, "GB/s": gbps, "copy_GB/s": copy_gbps,
                         "frac_copy_bw": gbps / copy_gbps, "peak_mb": peak_memory_mb(call, device)})
    for mode in ("fwd", "fwd+bwd"):
        base = next((r["ms"] for r in rows if r["mode"] == mode and r["provider"] == "peft"), None)
        for r in rows:
            if r["mode"] == mode and base:
                r["speedup_vs_peft"] = base / r["ms"]
    return rows


def copy_bandwidth(args, device, dtype) -> tuple[float, float]:
    """ms and GB/s (read + write) of a plain copy of a tensor the size of the output."""
    x = torch.randn(args.batch, args.virtual + args.tokens, args.dim, device=device).to(dtype)
    ms = time_ms(lambda: torch.empty_like(x).copy_(x), device, warmup=args.warmup, reps=args.reps)["ms"]
    return ms, 2 * x.numel() * x.element_size() / ms / 1e6


def main(argv=None) -> int:
    """Run both cases; returns the exit status (1 when a provider was refused)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU, torch paths only")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--virtual", type=int, default=100)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tasks", type=int, default=8, help="MPT's tasks, mixed across the rows")
    parser.add_argument("--rank", type=int, default=1, help="MPT rank r (the MPT paper uses 1)")
    parser.add_argument("--param-dtype", default="fp32", choices=list(DTYPES), help="prompt parameters")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    add_run_options(parser, dtype="bf16")
    args = parser.parse_args(argv)
    dtype = apply_run_options(parser, args)

    if args.quick:
        args.device = args.device or "cpu"
        args.batch, args.tokens, args.virtual, args.dim, args.vocab, args.tasks = 3, 13, 7, 40, 61, 4
        args.warmup, args.reps = 1, 3
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick and device.type != "cpu":
        parser.error("--quick runs on the CPU")

    rows = []
    copy_ms, copy_gbps = copy_bandwidth(args, device, dtype)
    print(f"device {device}: copy of the output size {copy_ms:.3f} ms, {copy_gbps:.1f} GB/s")
    for mpt in (False, True):
        providers = {"peft": peft_provider(mpt), "fastprompt-torch": fastprompt_provider("torch", mpt)}
        if device.type == "cuda":
            providers["fastprompt"] = fastprompt_provider("triton", mpt)
        rows += bench_case(args, device, dtype, mpt, providers, copy_gbps)

    print_table(rows, ["op", "provider", "mode", "shape", "dtype", "ms", "ms_p20", "ms_p80", "GB/s",
                       "frac_copy_bw", "speedup_vs_peft", "peak_mb"])
    name = "prompt_embed-quick" if args.quick else "prompt_embed"
    print(f"wrote {write_results(name, rows, device, dated=True, out_dir=args.out)}")
    return exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
