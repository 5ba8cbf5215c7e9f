"""What a training step keeps for its backward: the bytes of the tensors autograd saves.

    report = saved_bytes(lambda: model(ids, attention_mask=mask, labels=labels).loss.backward(),
                         exclude=model.parameters())
    print(report)            # tensors, bytes (unique storages), activations (storages not in `exclude`)

The step runs under `torch.autograd.graph.saved_tensors_hooks`; every tensor saved for a backward during
it is recorded (a saved parameter is recorded too: pass the parameters as `exclude` to count what the step
adds beyond them). Storages are deduplicated by address, so a tensor saved by several nodes, or several
views of one buffer, count once.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Callable, Iterable

import torch


@dataclasses.dataclass
class SavedTensors:
    n_tensors: int                  # tensors packed (with repeats)
    bytes: int                      # unique storages, in bytes
    activation_bytes: int           # unique storages not in `exclude`
    excluded_bytes: int             # unique storages in `exclude` (e.g. frozen weights, alive anyway)
    by_dtype: dict                  # str(dtype) -> activation bytes
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


def saved_bytes(step_fn: Callable[[], object], *, exclude: Iterable[torch.Tensor] = ()) -> SavedTensors:
    """Run `step_fn` (forward and backward of one step) and report the tensors autograd saved in it.

    exclude: tensors (typically the model's parameters) whose storages are reported apart from the
    activations. Returns a SavedTensors; its `result` is step_fn's return value.
    """
    excluded = {key for key in (_storage_key(t) for t in exclude) if key is not None}
    seen: dict[tuple[int, int], tuple[tuple, torch.dtype]] = {}
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        key = _storage_key(t)
        if key is not None and key not in seen:
            seen[key] = (tuple(t.shape), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = step_fn()

    by_dtype: dict[str, int] = defaultdict(int)
    largest = []
    activation = excluded_total = 0
    for (ptr, nbytes), (shape, dtype) in seen.items():
        if (ptr, nbytes) in excluded:
            excluded_total += nbytes
            continue
        activation += nbytes
        by_dtype[str(dtype)] += nbytes
        largest.append((nbytes, shape, str(dtype)))
    largest.sort(reverse=True)
    return SavedTensors(n_tensors=count, bytes=activation + excluded_total, activation_bytes=activation,
                        excluded_bytes=excluded_total, by_dtype=dict(by_dtype), largest=largest[:5],
                        result=result)
