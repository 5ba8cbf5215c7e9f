"""Model FLOPs of a soft-prompt training step on a frozen backbone, and model FLOPs utilisation (MFU).

A frozen backbone needs its forward and the *input* gradients in the backward (no weight gradients):
- every matmul of the forward once more (dX = dY · Wᵀ, same FLOPs as Y = X · W);
- attention twice more (dQ, dK, dV and dP: four matmuls against the forward's two), since the keys and
  values depend on the input.
Counted for the work the method needs, not for what an implementation does: the rows' B·T tokens, each
attending to its prefix and causally to its own tokens, plus, for virtual-token methods, one prompt pass
over each distinct task's P virtual tokens (recomputing the prompt for every row, as concatenation does,
is an implementation's extra work, not model FLOPs). The LM head counts for the B·T row tokens. The
adapters' own FLOPs (prompt encoders, LoRA's rank-16 matrices and their weight gradients) are left out:
well under 1% here. MFU = model FLOPs per step / step time / the device's peak, where the peak is
measured (`measured_peak_flops`: a large square matmul in the run's dtype, timed once per run), and a
second MFU is taken against the datasheet peak where one is known (`peak_flops`: H100, H200, A100).
"""

from __future__ import annotations

import torch

from bench.harness import time_ms

# Square matmul sizes for the measured peak: large enough to reach a GPU's tensor-core rate; on a CPU
# (--quick, tests) small enough to take well under a second, yet past the size where BLAS peaks.
PEAK_MATMUL_N = {"cuda": 8192, "cpu": 512}

# Dense peaks in FLOP/s from NVIDIA's datasheets (no sparsity). fp32 is the CUDA-core rate: PyTorch's
# default matmul precision keeps fp32 matmuls off TF32. Matched in order against torch's device name.
PEAK_FLOPS = (
    ("H200 NVL", {torch.bfloat16: 835.5e12, torch.float16: 835.5e12, torch.float32: 60.0e12}),
    ("H200", {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12}),
    ("H100 PCIe", {torch.bfloat16: 756.5e12, torch.float16: 756.5e12, torch.float32: 51.2e12}),
    ("H100 NVL", {torch.bfloat16: 835.5e12, torch.float16: 835.5e12, torch.float32: 60.0e12}),
    ("H100", {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12}),   # SXM
    ("A100", {torch.bfloat16: 312.0e12, torch.float16: 312.0e12, torch.float32: 19.5e12}),
)


def peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s for matmuls in `dtype`, or None where unknown (CPUs, other GPUs)."""
    for pattern, peaks in PEAK_FLOPS:
        if pattern in device_name:
            return peaks.get(dtype)
    return None


def measured_peak_flops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """FLOP/s of an [n, n] @ [n, n] matmul of random `dtype` tensors on `device` (2·n³ FLOPs over the
    median time; n from PEAK_MATMUL_N by device type unless given): the peak this device reaches here
    and now, with this torch, in this dtype. Raises ValueError for n < 1."""
    n = PEAK_MATMUL_N.get(device.type, PEAK_MATMUL_N["cpu"]) if n is None else n
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
    ms = time_ms(lambda: a @ b, device, warmup=2, reps=5)["ms"]
    return 2 * n**3 / (ms / 1e3)


def layer_matmul_params(shape: dict) -> int:
    """Weights multiplied per token in one decoder layer: attention projections and the MLP.
    `shape` as from bench.models.model_shape."""
    d, q_width, kv_width = shape["hidden"], shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    attention = d * q_width + 2 * d * kv_width + q_width * d
    mlp = (3 if shape["gated_mlp"] else 2) * d * shape["intermediate"]
    return attention + mlp


def forward_flops(shape: dict, *, tokens: int, attended_pairs: int, logit_tokens: int) -> int:
    """Forward FLOPs: `tokens` through every layer's matmuls, `attended_pairs` (query, key) pairs per
    layer (QKᵀ and PV), and the LM head for `logit_tokens` tokens. Norms, activations and softmax are
    left out (a few FLOPs per element, against thousands per token in the matmuls)."""
    per_layer = 2 * layer_matmul_params(shape) * tokens + 4 * shape["heads"] * shape["head_dim"] * attended_pairs
    return shape["layers"] * per_layer + 2 * shape["hidden"] * shape["vocab"] * logit_tokens


def causal_pairs(batch: int, seq_len: int, prefix: int) -> int:
    """(query, key) pairs of `batch` rows of `seq_len` tokens, each attending to `prefix` keys and
    causally to its own tokens."""
    return batch * (seq_len * prefix + seq_len * (seq_len + 1) // 2)


def train_step_flops(shape: dict, *, batch: int, seq_len: int, num_virtual: int, prompt_entries: int) -> int:
    """Forward + input-gradient FLOPs of one training step (module docstring).

    num_virtual: the prefix length P every row attends to (0 for LoRA); prompt_entries: distinct prompts
    run through the backbone in the prompt pass (1 for prompt tuning and P-tuning, the number of tasks
    for MPT, 0 for prefix tuning, whose keys/values are parameters, and for LoRA).
    """
    rows = dict(tokens=batch * seq_len, attended_pairs=causal_pairs(batch, seq_len, num_virtual),
                logit_tokens=batch * seq_len)
    prompt = dict(tokens=prompt_entries * num_virtual, attended_pairs=causal_pairs(prompt_entries, num_virtual, 0),
                  logit_tokens=0)
    total = 0
    for part in (rows, prompt):
        matmuls = forward_flops(shape, tokens=part["tokens"], attended_pairs=0, logit_tokens=part["logit_tokens"])
        attention = forward_flops(shape, tokens=0, attended_pairs=part["attended_pairs"], logit_tokens=0)
        total += 2 * matmuls + 3 * attention
    return total


def mfu(flops: float, step_ms: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation: flops / (step_ms / 1000) / peak, or None without a time or a peak."""
    if not step_ms or not peak:
        return None
    return flops / (step_ms / 1e3) / peak
