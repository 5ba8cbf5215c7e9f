"""Compile every Triton kernel ahead of time for a CUDA target, on a machine without a GPU.

Triton's interpreter (how the CPU test suite runs the kernels) enforces none of the GPU compile rules:
tl.dot tile sizes, shared-memory limits, register pressure, layouts. This module checks them without a
device: it runs the real launchers (`prefix_attention_fwd`, `lce_chunk`, ...) on fake CUDA tensors
(torch's FakeTensorMode: shapes, dtypes and strides, no storage), intercepts each kernel launch, and
compiles exactly what the launch would have compiled (same arguments, so the same specialisation, block
sizes, num_warps and num_stages from the launchers' own config functions, which see the target's compute
capability) for the chosen target with the ptxas that ships with Triton. Each compiled launch reports its
shared memory, registers and spills.

It must run in a process where TRITON_INTERPRET is unset when Triton is first imported (under the
interpreter `@triton.jit` builds interpreter objects, which cannot be compiled):

    python -m fastprompt.kernels.aot_compile --arch 90 80 [--sweep] [--json] [--only "bf16 D=64"]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from typing import Callable
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature

from fastprompt.kernels import linear_cross_entropy as LCE
from fastprompt.kernels import norms as NORMS
from fastprompt.kernels import prefix_attention as PA
from fastprompt.kernels import prompt_embed as PE

# Usable shared memory per block (bytes) and SM count of the reference GPU of each architecture.
ARCHS = {90: dict(name="H100", max_shared=232448, sm_count=132),
         80: dict(name="A100", max_shared=166912, sm_count=108)}
MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions 1 and 2 (dimension 0 may reach 2**31 - 1)
HEAD_DIMS = (32, 64, 80, 96, 128)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Launch:
    """One intercepted kernel launch: the case that made it, the kernel, its arguments and grid."""
    case: str
    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: tuple


def ptxas_missing() -> str | None:
    """Why nothing can be compiled here (no ptxas for this Triton), or None when ptxas is there."""
    try:
        triton.knobs.nvidia.ptxas.path
    except Exception as e:  # knobs raise a bare RuntimeError when no candidate path holds a ptxas
        return f"Triton's ptxas is unavailable: {e}"
    return None


# ----------------------------------------------------------------------------------------------------
# Recording the launches of the real launchers on fake CUDA tensors
# ----------------------------------------------------------------------------------------------------
def _mock(arg):
    """Tensors become MockTensor (dtype only, a 16-aligned null pointer, as a fresh allocation is)."""
    return MockTensor(arg.dtype) if isinstance(arg, torch.Tensor) else arg


def record(case: str, call: Callable[[], object], arch: int) -> list[Launch]:
    """Run `call` (which calls launchers on CUDA tensors made inside it) under fake CUDA tensors; return
    the kernel launches it made, in order, without running any of them."""
    launches = []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(case, self, tuple(map(_mock, args)), {k: _mock(v) for k, v in kwargs.items()},
                               tuple(grid)))

    from torch._subclasses.fake_tensor import FakeTensorMode
    with mock.patch.object(JITFunction, "run", run), \
            mock.patch.object(PA, "_sm_count", lambda index: ARCHS[arch]["sm_count"]), \
            mock.patch.object(PA, "_arch", lambda index: arch), \
            mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}), FakeTensorMode(allow_non_fake_inputs=True):
        call()
    return launches


def _randn(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="cuda")


def _prefix_attention(dtype, D, T, causal, mask, bias, backward):
    """A GQA layer (8 query heads, 2 key/value heads), a 20-token prefix, a cache 512 longer than T."""
    B, Hq, Hkv, S, P = 3, 8, 2, T + 512, 20

    def call():
        q, k, v = _randn(B, Hq, T, D, dtype=dtype), _randn(B, Hkv, S, D, dtype=dtype), _randn(B, Hkv, S, D, dtype=dtype)
        pk, pv = _randn(4, Hkv, P, D, dtype=dtype), _randn(4, Hkv, P, D, dtype=dtype)
        bank_rows = torch.zeros(B, dtype=torch.int64, device="cuda")
        kpm = torch.ones(B, S, dtype=torch.bool, device="cuda") if mask else None
        b = _randn(B, 1, T, P + S, dtype=dtype) if bias else None
        out, lse = PA.prefix_attention_fwd(q, k, v, pk, pv, bank_rows, causal=causal, key_padding_mask=kpm, bias=b)
        if backward:
            PA.prefix_attention_bwd(torch.empty_like(out), q, k, v, pk, pv, bank_rows, out, lse, causal=causal,
                                    key_padding_mask=kpm, bias=b)
    return call


def _lce(dtype, V, bias):
    """The loss's chunk kernel on a 1024-token chunk of logits over V entries, as the op launches it:
    with d logits and a mean's scale (training) and without (no gradient)."""
    N = 1024

    def call():
        logits = _randn(N, V, dtype=dtype)
        labels = torch.zeros(N, dtype=torch.int64, device="cuda")
        loss = torch.empty(N, dtype=torch.float32, device="cuda")
        b = _randn(V, dtype=dtype) if bias else None
        LCE.lce_chunk(logits, labels, loss, b, -100, True, torch.empty((), dtype=torch.float32, device="cuda"))
        LCE.lce_chunk(logits, labels, loss, b, -100, False)
    return call


