"""The host path of the ops' eager CUDA calls, traced without a GPU (issue 17: the step is host-bound).

Each case runs a public op (forward, and its backward) the way a Llama-3.2-1B training step calls it, on
fake CUDA tensors (torch's FakeTensorMode: shapes, dtypes, strides, no storage), with every Triton launch
intercepted (recorded, not run; as `fastprompt.kernels.aot_compile` does) and every aten op recorded by a
dispatch mode. Autograd cannot record CUDA tensors in a CPU-only torch build, so the ops' autograd.Functions
(`fastprompt.ops._registry.FUNCTIONS`) run without it: `apply` calls `forward` under no_grad with a stub
context, and the backward pass is the Function's `backward` called on that context (what the autograd
engine would run, less the engine's own bookkeeping). A trace says how many kernels a call launches (Triton kernels plus the aten ops that launch
one on CUDA: everything but allocations, views and metadata) and what else it runs.

Timing: `python -m tests.ops.host_path` also times each call (median wall time, launches stubbed). The fake
tensors' own dispatch costs far more per aten op than CUDA's, and the Triton launch itself is not run, so
the times rank the host paths against each other and against earlier versions of them; they are not the
GPU machine's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
from typing import Callable
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from bench.step_launches import NO_LAUNCH  # aten ops that launch nothing on CUDA
import fastprompt.ops as ops
from fastprompt.kernels import linear_cross_entropy, norms, prompt_embed  # noqa: F401 (imported before
from fastprompt.kernels import prefix_attention as PA                      # TRITON_INTERPRET is patched)
from fastprompt.ops._registry import FUNCTIONS

ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


@dataclasses.dataclass
class Trace:
    """What one call ran: Triton kernels launched (names, in order) and aten ops (names, in order)."""
    kernels: list = dataclasses.field(default_factory=list)
    aten: list = dataclasses.field(default_factory=list)

    @property
    def aten_launches(self) -> list:
        return [name for name in self.aten if name not in NO_LAUNCH]

    @property
    def launches(self) -> int:
        return len(self.kernels) + len(self.aten_launches)

    @property
    def allocations(self) -> int:
        return sum(name in ALLOCATIONS for name in self.aten)


class _Record(TorchDispatchMode):
    """Records each aten op into the innermost active Trace. An op that fake CUDA tensors cannot run in a
    CPU-only torch build (copies need a CUDA device guard) runs on meta tensors of the same layout instead,
    its outputs made fake CUDA tensors of the layout it gives (an in-place op returns its own argument)."""

    def __init__(self, current: list):
        super().__init__()
        self.current = current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.current:
            self.current[-1].aten.append(func.overloadpacket.__name__)
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:
            if "not linked with support for cuda" not in str(e):
                raise
        originals = {}

        def to_meta(x):
            if isinstance(x, torch.Tensor) and x.device.type == "cuda":
                m = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
                originals[id(m)] = x
                return m
            return x

        def to_cuda(x):
            if isinstance(x, torch.Tensor) and x.device.type == "meta":
                if id(x) in originals:
                    return originals[id(x)]
                return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="cuda")
            return x

        meta_args = torch.utils._pytree.tree_map(to_meta, (args, kwargs))
        out = func(*meta_args[0], **meta_args[1])
        return torch.utils._pytree.tree_map(to_cuda, out)


class _Ctx:
    """What the ops' forward and backward use of an autograd context; every tensor input needs a gradient."""

    def __init__(self, args):
        self.needs_input_grad = tuple(isinstance(a, torch.Tensor) for a in args)

    def set_materialize_grads(self, value):
        pass

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass


def _stub_apply(Function, pending):
    def apply(*args):
        ctx = _Ctx(args)
        with torch.no_grad():
            out = Function.forward(ctx, *args)
        pending.append((Function, ctx, out))
        return out
    return apply


