"""The forward path a virtual-token batch takes on a causal decoder, and the cost model that picks it.

`PATHS`: "shared_prefix" (each distinct prompt runs once, packed with the rows), "concat" (PEFT's way: the
prompt before every row) and "auto" (the cheaper of the two by `path_costs`). `PromptModel._choose_path`
applies the choice per batch shape; the forward paths themselves live in `fastprompt/model.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

PATHS = ("auto", "shared_prefix", "concat")


@dataclass(frozen=True)
class PathCostConstants:
    """The two device constants of `path_costs`.

    flops_per_s: the backbone's achieved FLOP/s in a training step. extra_host_s_per_layer: the host time the
    shared-prefix (packed) pass adds per decoder layer over the concat pass: a second attention call (the
    prompts' own, causal) and the split/concatenation of queries, keys, values and outputs, forward and
    backward.
    """

    flops_per_s: float
    extra_host_s_per_layer: float


PATH_COST_CONSTANTS = {
    # Calibrated on a shared 2-core x86 CPU (fp32, one thread, tiny Llama: hidden 64, 2 layers, B4 T16, one
    # prompt): the shared-prefix step was 1.23-1.36x the concat step at P=5, 1.0-1.04x at P=20, 0.96x at
    # P=50 and 0.70-0.84x at P=100, a crossover near P=20-50 that these constants place at P~35.
    "cpu": PathCostConstants(flops_per_s=40e9, extra_host_s_per_layer=0.6e-3),
    # H200, bf16, Llama-3.2-1B shape, B8, P100 (bench/results/training-nvidia-h200-2026-12-04.json): the
    # concat step ran at MFU 0.37-0.42 of the measured peak; the shared-prefix step was 30.0 ms (T512),
    # 24.1 ms (T128) and 33.6 ms (MPT, 4 tasks, T512) slower than concat although it did 4.5-7.9 ms less
    # arithmetic: 2.0-2.4 ms of host time a layer (the packed pass's attention kernel launches and copies,
    # forward and backward; the step is host-bound: bench/profile_training.py issued it in 85 of its 85 ms).
    "cuda": PathCostConstants(flops_per_s=0.35 * 989e12, extra_host_s_per_layer=2.2e-3),
}


def path_costs(backbone, batch: int, seq_len: int, num_virtual: int, n_prompts: int,
               device_type: str) -> dict[str, float]:
    """Estimated seconds by which each path's training step (forward + input-gradient backward of the frozen
    backbone) differs, for B = batch rows of T = seq_len tokens, P = num_virtual virtual tokens and
    n = n_prompts distinct prompts (tasks) in the batch; {"shared_prefix": s, "concat": s}.

    A path's cost is its arithmetic at the device's achieved FLOP/s (`PATH_COST_CONSTANTS`; devices other
    than "cuda" use the CPU's) plus, for the shared-prefix path, the host time its packed pass adds per layer.
    Arithmetic per layer: 4 FLOPs per token and weight of the layer's matmuls (2 forward, 2 for the input
    gradient) and 12·Hq·D per attended query-key pair (QK^T and PV forward, twice that backward):
    - shared prefix: tokens n·P + B·T; pairs n·P(P+1)/2 (prompts, causal) + B·(T·P + T(T+1)/2);
    - concat: tokens B·(P+T); pairs B·(P+T)(P+T+1)/2.
    With n < B the shared prefix does less of both, so it wins once the saving outweighs its host time; with
    n = B (every row its own prompt) both do the same arithmetic and concat wins. The two costs are additive
    (the host time is not hidden behind the device's): on a CPU a step is serial, and on a GPU the packed
    pass's step is host-bound at these sizes (on an H200 at B8 the host issues it no faster than it runs).
    """
    constants = PATH_COST_CONSTANTS["cuda" if device_type == "cuda" else "cpu"]
    B, T, P, n = batch, seq_len, num_virtual, n_prompts
    d, D = backbone.hidden_size, backbone.head_dim
    Hq, Hkv = backbone.num_heads, backbone.num_kv_heads
    config = backbone.config
    intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d)
    mlp_matrices = 3 if hasattr(config, "intermediate_size") else 2  # SwiGLU's gate/up/down, GPT-2's fc/proj
    weights = d * (Hq + 2 * Hkv) * D + Hq * D * d + mlp_matrices * d * intermediate

    def layer_flops(tokens: int, pairs: int) -> float:
        return 4 * weights * tokens + 12 * Hq * D * pairs

    L = backbone.num_layers
    shared = L * layer_flops(n * P + B * T, n * P * (P + 1) // 2 + B * (T * P + T * (T + 1) // 2))
    concat = L * layer_flops(B * (P + T), B * (P + T) * (P + T + 1) // 2)
    return {"shared_prefix": shared / constants.flops_per_s + L * constants.extra_host_s_per_layer,
            "concat": concat / constants.flops_per_s}