def _prompt_embed(dtype, d, positions):
    """Prompt tuning and MPT embeddings of 8 rows x 500 tokens with a 20-token prompt, and the prompt
    gradient; `positions` places the prompt with an explicit position map."""
    B, T, P, n_tasks, V, r = 8, 500, 20, 4, 32000, 2

    def call():
        ids = torch.zeros(B, T, dtype=torch.int64, device="cuda")
        emb = _randn(V, d, dtype=dtype)
        task_ids = torch.zeros(B, dtype=torch.int64, device="cuda")
        pos = torch.zeros(B, P + T, dtype=torch.int64, device="cuda") if positions else None
        PE.prompt_embed_fwd(ids, emb, _randn(n_tasks, P, d, dtype=dtype), task_ids, pos)
        PE.mpt_prompt_embed_fwd(ids, emb, _randn(P, d, dtype=dtype), _randn(n_tasks, P, r, dtype=dtype),
                                _randn(n_tasks, r, d, dtype=dtype), task_ids, pos)
        PE.prompt_grad(_randn(B, P + T, d, dtype=dtype), task_ids, n_tasks, P, pos, dtype=torch.float32)
    return call


def _norms(dtype, d):
    """RMSNorm and LayerNorm of 4096 rows of d, SwiGLU and both GELUs over 4096 x 4d, forward and backward."""
    M = 4096

    def call():
        x, w = _randn(M, d, dtype=dtype), _randn(d, dtype=dtype)
        for rms, b in ((True, None), (False, _randn(d, dtype=dtype))):
            NORMS.norm_fwd(x, w, b, 1e-6, rms)
            NORMS.norm_bwd(torch.empty_like(x), x, w, 1e-6, rms)
        a, up = _randn(M, 4 * d, dtype=dtype), _randn(M, 4 * d, dtype=dtype)
        for kind in NORMS.ACTIVATIONS:
            b = up if kind == "swiglu" else None
            NORMS.act_fwd(kind, a, b)
            NORMS.act_bwd(kind, torch.empty_like(a), a, b)
    return call


def cases(sweep: bool, only: str = "") -> list[tuple[str, Callable[[], object]]]:
    """(name, launcher call) pairs whose name contains `only`. Quick: bf16 (fp16 compiles to the same
    tiles) at the largest head dim, causal with padding, with and without a bias. Sweep: every dtype, head
    dim and feature combination."""
    if sweep:
        every = [c for dname, dtype in DTYPES.items() for c in _cases_for(
            dname, dtype, HEAD_DIMS, [(c, m, b) for c in (True, False) for m in (True, False) for b in (True, False)],
            lce_vocabs=(32000, 128256), lce_bias=(True, False), embed_dims=(768, 4096, 5120), norm_dims=(768, 4096, 8192))]
    else:
        every = _cases_for("bf16", torch.bfloat16, (128,), [(True, True, False), (True, True, True)],
                           lce_vocabs=(128256,), lce_bias=(True,), embed_dims=(4096,), norm_dims=(8192,))
    return [(name, call) for name, call in every if only in name]


def _cases_for(dname, dtype, dims, flags, lce_vocabs, lce_bias, embed_dims, norm_dims):
    out = []
    for D in dims:
        for causal, mask, bias in flags:
            tag = f"{dname} D={D} causal={causal:d} mask={mask:d} bias={bias:d}"
            out.append((f"prefix_attention train {tag}", _prefix_attention(dtype, D, 300, causal, mask, bias, True)))
            out.append((f"prefix_attention decode {tag}", _prefix_attention(dtype, D, 1, causal, mask, bias, False)))
    out += [(f"linear_cross_entropy {dname} V={v} bias={b:d}", _lce(dtype, v, b)) for v in lce_vocabs for b in lce_bias]
    out += [(f"prompt_embed {dname} d={d} positions={p:d}", _prompt_embed(dtype, d, p))
            for d in embed_dims for p in (True, False)]
    out += [(f"norms {dname} d={d}", _norms(dtype, d)) for d in norm_dims]
    return out


# ----------------------------------------------------------------------------------------------------
# Compiling one launch
# ----------------------------------------------------------------------------------------------------
_PTXAS_LINE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.S)