@contextlib.contextmanager
def fake_cuda():
    """Fake CUDA tensors, Triton launches stubbed (the launchers see an sm_90 GPU with 132 SMs), and the
    launchers' GPU configs (TRITON_INTERPRET read as off). Yields a function `record(trace)`: a context
    that records into `trace` the launches and aten ops made inside it, and a list that the Functions'
    forwards append (Function, ctx, output) to (`backward` runs the last one's backward)."""
    kernel_class = type(PA._fwd_kernel)
    current: list[Trace] = []
    pending: list = []

    def run(self, *args, grid, warmup, **kwargs):
        if current:
            current[-1].kernels.append(self.fn.__name__)

    @contextlib.contextmanager
    def record(trace: Trace):
        current.append(trace)
        try:
            yield trace
        finally:
            current.pop()

    with mock.patch.object(kernel_class, "run", run), mock.patch.object(PA, "_sm_count", lambda index: 132), \
            mock.patch.object(PA, "_arch", lambda index: 90), \
            mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}), contextlib.ExitStack() as stack, \
            FakeTensorMode(allow_non_fake_inputs=True):
        stack.enter_context(mock.patch.object(torch.Tensor, "contiguous", _contiguous))
        stack.enter_context(mock.patch.object(torch.Tensor, "__getitem__", _getitem))
        for Function in FUNCTIONS:
            stack.enter_context(mock.patch.object(Function, "apply", _stub_apply(Function, pending)))
        with _Record(current):
            yield record, pending


def _contiguous(self, memory_format=torch.contiguous_format):
    """Tensor.contiguous as its C++ binding runs it (self when already contiguous, else a clone), minus the
    binding's CUDA device guard, which a CPU-only torch build refuses for fake CUDA tensors."""
    if self.is_contiguous(memory_format=memory_format):
        return self
    return torch.ops.aten.clone.default(self, memory_format=memory_format)


_GETITEM = torch.Tensor.__getitem__


def _getitem(self, index):
    """Tensor.__getitem__, whose binding also takes a CUDA device guard: basic slices of leading dimensions
    become aten slices when the binding refuses."""
    try:
        return _GETITEM(self, index)
    except RuntimeError as e:
        if "not linked with support for cuda" not in str(e):
            raise
    out = self
    for dim, part in enumerate(index if isinstance(index, tuple) else (index,)):
        if not isinstance(part, slice) or part.step not in (None, 1):
            raise NotImplementedError(f"host_path: index {index!r} on a fake CUDA tensor")
        start, stop, _ = part.indices(self.shape[dim])
        out = torch.ops.aten.slice.Tensor(out, dim, start, stop)
    return out


def backward(pending, grad_of):
    """The backward of the last Function applied: its gradients, given the output gradient `grad_of(out)`
    of its first output (None for the others)."""
    Function, ctx, out = pending.pop()
    outs = out if isinstance(out, (tuple, list)) else (out,)
    grad = grad_of(outs[0])
    return lambda: Function.backward(ctx, grad, *[None] * (len(outs) - 1))


# ----------------------------------------------------------------------------------------------------------
# cases: Llama-3.2-1B in bf16 (hidden 2048, 32 query heads, 8 key/value heads of 64, MLP 8192, vocabulary
# 128256), B8 T512, a 100-token prompt, the shared-prefix path (the batch's one prompt as the bank)
# ----------------------------------------------------------------------------------------------------------
B, T, P, HQ, HKV, D, HIDDEN, MLP, VOCAB = 8, 512, 100, 32, 8, 64, 2048, 8192, 128256
BF16 = torch.bfloat16


def _cuda(*shape, dtype=BF16, grad=False):
    return torch.empty(shape, dtype=dtype, device="cuda", requires_grad=grad)


def _prefix_attention_inputs():
    """As fastprompt/backbones/attention.py's packed mode passes them: views of one packed projection
    [1, H, P + B * T, D] (made as strided tensors of their own: no view under autograd here)."""
    def parts(h):
        t = torch.empty(1, h, P + B * T, D, dtype=BF16, device="cuda")
        prompt, row = t.squeeze(0).split([P, B * T], dim=1)
        prompt, row = prompt.unflatten(1, (1, P)).transpose(0, 1), row.unflatten(1, (B, T)).transpose(0, 1)
        return tuple(torch.empty_strided(x.shape, x.stride(), dtype=BF16, device="cuda").requires_grad_()
                     for x in (prompt, row))

    (_, q), (pk, k), (pv, v) = parts(HQ), parts(HKV), parts(HKV)
    bank_rows = torch.zeros(B, dtype=torch.int64, device="cuda")
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    return q, k, v, pk, pv, bank_rows, mask


