"""What a training step keeps for its backward: the bytes of the tensors autograd saves.

    report = saved_bytes(lambda: model(ids, attention_mask=mask, labels=labels).loss.backward(),
                         exclude=model.parameters())
    print(report)            # tensors, bytes (unique storages), activations (storages not in `exclude`)

The step runs under `torch.autograd.graph.saved_tensors_hooks`; every tensor saved for a backward during
it is recorded (a saved parameter is recorded too: pass the parameters as `exclude` to count what the step
adds beyond them). Storages are deduplicated by address, so a tensor saved by several nodes, or several
views of one buffer, count once. Given the decoder `layers`, the bytes are also attributed to the layer
whose forward saved them (`by_layer`); a layer's input hidden states count as kept by it, which is what
activation checkpointing keeps instead of the layer's saved tensors.

    violations = graph_violations(loss, frozen=base_model.parameters())

walks a loss's autograd graph before its backward and names every node that would give a frozen weight a
gradient, or that saved an activation only a weight gradient would use.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import torch


@dataclasses.dataclass
class SavedTensors:
    n_tensors: int                  # tensors packed (with repeats)
    bytes: int                      # unique storages, in bytes
    activation_bytes: int           # unique storages not in `exclude`
    excluded_bytes: int             # unique storages in `exclude` (e.g. frozen weights, alive anyway)
    by_dtype: dict                  # str(dtype) -> activation bytes
    by_layer: dict                  # layer index (None: outside the given layers) -> activation bytes
    largest: list                   # [(bytes, shape, dtype)] of the 5 largest activation storages
    result: object = None           # what step_fn returned

    def __str__(self) -> str:
        mib = 2**20
        return (f"{self.n_tensors} saved tensors, {self.bytes / mib:.3f} MiB in unique storages, of which "
                f"{self.activation_bytes / mib:.3f} MiB activations and {self.excluded_bytes / mib:.3f} MiB "
                f"excluded; by dtype {dict((k, round(v / mib, 3)) for k, v in self.by_dtype.items())}")


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):        # sparse, meta, or tensor subclasses without storage
        return None


def saved_bytes(step_fn: Callable[[], object], *, exclude: Iterable[torch.Tensor] = (),
                layers: Sequence[torch.nn.Module] = ()) -> SavedTensors:
    """Run `step_fn` (forward and backward of one step) and report the tensors autograd saved in it.

    exclude: tensors (typically the model's parameters) whose storages are reported apart from the
    activations. layers: modules (the decoder layers) to attribute activation bytes to, in `by_layer`
    (key: layer index, None for everything outside them). Returns a SavedTensors; its `result` is
    step_fn's return value.
    """
    excluded = {key for key in (_storage_key(t) for t in exclude) if key is not None}
    seen: dict[tuple[int, int], tuple[tuple, torch.dtype, int | None]] = {}
    count = 0
    current: list[int | None] = [None]  # the layer whose forward is running

    def record(t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key is not None and key not in seen:
            seen[key] = (tuple(t.shape), t.dtype, current[0])

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        record(t)
        return t

    def enter(index, module, args, kwargs):
        current[0] = index
        hidden = args[0] if args else kwargs.get("hidden_states")
        if torch.is_grad_enabled() and isinstance(hidden, torch.Tensor):
            record(hidden)

    def leave(module, args, output):
        current[0] = None

    handles = [h for i, layer in enumerate(layers)
               for h in (layer.register_forward_pre_hook(functools.partial(enter, i), with_kwargs=True),
                         layer.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = step_fn()
    finally:
        for handle in handles:
            handle.remove()

    by_dtype: dict[str, int] = defaultdict(int)
    by_layer: dict[int | None, int] = defaultdict(int)
    largest = []
    activation = excluded_total = 0
    for (ptr, nbytes), (shape, dtype, layer) in seen.items():
        if (ptr, nbytes) in excluded:
            excluded_total += nbytes
            continue
        activation += nbytes
        by_dtype[str(dtype)] += nbytes
        by_layer[layer] += nbytes
        largest.append((nbytes, shape, str(dtype)))
    largest.sort(reverse=True)
    return SavedTensors(n_tensors=count, bytes=activation + excluded_total, activation_bytes=activation,
                        excluded_bytes=excluded_total, by_dtype=dict(by_dtype), by_layer=dict(by_layer),
                        largest=largest[:5], result=result)


# Matmul-like nodes: saved attribute -> the input (index in next_functions) whose gradient needs it. When
# that input needs no gradient (a frozen weight: next_functions entry None) the tensor is kept for nothing.
_SAVED_FOR_INPUT = {
    "MmBackward0": {"_saved_self": 1, "_saved_mat2": 0},
    "BmmBackward0": {"_saved_self": 1, "_saved_mat2": 0},
    "AddmmBackward0": {"_saved_mat1": 2, "_saved_mat2": 1},
    "MulBackward0": {"_saved_self": 1, "_saved_other": 0},
    "LinearBackward0": {"_saved_input": 1, "_saved_weight": 0},
}


def graph_violations(loss: torch.Tensor, frozen: Iterable[torch.Tensor]) -> list[str]:
    """Walk `loss`'s autograd graph (before its backward) and describe each violation of a frozen backbone:
    a gradient accumulated into a tensor of `frozen`, or a matmul-like node that saved an activation only
    the gradient of an input needing none would use. Returns [] when the graph is clean."""
    frozen_ids = {id(t) for t in frozen}
    violations, stack, visited = [], [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        name = type(node).__name__
        if name == "AccumulateGrad" and id(node.variable) in frozen_ids:
            violations.append(f"frozen tensor {tuple(node.variable.shape)} receives a gradient")
        for attr, needed_by in _SAVED_FOR_INPUT.get(name, {}).items():
            saved = getattr(node, attr, None)
            if isinstance(saved, torch.Tensor) and node.next_functions[needed_by][0] is None:
                violations.append(f"{name} keeps {attr} {tuple(saved.shape)} for an input that needs no gradient")
        stack.extend(fn for fn, _ in node.next_functions)
    return violations
