"""Choose, per call, between a Triton kernel and the PyTorch reference.

`backend` (an argument of every public op) wins; else the environment variable `FASTPROMPT_BACKEND`
(`triton` | `torch` | `auto`); else `auto`, which takes the Triton kernel for CUDA tensors and the reference
otherwise. Forcing `triton` on CPU tensors runs the kernel through Triton's interpreter, which needs
`TRITON_INTERPRET=1` set before the first import of Triton (the test suite's conftest does this).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Return "triton" or "torch" for a call on `tensors`."""
    choice = backend if backend is not None else os.environ.get("FASTPROMPT_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if all(t.is_cuda for t in tensors) else "torch"
    if choice == "triton" and not all(t.is_cuda for t in tensors):
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before importing fastprompt, or pass backend='torch'"
            )
    return choice
