"""Kernels as torch.library custom ops, with an eager fast path; a profiler range per public op call.

`autograd_op` registers an implementation as a custom op with its fake (meta) function and its autograd
(`setup` saves what the backward needs, `backward` returns one gradient per input), so that
torch.compile(fullgraph=True) traces a call as one opaque node with a known backward. `plain_op` does the
same for an op with no autograd of its own (a backward).

Both return a callable that runs the custom op while torch.compile traces, and in eager mode the same
implementation, setup and backward through a plain torch.autograd.Function (or the bare implementation).
Why: the custom op's dispatch (schema binding, the dispatcher, the generated autograd wrapper) costs
about 15-30 us more host time per call than an autograd.Function on the CPU (measured with the tiny norms),
which is what issue 17's host-bound step cannot afford. One definition serves both: the same functions
run either way, and tests/ops/test_compile.py checks the compiled path against the eager one.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.autograd.function import once_differentiable


FUNCTIONS: list[type] = []  # the eager autograd.Functions of every autograd_op (tests/ops/host_path.py)


def public_op(fn: Callable) -> Callable:
    """`fn` under a profiler range named "fastprompt.ops.<name>" while torch.profiler records (the host
    budget test reads it), at the cost of one flag read otherwise; nothing while torch.compile traces."""
    name = f"fastprompt.ops.{fn.__name__}"

    @functools.wraps(fn)
    def op(*args, **kwargs):
        if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():
            return fn(*args, **kwargs)
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)

    return op


def plain_op(name: str, impl: Callable, *, fake: Callable) -> Callable:
    """`impl` as custom op `name` (no autograd, no mutation); the callable runs the op while compiling,
    `impl` otherwise."""
    op = torch.library.custom_op(name, impl, mutates_args=())
    op.register_fake(fake)

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else impl(*args)

    call.op = op
    return call


def autograd_op(name: str, impl: Callable, *, fake: Callable, setup: Callable, backward: Callable) -> Callable:
    """`impl` as custom op `name` with autograd; the callable runs the op while compiling and an
    autograd.Function over the same impl / setup(ctx, inputs, output) / backward(ctx, *grads) otherwise.
    Gradients of outputs nobody used arrive as None (not materialised as zeros), either way."""
    op = torch.library.custom_op(name, impl, mutates_args=())
    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup)

    def forward(ctx, *args):
        ctx.set_materialize_grads(False)
        output = impl(*args)
        setup(ctx, args, output)
        return output

    # named at creation (e.g. NormFunction): autograd names the backward node after it (NormFunctionBackward)
    Function = type(name.split("::")[1].title().replace("_", "") + "Function", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(once_differentiable(backward))})

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else Function.apply(*args)

    call.op, call.Function = op, Function
    FUNCTIONS.append(Function)
    return call
