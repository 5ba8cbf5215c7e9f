"""A prompt model's training loss replayed from CUDA graphs: no host time per op.

At the sizes soft prompts train at, a step of a frozen backbone is host-bound on a fast GPU: Python and
the dispatcher issue ~1,600 kernels more slowly than the GPU runs them (an H200, Llama-3.2-1B shape, B8:
bench/results/gpu-session-nvidia-h200-2026-12-04.log). `CudaGraphLoss` captures the loss's forward and
its backward once per batch shape (torch.cuda.make_graphed_callables) and replays them after, so a step
costs a few launches of host time and the GPU never waits.

    loss_fn = CudaGraphLoss(model)              # after every adapter is added; model on a CUDA device
    for batch in batches:
        loss = loss_fn(batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()                         # replays the backward graph; grads land in .grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

What capture fixes, and so what the caller must keep: the batch's shapes and which of the optional
arguments are given (each new combination is captured anew, up to `max_shapes`, beyond which calls run
eagerly), the model's parameters (add no adapter, and update parameters in place, as optimizers do), the
active adapter and the training flag (part of the cache key). The returned loss is a buffer the next call
overwrites: read it (`loss.item()`, `loss.detach().clone()`) before the next call. The gradients autograd
hands to .grad may be views of the graph's own buffers, which the next replay overwrites, so gradients do
not accumulate across calls: each call requires every trainable .grad to be None
(`optimizer.zero_grad(set_to_none=True)`, PyTorch's default), and raises otherwise.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

ARGUMENTS = ("input_ids", "attention_mask", "labels", "task_ids")


class _Loss(nn.Module):
    """model(**{name: tensor})'s loss for the given argument names: what make_graphed_callables captures
    (it takes tensors only, positionally, and a module so that the model's parameters are graph inputs)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], options: dict):
        super().__init__()
        self.model = model
        self.names = names
        self.options = options

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors)), **self.options).loss


class CudaGraphLoss:
    """`model(input_ids, attention_mask, labels, task_ids).loss` from CUDA graphs captured per batch shape.

    model: a fastprompt PromptModel (any soft-prompt method) on a CUDA device, its adapters all added.
    Call with input_ids [B, T] int64, and optionally attention_mask [B, T], labels [B, T] (required: the
    loss needs them) and task_ids [B] int64, all on the model's device; returns the scalar loss (float32,
    a graph-owned buffer) whose backward fills the trainable parameters' .grad like an eager step's.
    The first call with a new shape runs 3 eager warm-up steps and the capture.

    path: the PromptModel path every call takes. None (default): the model's own, except that "auto" becomes
    "shared_prefix": path="auto" weighs the shared-prefix pass's extra host time against the arithmetic it
    saves, and a replay has no host time, while the shared prefix never does more arithmetic than concat.
    """

    def __init__(self, model: nn.Module, *, path: str | None = None, max_shapes: int = 4, warmup_steps: int = 3):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CudaGraphLoss needs the model on a CUDA device, got {device}; on other devices "
                             f"call the model itself")
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
        model_path = getattr(model, "path", None)   # PromptModel's; encoder and seq2seq models have one path
        if path is None and model_path is not None:
            path = "shared_prefix" if model_path == "auto" else model_path
        self.options = {} if path is None else {"path": path}
        self.model = model
        self.device = device
        self.max_shapes = max_shapes
        self.warmup_steps = warmup_steps
        self._graphed: dict[tuple, nn.Module] = {}
        self._pool = torch.cuda.graph_pool_handle()   # one memory pool for every captured shape
        self._trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self._warned = False

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        given = {name: t for name, t in zip(ARGUMENTS, (input_ids, attention_mask, labels, task_ids))
                 if t is not None}
        if labels is None:
            raise ValueError("labels is required: CudaGraphLoss computes the training loss ([B, T], -100 = "
                             "ignore)")
        for name, t in given.items():
            if not isinstance(t, torch.Tensor) or t.device != self.device:
                where = t.device if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a tensor on the model's device {self.device}, got {where}")
        stale = [name for name, p in self._trainable if p.grad is not None]
        if stale:
            raise ValueError(f"clear the gradients before each CudaGraphLoss call (optimizer.zero_grad("
                             f"set_to_none=True)): the next replay overwrites the buffers they may share, so "
                             f"they cannot accumulate; {stale[0]} has one")
        key = (tuple((name, tuple(t.shape), t.dtype) for name, t in given.items()),
               self.model.active_adapter, self.model.training)
        graphed = self._graphed.get(key)
        if graphed is None:
            if len(self._graphed) >= self.max_shapes:
                if not self._warned:
                    warnings.warn(f"CudaGraphLoss: more than max_shapes={self.max_shapes} batch shapes; new "
                                  f"shapes run eagerly (pad batches to a few fixed lengths to replay them)")
                    self._warned = True
                return self.model(**given, **self.options).loss
            graphed = self._capture(tuple(given), tuple(given.values()))
            self._graphed[key] = graphed
        return graphed(*given.values())

    def _capture(self, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> nn.Module:
        """Capture the loss for these argument names and shapes, on private copies of the inputs (the graph
        reads its inputs from them: each replay copies the call's tensors in)."""
        static = tuple(t.detach().clone() for t in tensors)
        loss = _Loss(self.model, names, self.options)
        loss.training = self.model.training  # its own flag only: .train() would set the model's too
        try:
            return torch.cuda.make_graphed_callables(loss, static,
                                                     num_warmup_iters=self.warmup_steps,
                                                     allow_unused_input=True, pool=self._pool)
        except RuntimeError as error:
            if "captur" not in str(error):
                raise
            raise RuntimeError(f"CudaGraphLoss: the step could not be captured as a CUDA graph ({error}); "
                               f"something in it reads a GPU value on the host. Call the model eagerly "
                               f"instead.") from error
