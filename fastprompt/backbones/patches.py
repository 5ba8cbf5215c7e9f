"""Instance patches of a frozen backbone, each returned with a handle that undoes it.

- `patch_frozen_ops`: the backbone's norms and MLP activations run through `fastprompt.ops` (rms_norm,
  layer_norm, swiglu, gelu), whose backward computes only the input gradient and keeps only the inputs
  (HF's own modules keep fp32 copies and normalised activations for a weight gradient nobody asks for).
  On the PyTorch path (CPU training, where a step of a small model is nearly all host time) each takes
  torch's native function instead (RMSNorm in fp32 only, where F.rms_norm rounds as LlamaRMSNorm does): the
  same arithmetic under ordinary autograd, at a fraction of the host time of an autograd.Function with a
  Python backward (per forward + backward on one CPU core, below).
- `checkpoint_layers`: each decoder layer recomputes its activations in the backward instead of keeping
  them (`torch.utils.checkpoint`, non-reentrant, so gradients reach the bank through the attention context).

Patches set `forward` on module instances; the classes and every other model are untouched. Undoing
deletes the instance attribute again, so a model patched twice and undone twice is the model it was.
"""

from __future__ import annotations

import functools
import types
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache

from fastprompt import ops
from fastprompt.ops import resolve_backend


class PatchHandle:
    """Undoes the instance patches it holds, newest first; usable as a context manager."""

    def __init__(self, patched: list[tuple[nn.Module, object]]):
        self._patched = patched  # (module, the instance forward it had before, or None)

    def __len__(self) -> int:
        return len(self._patched)

    def undo(self) -> None:
        while self._patched:
            module, previous = self._patched.pop()
            if previous is None:
                del module.forward
            else:
                module.forward = previous

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def patch_forwards(replacements: list[tuple[nn.Module, Callable]]) -> PatchHandle:
    """Bind each (module, fn) as `module.forward`: fn(module, *args, **kwargs).

    Bound methods (not closures), so that `copy.deepcopy` of a patched model patches the copy's modules.
    """
    patched = []
    for module, fn in replacements:
        patched.append((module, module.__dict__.get("forward")))
        module.forward = types.MethodType(fn, module)
    return PatchHandle(patched)


# frozen norms and activations ------------------------------------------------------------------------
def rms_norm_forward(module: nn.Module, hidden_states: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """LlamaRMSNorm-like module (weight [d], variance_epsilon) → ops.rms_norm; on the PyTorch path in fp32
    torch's own rms_norm.

    In fp32 F.rms_norm is LlamaRMSNorm's arithmetic operation by operation (bitwise equal,
    tests/backbones/test_patches.py) and keeps x and one fp32 rstd per row for the backward, as
    ops.rms_norm keeps x: 83 us against 120 us per forward + backward of [4, 36, 64]. In half precision
    its rounding differs from LlamaRMSNorm's (it multiplies by the weight before rounding), so there
    ops.rms_norm runs on every path."""
    weight = module.weight
    if hidden_states.dtype == weight.dtype == torch.float32 and resolve_backend(backend, hidden_states) == "torch":
        return F.rms_norm(hidden_states, weight.shape, weight, module.variance_epsilon)
    return ops.rms_norm(hidden_states, weight, module.variance_epsilon, backend=backend)


def layer_norm_forward(module: nn.LayerNorm, x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """nn.LayerNorm over the last dimension → ops.layer_norm; on the PyTorch path torch's own layer_norm.

    torch's layer_norm keeps what ops.layer_norm keeps for the backward (x, and fp32 mean and rstd of one
    value per row) and computes no gradient for a frozen weight, at a fraction of the host time: 27 us
    against 133 us per forward + backward of [64, 64] on a CPU core (ops.layer_norm is a custom op with
    its own autograd Function and checks)."""
    if resolve_backend(backend, x) == "torch":
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    return ops.layer_norm(x, module.weight, module.bias, module.eps, backend=backend)


def swiglu_mlp_forward(mlp: nn.Module, x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Llama's MLP: down(silu(gate(x)) * up(x)) with ops.swiglu in the middle; on the PyTorch path torch's
    silu and product, which keep silu(gate) besides gate and up (one tensor more than ops.swiglu) at 45 us
    against 120 us per forward + backward of [4, 16, 160] (ops.swiglu's backward is a dozen elementwise ops
    in Python, the kernel's formula)."""
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    if resolve_backend(backend, gate) == "torch":
        return mlp.down_proj(F.silu(gate) * up)
    return mlp.down_proj(ops.swiglu(gate, up, backend=backend))


def gelu_forward(approximate: str) -> Callable:
    """A GELU activation module's forward (tanh or erf form) → ops.gelu."""
    return functools.partial(_gelu, approximate=approximate)


def _gelu(module: nn.Module, x: torch.Tensor, *, approximate: str, backend: str | None = None) -> torch.Tensor:
    # On the PyTorch path torch's own gelu: it keeps only x for the backward, as ops.gelu does, at 52 us
    # against 135 us per forward + backward of [64, 160] on a CPU core.
    if resolve_backend(backend, x) == "torch":
        return F.gelu(x, approximate=approximate)
    return ops.gelu(x, approximate, backend=backend)


def patch_frozen_ops(backbone, backend: str | None = None) -> PatchHandle:
    """Route the backbone's norms and activations through fastprompt.ops (see the module docstring), with
    `backend` ("triton", "torch" or None: per call, by device) as the model's other ops.

    Only modules the backbone adapter recognises are patched (`backbone.frozen_op_replacements()`); a
    family without replacements gets an empty handle.
    """
    return patch_forwards([(module, functools.partial(fn, backend=backend))
                           for module, fn in backbone.frozen_op_replacements()])


# activation checkpointing -----------------------------------------------------------------------------
def checkpoint_layers(backbone) -> PatchHandle:
    """Wrap each decoder layer's forward in non-reentrant activation checkpointing (while grad mode is on
    and no key/value cache is passed: recomputing would write the cache twice).

    The recomputation in the backward runs under the attention implementation that was active in the
    forward (fastprompt's inside PromptModel's calls, whose own switch has exited by then); non-reentrant
    checkpointing lets gradients reach tensors the layer reads from the attention context (the bank).
    """
    forward = functools.partial(_checkpointed_forward, backbone=backbone)
    return patch_forwards([(layer, forward) for layer in backbone.layers])


def _checkpointed_forward(layer: nn.Module, *args, backbone, **kwargs):
    original = type(layer).forward
    # A layer that writes a key/value cache must not run twice: such calls are not checkpointed.
    writes_cache = any(isinstance(a, Cache) for a in (*args, *kwargs.values()))
    if not torch.is_grad_enabled() or writes_cache:
        return original(layer, *args, **kwargs)
    implementation = backbone.config._attn_implementation

    def contexts():
        return nullcontext(), backbone.attention_implementation(implementation)

    return checkpoint(original, layer, *args, use_reentrant=False, context_fn=contexts, **kwargs)
