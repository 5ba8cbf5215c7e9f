"""Every Triton kernel compiled for the H100 (sm_90), and the attention backward for the A100 (sm_80), on
the CPU with the ptxas that ships with Triton.

The interpreter runs of tests/ops check the numbers but none of the GPU compile rules (tl.dot tile sizes,
shared memory, registers, layouts). `fastprompt.kernels.aot_compile` runs the real launchers on fake CUDA
tensors and compiles each launch exactly as a GPU would (block sizes, warps and stages from the launchers'
config functions). It runs in a subprocess: under TRITON_INTERPRET=1, which tests/conftest.py sets,
`@triton.jit` builds interpreter objects that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastprompt.kernels import aot_compile

pytestmark = pytest.mark.skipif(aot_compile.ptxas_missing() is not None,
                                reason=str(aot_compile.ptxas_missing()))


def _compile(archs, sweep: bool, only: str = "") -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastprompt.kernels.aot_compile", "--json", "--workers", "2", "--only", only,
           "--arch", *map(str, archs)] + (["--sweep"] if sweep else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode in (0, 1), done.stderr[-4000:]  # 1: some row has a problem, judged below
    return json.loads(done.stdout)


def _limit_failures(rows) -> list[str]:
    """Compile errors, shared memory over the arch's limit, grids over CUDA's limits: each a launch that
    would fail on the GPU."""
    return [f"sm_{r['arch']} {r['case']} {r['kernel']}: {p}" for r in rows for p in aot_compile.problems(r)
            if "spills" not in p]


@pytest.fixture(scope="module")
def sm90_rows():
    return _compile([90], sweep=False)


def test_every_kernel_compiles_for_sm90(sm90_rows):
    kernels = {r["kernel"] for r in sm90_rows}
    # every @triton.jit kernel with a launcher is exercised by the quick cases
    assert kernels == {"_fwd_kernel", "_combine_kernel", "_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel",
                       "_reduce_prefix_kernel", "_lce_chunk_kernel", "_embed_fwd_kernel",
                       "_prompt_grad_kernel", "_norm_fwd_kernel", "_norm_bwd_kernel", "_act_fwd_kernel",
                       "_act_bwd_kernel"}
    assert not _limit_failures(sm90_rows), "\n".join(_limit_failures(sm90_rows))
    assert all(r["regs"] for r in sm90_rows), "ptxas -v reported no register count"


def _spilled(rows) -> list[str]:
    return [f"sm_{r['arch']} {r['case']} {r['kernel']}: {r['spills']} B" for r in rows if r["spills"]]


def test_no_register_spills(sm90_rows):
    """The bf16 paths keep everything in registers on sm_90, with a score bias too (its offsets are int32
    within a batch row, and the forward at D > 64 takes 16-key tiles)."""
    assert not _spilled(sm90_rows), "\n".join(_spilled(sm90_rows))


def test_no_register_spills_sm80_backward_with_bias():
    """On sm_80 (mma.sync, no wgmma) the bf16 D=64 backward with a bias once spilled 33 KB (ptxas fell back
    to 32 registers at 64 x 64 tiles); the launchers now pick sm_80 tiles from the device's capability."""
    rows = _compile([80], sweep=True, only="prefix_attention train bf16 D=64 causal=1 mask=1 bias=1")
    assert {"_bwd_dkdv_kernel", "_bwd_dq_kernel"} <= {r["kernel"] for r in rows}
    assert not _limit_failures(rows), "\n".join(_limit_failures(rows))
    assert not _spilled(rows), "\n".join(_spilled(rows))


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80], ids=["sm_90", "sm_80"])
def test_sweep_compiles_within_limits(arch):
    """Every dtype, head dim (32/64/80/96/128) and feature combination: compiles, fits shared memory."""
    rows = _compile([arch], sweep=True)
    assert not _limit_failures(rows), "\n".join(_limit_failures(rows))
