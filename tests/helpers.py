"""Shared test utilities: device choice, per-dtype tolerances, NaN-filled allocation, one assert helper."""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# ‖out − ref‖ / ‖ref‖ against an fp32 reference (ARCHITECTURE.md, "Tolerances").
RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def nan_like(shape, dtype, device=DEVICE) -> torch.Tensor:
    """An allocation filled with NaN, so an element a kernel never writes fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Fail with the tensor's name, max abs and relative error and the first mismatching index."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert torch.isfinite(a).all() == torch.isfinite(e).all(), (
        f"{name}: non-finite values at {torch.nonzero(~torch.isfinite(a))[:5].tolist()}")
    diff = (a - e).abs()
    denom = e.norm().clamp_min(1e-12)
    rel = float((a - e).norm() / denom)
    if rel > rtol:
        worst = diff.flatten().argmax()
        index = tuple(int(i) for i in torch.unravel_index(worst, diff.shape))
        first = torch.nonzero(diff > rtol * e.abs().clamp_min(1.0))[:1].tolist()
        raise AssertionError(f"{name}: relative error {rel:.3e} > {rtol:.1e}; max abs {float(diff.max()):.3e} "
                             f"at {index} ({float(a[index]):.6g} vs {float(e[index]):.6g}); "
                             f"first mismatch at {first}")
