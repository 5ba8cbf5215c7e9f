"""Benchmark prefix attention: fastprompt's Triton kernel against SDPA and flash-attn on the same inputs.

    python bench/bench_prefix_attention.py --quick     # tiny shapes on the CPU, torch backend only

Providers (each checked against the fp32 reference on row 0 before it is timed; refused if wrong):
  fastprompt   fastprompt.ops.prefix_attention (Triton backend on CUDA, routed by shape to the kernel or to
               SDPA on concatenated keys; the torch backend with --quick)
  fastprompt-kernel  the Triton kernel itself, whatever the route (CUDA only)
  sdpa-concat  torch SDPA on keys/values concatenated with the row's prefix beforehand (not timed),
               causal aligned to the end (torch.nn.attention.bias.causal_lower_right)
  sdpa-mask    SDPA with an explicit boolean [B, 1, T, P + S] mask (what PEFT's prefix path forces)
  flash-attn   flash_attn_func on the concatenated keys (causal is bottom-right aligned), when importable
Training shapes: forward, backward and both (TFLOP/s over the visible query-key pairs, and ms).
Decode: batch 64, one new token against a cache with per-row valid lengths, 64 distinct tasks vs one
(the same shape otherwise). The issue's targets (bench/targets.py: fwd+bwd within 1.1x of sdpa-concat,
>= 1.5x faster than sdpa-mask, decode with 64 tasks within 1.15x of one) are printed last.
Results go to <--out, default bench/results>/prefix_attention-<device>-<date>.json (prefix_attention-quick-...
with --quick), rewritten after every case. Exit status 1 when a provider was refused.

    python bench/bench_prefix_attention.py [--device cuda] [--dtype bf16] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (  # noqa: E402
    RTOL, WrongOutput, add_run_options, apply_run_options, check_or_refuse, dtype_name, exit_status,
    peak_memory_mb, print_table, time_ms, write_results)
from bench.targets import kernel_targets  # noqa: E402
from fastprompt.ops import prefix_attention, reference  # noqa: E402


def make_inputs(B, Hq, Hkv, T, S, P, D, n_tasks, dtype, device, *, lengths=None, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v = rand(B, Hq, T, D), rand(B, Hkv, S, D), rand(B, Hkv, S, D)
    pk, pv = rand(n_tasks, Hkv, P, D), rand(n_tasks, Hkv, P, D)
    bank_rows = (torch.arange(B) % n_tasks).to(device)
    mask = None
    if lengths is not None:
        mask = (torch.arange(S)[None, :] < lengths[:, None]).to(device)
    return q, k, v, pk, pv, bank_rows, mask


def visible_pairs(T, S, P, mask, causal=True):
    """Query-key pairs each row actually attends to (sum over the batch)."""
    if mask is None:
        own = T * (S - T) + T * (T + 1) // 2 if causal else T * S
        return None, own + T * P
    lengths = mask.sum(1).cpu()
    total = 0
    for n in lengths.tolist():
        pos = torch.arange(T) + (S - T)
        total += int(torch.clamp(torch.minimum(pos + 1, torch.tensor(n)), min=0).sum()) + T * P
    return total, None


def flops(B, Hq, T, S, P, D, mask, mode):
    total, per_row = visible_pairs(T, S, P, mask)
    pairs = total if total is not None else per_row * B
    fwd = 4.0 * Hq * D * pairs
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def build_providers(q, k, v, pk, pv, bank_rows, mask, *, quick):
    """name -> (callable(q, k, v, pk, pv) -> out, tensors the callable differentiates)."""
    B, Hq, T, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], pk.shape[2]
    G = Hq // Hkv
    backend = "torch" if quick else "triton"
    providers = {}
    providers["fastprompt"] = (
        lambda q_, k_, v_, pk_, pv_: prefix_attention(q_, k_, v_, pk_, pv_, bank_rows, causal=True,
                                                      key_padding_mask=mask, backend=backend),
        (q, k, v, pk, pv))
    if not quick:
        # The Triton kernel whatever the op's route picks (attention_route sends some shapes to SDPA), so
        # that the kernel's own speed stays measured while it is tuned.
        from fastprompt.ops.prefix_attention import _kernel_fwd

        providers["fastprompt-kernel"] = (
            lambda q_, k_, v_, pk_, pv_: _kernel_fwd(q_, k_, v_, pk_, pv_, bank_rows, mask, None, True, D ** -0.5)[0],
            (q, k, v, pk, pv))

    # Concatenated beforehand (not timed); GQA expanded beforehand as well.
    keys = torch.cat([pk[bank_rows], k], dim=2).repeat_interleave(G, dim=1).detach().requires_grad_()
    values = torch.cat([pv[bank_rows], v], dim=2).repeat_interleave(G, dim=1).detach().requires_grad_()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if mask is None:
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(T, P + S)
        providers["sdpa-concat"] = (lambda q_, k_, v_: sdpa(q_, k_, v_, attn_mask=bias), (q, keys, values))
    allowed = torch.ones(T, P + S, dtype=torch.bool, device=q.device).tril(P + S - T)[None, None]
    if mask is not None:
        allowed = allowed & torch.cat([mask.new_ones(B, P), mask], dim=1)[:, None, None, :]
    providers["sdpa-mask"] = (lambda q_, k_, v_: sdpa(q_, k_, v_, attn_mask=allowed), (q, keys, values))
    if q.is_cuda and mask is None:
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            flash_attn_func = None
        if flash_attn_func is not None:
            fk = torch.cat([pk[bank_rows], k], dim=2).transpose(1, 2).contiguous().detach().requires_grad_()
            fv = torch.cat([pv[bank_rows], v], dim=2).transpose(1, 2).contiguous().detach().requires_grad_()
            fq = q.transpose(1, 2).contiguous().detach().requires_grad_()
            providers["flash-attn"] = (
                lambda q_, k_, v_: flash_attn_func(q_, k_, v_, causal=True).transpose(1, 2), (fq, fk, fv))
    return providers


def bench_case(case, modes, device, dtype, quick, rows):
    B, Hq, Hkv, T, S, P, D, n_tasks, kind = (case[k] for k in ("B", "Hq", "Hkv", "T", "S", "P", "D",
                                                               "n_tasks", "kind"))
    lengths = case.get("lengths")
    q, k, v, pk, pv, bank_rows, mask = make_inputs(B, Hq, Hkv, T, S, P, D, n_tasks, dtype, device,
                                                  lengths=lengths)
    need_grad = any(m != "fwd" for m in modes)
    for t in (q, k, v, pk, pv):
        t.requires_grad_(need_grad)
    # The reference on row 0 and the first key/value head group (fp32, same inputs upcast).
    G = Hq // Hkv
    with torch.no_grad():
        want = reference.prefix_attention(
            q[:1, :G].float(), k[:1, :1].float(), v[:1, :1].float(), pk[:, :1].float(), pv[:, :1].float(),
            bank_rows[:1], causal=True, key_padding_mask=None if mask is None else mask[:1])
    shape = f"B{B}-Hq{Hq}-Hkv{Hkv}-T{T}-S{S}-P{P}-D{D}-tasks{n_tasks}"
    for name, (fn, tensors) in build_providers(q, k, v, pk, pv, bank_rows, mask, quick=quick).items():
        base = {"op": "prefix_attention", "kind": kind, "provider": name, "shape": shape, "B": B, "Hq": Hq,
                "Hkv": Hkv, "T": T, "S": S, "P": P, "D": D, "n_tasks": n_tasks, "dtype": dtype_name(dtype)}
        try:
            with torch.no_grad():
                out = fn(*tensors)
            check_or_refuse(name, out[:1, :G], want, RTOL[dtype])
        except WrongOutput as err:
            print(f"REFUSED {shape} {name}: {err}")
            rows.append({**base, "mode": "check", "refused": str(err)})
            continue
        except (RuntimeError, NotImplementedError) as err:  # e.g. a backend that rejects the shape
            print(f"SKIPPED {shape} {name}: {type(err).__name__}: {str(err)[:160]}")
            rows.append({**base, "mode": "check", "skipped": str(err)[:500]})
            continue
        del out
        for mode in modes:
            if mode == "fwd":
                def run():
                    with torch.no_grad():
                        return fn(*tensors)
            else:
                out = fn(*tensors)
                grad = torch.randn_like(out)
                inputs = tuple(t for t in tensors if t.requires_grad)
                if mode == "bwd":
                    def run(out=out, grad=grad, inputs=inputs):
                        return torch.autograd.grad(out, inputs, grad, retain_graph=True)
                else:
                    def run(grad=grad, inputs=inputs):
                        return torch.autograd.grad(fn(*tensors), inputs, grad)
            reps = (2, 3) if quick else (5, 20)
            try:
                timing = time_ms(run, device, warmup=reps[0], reps=reps[1])
                peak = peak_memory_mb(run, device)
            except torch.OutOfMemoryError:  # a provider that does not fit this shape is a result
                print(f"OOM {shape} {name} {mode}")
                rows.append({**base, "mode": mode, "skipped": "out of memory"})
                continue
            finally:
                out = None
            tflops = flops(B, Hq, T, S, P, D, mask, mode) / (timing["ms"] * 1e-3) / 1e12
            rows.append({**base, "mode": mode, **timing, "tflops": tflops, "peak_mb": peak})
        torch.cuda.empty_cache() if device.type == "cuda" else None
    # Ratios against fastprompt, per mode.
    ours = {r["mode"]: r["ms"] for r in rows if r["shape"] == shape and r["provider"] == "fastprompt"
            and "ms" in r}
    for r in rows:
        if r["shape"] == shape and "ms" in r and r["mode"] in ours:
            r["speedup_of_fastprompt"] = r["ms"] / ours[r["mode"]]


def training_cases(quick):
    if quick:
        return [dict(B=2, Hq=4, Hkv=2, T=64, S=64, P=20, D=64, n_tasks=2, kind="train"),
                dict(B=1, Hq=2, Hkv=2, T=48, S=48, P=0, D=128, n_tasks=1, kind="train")]
    cases = []
    for D in (64, 128):
        Hq = 2048 // D
        for B, T in ((64, 512), (16, 2048), (4, 8192), (1, 8192)):
            for P in (0, 20, 100):
                for n_tasks in ((1,) if P == 0 else (1, 16)):
                    cases.append(dict(B=B, Hq=Hq, Hkv=Hq, T=T, S=T, P=P, D=D, n_tasks=n_tasks, kind="train"))
    # One grouped-query case (8 query heads per key/value head).
    cases.append(dict(B=16, Hq=32, Hkv=4, T=2048, S=2048, P=100, D=128, n_tasks=16, kind="train"))
    return cases


def decode_cases(quick):
    B, S = (4, 96) if quick else (64, 4096)
    lengths = torch.linspace(S // 8, S, B).round().long()
    cases = []
    for D in ((64,) if quick else (64, 128)):
        Hq = 4 if quick else 2048 // D
        Hkv = 2 if quick else Hq // 4
        for P in (20, 100):
            for n_tasks in (B, 1):  # 64 distinct tasks vs every row on one task
                cases.append(dict(B=B, Hq=Hq, Hkv=Hkv, T=1, S=S, P=P, D=D, n_tasks=n_tasks, kind="decode",
                                  lengths=lengths))
    return cases


def main(argv=None) -> int:
    """Run every case; returns the exit status (1 when a provider was refused)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU, torch backend only")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    add_run_options(parser, dtype="bf16")
    args = parser.parse_args(argv)
    dtype = apply_run_options(parser, args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    if not args.quick and device.type != "cuda":
        parser.error("the full benchmark needs --device cuda; use --quick for a CPU smoke test")
    rows: list[dict] = []
    name = "prefix_attention-quick" if args.quick else "prefix_attention"
    cases = [(case, ("fwd", "bwd", "fwd+bwd")) for case in training_cases(args.quick)]
    cases += [(case, ("fwd",)) for case in decode_cases(args.quick)]
    for i, (case, modes) in enumerate(cases):
        bench_case(case, modes, device, dtype, args.quick, rows)
        # Rewritten after every case, so a run stopped by a time limit keeps what it measured.
        path = write_results(name, rows, device, dated=True, out_dir=args.out)
        print(f"case {i + 1}/{len(cases)} done, {sum('ms' in r for r in rows)} timings in {path}", flush=True)
    print_table([r for r in rows if "ms" in r],
                ["kind", "shape", "provider", "mode", "ms", "tflops", "speedup_of_fastprompt", "peak_mb"])
    for target in kernel_targets(rows, device.type):
        print(target)
    print(f"wrote {path}")
    return exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