def _grad_like(out):
    """The output gradient as the packed layout's backward hands it over: a transposed view."""
    return torch.empty(out.shape[0], out.shape[2], out.shape[1], out.shape[3], dtype=out.dtype,
                       device="cuda").transpose(1, 2)


def prefix_attention_case():
    q, k, v, pk, pv, bank_rows, mask = _prefix_attention_inputs()
    return (lambda: ops.prefix_attention(q, k, v, pk, pv, bank_rows, key_padding_mask=mask, scale=D ** -0.5)), \
        _grad_like


def rms_norm_case():
    x, w = _cuda(B, T, HIDDEN), _cuda(HIDDEN)
    return (lambda: ops.rms_norm(x, w, 1e-5)), lambda y: torch.empty_like(y)


def swiglu_case():
    gate, up = _cuda(B, T, MLP), _cuda(B, T, MLP)
    return (lambda: ops.swiglu(gate, up)), lambda y: torch.empty_like(y)


def linear_cross_entropy_case():
    hidden, weight = _cuda(B, T, HIDDEN, grad=True), _cuda(VOCAB, HIDDEN)
    labels = torch.zeros(B, T, dtype=torch.int64, device="cuda")
    return (lambda: ops.linear_cross_entropy(hidden, weight, labels)), \
        lambda y: torch.ones((), dtype=torch.float32, device="cuda")


def prompt_embed_case():
    ids, emb = torch.zeros(B, T, dtype=torch.int64, device="cuda"), _cuda(VOCAB, HIDDEN)
    prompts = _cuda(1, P, HIDDEN, dtype=torch.float32, grad=True)
    task_ids = torch.zeros(B, dtype=torch.int64, device="cuda")
    return (lambda: ops.prompt_embed(ids, emb, prompts, task_ids)), lambda y: torch.empty_like(y)


CASES: dict[str, Callable] = {"prefix_attention": prefix_attention_case, "rms_norm": rms_norm_case,
                              "swiglu": swiglu_case, "linear_cross_entropy": linear_cross_entropy_case,
                              "prompt_embed": prompt_embed_case}


def trace(name: str, repeats: int = 0) -> tuple[Trace, Trace, float, float]:
    """(forward trace, backward trace, forward us, backward us) of one case's third call (caches warm);
    the times are medians over `repeats` more calls (0: not timed)."""
    with fake_cuda() as (record, pending):
        forward, grad_of = CASES[name]()
        for _ in range(2):
            forward()
            backward(pending, grad_of)()
        fwd, bwd = Trace(), Trace()
        with record(fwd):
            forward()
        run_backward = backward(pending, grad_of)
        with record(bwd):
            run_backward()
        fwd_times, bwd_times = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            forward()
            fwd_times.append(time.perf_counter() - start)
            run_backward = backward(pending, grad_of)
            start = time.perf_counter()
            run_backward()
            bwd_times.append(time.perf_counter() - start)
    us = (lambda ts: statistics.median(ts) * 1e6 if ts else 0.0)
    return fwd, bwd, us(fwd_times), us(bwd_times)


def main() -> None:
    torch.set_num_threads(1)
    print("| op | pass | launches (Triton + aten) | allocations | host us (fake CUDA) | aten ops |")
    print("|---|---|---|---|---|---|")
    for name in CASES:
        fwd, bwd, fwd_us, bwd_us = trace(name, repeats=200)
        for pass_, t, us in (("fwd", fwd, fwd_us), ("bwd", bwd, bwd_us)):
            print(f"| {name} | {pass_} | {t.launches} ({len(t.kernels)} + {len(t.aten_launches)}) | {t.allocations} "
                  f"| {us:.0f} | {' '.join(t.aten)} ; kernels: {' '.join(t.kernels)} |")


if __name__ == "__main__":
    main()
