"""Argument checks of the public ops, run once per call at the op and nowhere else (the kernel launchers
trust their callers): each raises ValueError naming the argument and what it must be.

Host cost. A check of what a tensor's shape, dtype and device decide runs once per new combination: the
ops pass `spec`s (hashable (shape, dtype, device) triples) to a checker wrapped in `cached`, an LRU
cache, so a repeated call costs a dictionary lookup. Checks of values (the range of an index tensor) are
never cached and run on CPU tensors only: on CUDA reading a minimum or maximum is a host sync, so there
the caller vouches for the range (PromptModel validates task ids on the host before they become bank
rows; an out-of-range index reaching a CUDA kernel reads outside the bank). Neither kind runs while
torch.compile traces (`torch.compiler.is_compiling()`): the value check would be a data-dependent graph
break, and the shape check runs uncached there, on the symbolic shapes, once per compiled graph.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)


class Spec(NamedTuple):
    """What a shape check may read of a tensor."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device


def spec(name: str, tensor, layout: str) -> Spec | None:
    """The Spec of `tensor` (None for None); ValueError naming `name` if it is not a tensor."""
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(tensor).__name__}")
    return Spec(tuple(tensor.shape), tensor.dtype, tensor.device)


def cached(check):
    """`check` (a function of Specs and plain values) behind an LRU cache, bypassed while compiling
    (symbolic shapes do not hash). An exception is never cached, so a bad call raises every time."""
    hit = functools.lru_cache(maxsize=1024)(check)

    @functools.wraps(check)
    def run(*args):
        if torch.compiler.is_compiling():
            return check(*args)
        return hit(*args)

    run.cache_clear = hit.cache_clear
    return run


def check_rank(name: str, s: Spec, rank: int, layout: str) -> None:
    if len(s.shape) != rank:
        raise ValueError(f"{name} must have shape {layout}, got {s.shape}")


def check_float(name: str, s: Spec) -> None:
    if s.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {s.dtype}")


def check_index_dtype(name: str, s: Spec) -> None:
    if s.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be an int64 (or int32) tensor, got {s.dtype}")


def check_same_device(**specs: Spec | None) -> None:
    devices = {name: s.device for name, s in specs.items() if s is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def check_index_values(name: str, ids: torch.Tensor, low: int, high: int, what: str) -> None:
    """ids must lie in [low, high). Read on the host: CPU tensors only, and not while compiling (see the
    module docstring)."""
    if ids.is_cuda or ids.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < low or hi >= high:
        raise ValueError(f"{name} must lie in [{low}, {high}) ({what}), got values in [{lo}, {hi}]")
