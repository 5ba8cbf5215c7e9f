"""Data-parallel prompt training on torch.distributed, and FSDP for a backbone too large for one device.

    torchrun --nproc-per-node 4 -m fastprompt train --model DIR --data train.jsonl --out OUT --batch-size 8
    torchrun --nproc-per-node 8 -m fastprompt train ... --fsdp        # shard the frozen decoder layers

Every rank holds the same prompt parameters and the frozen backbone (with ``--fsdp``: a shard of each
decoder layer). A step's global batch, ``batch_size × grad_accum × world_size`` examples chosen by
(seed, step) exactly as in one process, is cut into micro-batches of ``batch_size``; rank r runs
micro-batches r, r + W, r + 2W, ... Each micro-batch's loss is a sum divided by the token count of the
*whole* global batch, so one all-reduce (sum) of the prompt gradients per step gives every rank the
gradient one process computes on the same global batch, and the optimizers stay in step. Only rank 0
writes files and prints; evaluation runs on every rank over the whole evaluation set (so early-stopping
decisions agree without communication, and FSDP ranks run their forwards together).

A prompt encoder with dropout (P-tuning ``encoder_dropout``) draws its masks per micro-batch on each rank,
so such a run equals one process in distribution only; without dropout it equals it up to float summation
order.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run (the default: a single process, every call a no-op)."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, logs and progress."""
        return self.rank == 0

    def shard(self, items: list) -> list[tuple[object, float]]:
        """This rank's micro-batches of a step: ``(item, 1.0)`` for items r, r + W, ...; ranks with fewer
        get ``(items[0], 0.0)`` padding (a forward whose loss is multiplied by 0), so every rank runs the
        same number of forwards and the collectives of an FSDP backbone line up."""
        mine = [(item, 1.0) for item in items[self.rank::self.world_size]]
        per_rank = -(-len(items) // self.world_size)
        return mine + [(items[0], 0.0)] * (per_rank - len(mine))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks, in place; returns it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sync_gradients(self, params: list[nn.Parameter]) -> None:
        """Sum the parameters' gradients over ranks in one flat all-reduce. A parameter this rank did not
        use (its task had no row here) counts as zero and receives the others' sum; one no rank used
        keeps grad None, as in one process (so the optimizer skips it: AdamW would otherwise still move
        it by its momentum)."""
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        used = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
        flat = torch.cat([*(g.reshape(-1).to(used.dtype) for g in grads), used])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, anyone in zip(params, flat[-len(params):].tolist()):
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype) if anyone else None
            offset += p.numel()

    def broadcast_parameters(self, params: list[nn.Parameter]) -> None:
        """Copy rank 0's values into every rank's parameters (one identical starting point)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.enabled:
            dist.barrier()


def from_environment(device: str | None = None) -> tuple[Distributed, torch.device]:
    """The process's `Distributed` and device, from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK).

    Without torchrun (WORLD_SIZE unset or 1): a single process on `device` (default: cuda when available).
    Under torchrun: joins the process group (NCCL on GPUs, gloo on CPUs); rank r uses cuda:LOCAL_RANK
    unless `device` is "cpu". A `device` naming a GPU index is refused: torchrun assigns the GPUs.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu' or 'cuda' under torchrun (rank r uses cuda:LOCAL_RANK), "
                         f"got {device!r}")
    use_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if use_cuda:
        chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size()), chosen


@contextmanager
def session(device: str | None = None):
    """`from_environment` as a context: yields (Distributed, device) and leaves the process group it
    joined on exit."""
    joined = not dist.is_initialized()
    context, chosen = from_environment(device)
    try:
        yield context, chosen
    finally:
        if joined and context.enabled and dist.is_initialized():
            dist.destroy_process_group()


def shard_backbone(base_model: nn.Module, device: torch.device) -> nn.Module:
    """Shard each frozen decoder layer of a Hugging Face causal LM across the ranks with FSDP2
    (`torch.distributed.fsdp.fully_shard`), then move the rest (embeddings, final norm, LM head: a small
    share of a large model's weights, kept whole on every rank) to `device`. Call on every rank, with the
    model loaded on the CPU, before wrapping it in a PromptModel. Returns `base_model`, changed in place.

    Each layer gathers its weights for its forward and again for the backward of the prompt's gradient,
    then frees them. The prompt parameters are not sharded (they are small; their gradients are summed by
    `Distributed.sync_gradients`).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fastprompt.backbones import get_backbone

    if not dist.is_initialized():
        raise ValueError("shard_backbone needs an initialised process group: launch with torchrun, and join "
                         "it with fastprompt.train.distributed.from_environment() first")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in get_backbone(base_model).layers:
        fully_shard(layer, mesh=mesh)
    return base_model.to(device)