def _specialise(launch: Launch, target: GPUTarget):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run would compile the launch."""
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def launch_key(launch: Launch, arch: int) -> str:
    """What makes two launches compile to the same binary (the kernel and its specialisation)."""
    signature, constexprs, attrs, options = _specialise(launch, GPUTarget("cuda", arch, 32))
    return repr((launch.kernel.fn.__qualname__, sorted(signature.items()), sorted(constexprs.items()),
                 sorted(attrs.items()), options.num_warps, options.num_stages))


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile one launch for sm_<arch>; returns a row: case, kernel, constexprs, warps, stages, grid,
    shared (bytes), regs and spill bytes (from ptxas -v), limits, and `error` (None when it compiled)."""
    target = GPUTarget("cuda", arch, 32)
    signature, constexprs, attrs, options = _specialise(launch, target)
    names = launch.kernel.arg_names
    row = dict(case=launch.case, kernel=launch.kernel.fn.__name__, arch=arch,
               constexprs={names[k[0]]: v for k, v in constexprs.items() if names[k[0]].isupper()},
               num_warps=options.num_warps, num_stages=options.num_stages, grid=list(launch.grid),
               max_shared=ARCHS[arch]["max_shared"], seconds=None, shared=None, regs=None, spills=None, error=None)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        # ptxas -v's report is printed by Triton only when asked; a fresh cache makes ptxas run every time
        with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log), \
                mock.patch.dict(os.environ, {"TRITON_DUMP_PTXAS_LOG": "1", "TRITON_CACHE_DIR": cache}):
            compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as e:  # a failed compile is a result to report, with Triton's message
        row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        return row
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["shared"] = compiled.metadata.shared
    found = _PTXAS_LINE.search(log.getvalue())
    if found:
        row["spills"] = int(found.group(1)) + int(found.group(2))
        row["regs"] = int(found.group(3))
    return row


def problems(row: dict) -> list[str]:
    """What is wrong with a compiled row: a compile error, shared memory over the limit, spills, a grid
    dimension over CUDA's limit."""
    if row["error"]:
        return [row["error"]]
    bad = []
    if row["shared"] > row["max_shared"]:
        bad.append(f"shared memory {row['shared']} B > {row['max_shared']} B")
    if row["spills"]:
        bad.append(f"{row['spills']} bytes of register spills")
    if any(n > MAX_GRID_YZ for n in row["grid"][1:]):
        bad.append(f"grid {row['grid']} exceeds {MAX_GRID_YZ} in dimension 1 or 2")
    return bad


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------
_TODO: list[tuple[Launch, int]] = []  # the work list, inherited by forked workers


def _compile_nth(i: int) -> dict:
    return compile_launch(*_TODO[i])


def run(archs: list[int], sweep: bool, workers: int, only: str = "") -> list[dict]:
    """Record the launches of every case whose name contains `only`, dedupe identical binaries per arch,
    compile them (in `workers` forked processes), and return one row per distinct binary."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not isinstance(PA._fwd_kernel, JITFunction):
        raise ValueError("TRITON_INTERPRET must be unset (or 0) when Triton is imported, got "
                         f"{os.environ.get('TRITON_INTERPRET')!r}")
    _TODO.clear()
    seen = set()
    for arch in archs:
        for name, call in cases(sweep, only):
            for launch in record(name, call, arch):
                key = (arch, launch_key(launch, arch))
                if key not in seen:
                    seen.add(key)
                    _TODO.append((launch, arch))
    if workers <= 1:
        return [_compile_nth(i) for i in range(len(_TODO))]
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_nth, range(len(_TODO))))


def format_table(rows: list[dict]) -> str:
    """A markdown table of the rows."""
    lines = ["| arch | case | kernel | constexprs | warps/stages | shared B | regs | spills | problems |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cx = " ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith(("BLOCK", "D_PAD", "SPLIT")))
        lines.append(f"| sm_{r['arch']} | {r['case']} | {r['kernel']} | {cx} | {r['num_warps']}/{r['num_stages']} "
                     f"| {r['shared']} | {r['regs']} | {r['spills']} | {'; '.join(problems(r))[:200]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(ARCHS))
    parser.add_argument("--sweep", action="store_true", help="every head dim and feature combination")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--only", default="", help="compile only the cases whose name contains this text")
    parser.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    args = parser.parse_args(argv)
    missing = ptxas_missing()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    rows = run(args.arch, args.sweep, args.workers, args.only)
    if not rows:
        parser.error(f"--only {args.only!r} matches no case; names look like {cases(args.sweep)[0][0]!r}")
    print(json.dumps(rows) if args.json else format_table(rows))
    return int(any(problems(r) for r in rows))


if __name__ == "__main__":
    sys.exit(main())
