"""The optimizer of a training run and its learning-rate schedule."""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "adafactor")


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate for the update after `step` updates (transformers' schedules:
    `get_{constant,linear,cosine}_schedule_with_warmup` give the same values)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def adamw_for_graphs(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW whose step a CUDA graph can hold (`CudaGraphStep`): its learning rate a tensor on the
    parameters' device, which the step reads when it runs (set it with `lr_tensor.fill_(value)`), and its
    state on that device (capturable). Off CUDA, where no graph runs, the same update by the single-tensor
    path (the one that takes a tensor learning rate there)."""
    params = list(params)
    device = params[0].device
    on_cuda = device.type == "cuda"
    return torch.optim.AdamW(params, lr=torch.tensor(float(lr), device=device), weight_decay=weight_decay,
                             capturable=on_cuda, foreach=on_cuda)


def make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, *,
                   for_graphs: bool = False) -> torch.optim.Optimizer:
    """AdamW, or Adafactor with an external learning rate (no relative step, no parameter scaling).
    for_graphs: AdamW made for `CudaGraphStep` (`adamw_for_graphs`)."""
    params = list(params)
    if name == "adamw":
        if for_graphs:
            return adamw_for_graphs(params, lr, weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
