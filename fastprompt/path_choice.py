"""The forward path a virtual-token batch takes on a causal decoder, and the cost model that picks it.

`PATHS`: "shared_prefix" (each distinct prompt runs once, packed with the rows), "concat" (PEFT's way: the
prompt before every row) and "auto" (the cheaper of the two by `path_costs`). `ForwardPlanner.plan`
applies the choice per batch shape; the forward paths themselves live in `fastprompt/model.py`.

The shared-prefix (packed) pass has two forms of attention (`PACKED_FORMS`, chosen by
`packed_attention_form`, priced inside `path_costs`): "split", two prefix-attention calls a layer (the
prompts among themselves, then the rows reading their prompt's keys/values: the attended pairs only, at the
host cost of the second call and of splitting and rejoining queries, keys, values and outputs), and
"masked", one SDPA call a layer over the whole packed sequence with a block mask built once per forward
(every pair of the sequence computed, masked or not, for no more host time than concat's one call).
"""

from __future__ import annotations

from dataclasses import dataclass

PATHS = ("auto", "shared_prefix", "concat")
PACKED_FORMS = ("split", "masked")


@dataclass(frozen=True)
class PathCostConstants:
    """The two device constants of `path_costs`.

    flops_per_s: the backbone's achieved FLOP/s in a training step. extra_host_s_per_layer: the host time the
    split form of the packed pass adds per decoder layer over the concat pass: a second attention call (the
    prompts' own, causal) and the split/concatenation of queries, keys, values and outputs, forward and
    backward. The masked form adds none: one attention call a layer, as concat.
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
    than "cuda" use the CPU's) plus, for the shared-prefix path in its split form, the host time that form
    adds per layer; the shared prefix is priced in the cheaper of its forms (`packed_form_costs`).
    Arithmetic per layer: 4 FLOPs per token and weight of the layer's matmuls (2 forward, 2 for the input
    gradient) and 12·Hq·D per attended query-key pair (QK^T and PV forward, twice that backward):
    - shared prefix: tokens n·P + B·T; pairs n·P(P+1)/2 (prompts, causal) + B·(T·P + T(T+1)/2) in the split
      form, all (n·P + B·T)^2 pairs of the sequence in the masked form;
    - concat: tokens B·(P+T); pairs B·(P+T)(P+T+1)/2.
    With n < B the shared prefix does fewer token FLOPs, so it wins once the saving outweighs its host time
    (split) or its masked pairs (masked); with n = B (every row its own prompt) concat wins. The costs are
    additive (the host time is not hidden behind the device's): on a CPU a step is serial, and on a GPU the
    packed pass's step is host-bound at these sizes (on an H200 at B8 the host issues it no faster than it
    runs).
    """
    geometry = _Geometry.of(backbone)
    constants = _constants(device_type)
    B, T, P, n = batch, seq_len, num_virtual, n_prompts
    concat = geometry.step_flops(B * (P + T), B * (P + T) * (P + T + 1) // 2) / constants.flops_per_s
    return {"shared_prefix": min(packed_form_costs(backbone, B, T, P, n, device_type).values()), "concat": concat}


def packed_form_costs(backbone, batch: int, seq_len: int, num_virtual: int, n_prompts: int,
                      device_type: str) -> dict[str, float]:
    """Estimated seconds of the shared-prefix step in each form of its attention ({"split": s, "masked": s};
    on CUDA only "split": the masked form's dense [N, N] mask keeps SDPA off its flash kernels and has not
    been measured there), on the scale of `path_costs`."""
    geometry = _Geometry.of(backbone)
    constants = _constants(device_type)
    B, T, P, n = batch, seq_len, num_virtual, n_prompts
    tokens = n * P + B * T
    split = (geometry.step_flops(tokens, n * P * (P + 1) // 2 + B * (T * P + T * (T + 1) // 2)) / constants.flops_per_s
             + geometry.layers * constants.extra_host_s_per_layer)
    if device_type == "cuda":
        return {"split": split}
    return {"split": split, "masked": geometry.step_flops(tokens, tokens * tokens) / constants.flops_per_s}


def packed_attention_form(backbone, batch: int, seq_len: int, num_virtual: int, n_prompts: int,
                          device_type: str) -> str:
    """The cheaper form of the packed pass's attention ("split" or "masked", `packed_form_costs`)."""
    costs = packed_form_costs(backbone, batch, seq_len, num_virtual, n_prompts, device_type)
    return min(costs, key=costs.get)


def _constants(device_type: str) -> PathCostConstants:
    return PATH_COST_CONSTANTS["cuda" if device_type == "cuda" else "cpu"]


@dataclass(frozen=True)
class _Geometry:
    """What the cost model reads of a backbone: its layers, weights per layer and attention width."""

    layers: int
    weights: int        # matmul weights of one layer (attention projections and the MLP)
    attention: int      # Hq·D: FLOPs per attended pair are 12 of these

    @classmethod
    def of(cls, backbone) -> "_Geometry":
        d, D = backbone.hidden_size, backbone.head_dim
        Hq, Hkv = backbone.num_heads, backbone.num_kv_heads
        config = backbone.config
        intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
        mlp_matrices = 3 if hasattr(config, "intermediate_size") else 2  # SwiGLU's gate/up/down, GPT-2's fc/proj
        weights = d * (Hq + 2 * Hkv) * D + Hq * D * d + mlp_matrices * d * intermediate
        return cls(backbone.num_layers, weights, Hq * D)

    def step_flops(self, tokens: int, pairs: int) -> int:
        """Forward + input-gradient backward FLOPs of the decoder stack for `tokens` tokens attending over
        `pairs` query-key pairs a layer."""
        return self.layers * (4 * self.weights * tokens + 12 * self.attention * pairs)
