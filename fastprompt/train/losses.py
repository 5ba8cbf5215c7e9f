"""Distillation losses of MPT's source training (Wang et al. 2023), as sums the trainer normalises.

Both return sums (not means) so that the trainer can divide by counts over a whole step, across
micro-batches and ranks (see `fastprompt.train.trainer`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """τ² · Σ_n KL(softmax(teacher_n / τ) ‖ softmax(student_n / τ)): the KL divergence from the teacher's
    to the student's output distribution, summed over the N rows.

    student_logits, teacher_logits: [N, V], any float dtype (computed in fp32). Returns a 0-dim fp32
    tensor. The τ² factor (Hinton et al.) keeps the gradient's scale independent of τ.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"student_logits and teacher_logits must both be [N, V], got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum") * temperature ** 2


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over the tokens where `mask` is true and over the features of (student − teacher)²: the squared
    error between teacher and student hidden states (divide by tokens × d for the mean squared error).

    student_hidden, teacher_hidden: [B, T, d], any float dtype (computed in fp32); mask: [B, T] (bool or
    0/1). Returns a 0-dim fp32 tensor.
    """
    if student_hidden.shape != teacher_hidden.shape or student_hidden.dim() != 3:
        raise ValueError(f"student_hidden and teacher_hidden must both be [B, T, d], got "
                         f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}")
    if tuple(mask.shape) != tuple(student_hidden.shape[:2]):
        raise ValueError(f"mask must be [B, T] = {tuple(student_hidden.shape[:2])}, got {tuple(mask.shape)}")
    keep = mask.bool()
    return (student_hidden[keep].float() - teacher_hidden[keep].float()).pow(2).sum()
