"""Argument checks shared by the public ops: each raises ValueError naming the argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_rank(name: str, tensor: torch.Tensor, rank: int, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(tensor).__name__}")
    if tensor.dim() != rank:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(tensor.shape)}")


def check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")


def check_index(name: str, ids: torch.Tensor, size: int, what: str) -> None:
    """ids must be integer and lie in [0, size)."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an int64 (or int32) tensor, got {ids.dtype}")
    # The range check reads the values on the host; on CUDA that is a sync per call, so it runs on
    # CPU tensors only (PromptModel validates task ids on the host before anything reaches a kernel).
    if ids.is_cuda:
        return
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
        raise ValueError(f"{name} must lie in [0, {size}) ({what}), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
