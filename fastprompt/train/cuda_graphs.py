"""Training steps replayed from CUDA graphs: no host time per op.

At the sizes soft prompts train at, a step of a frozen backbone is host-bound on a fast GPU: Python and
the dispatcher issue ~1,600 kernels more slowly than the GPU runs them (an H200, Llama-3.2-1B shape, B8:
bench/results/gpu-session-nvidia-h200-2026-12-04.log). Two ways to take the host out, captured once per
batch shape and replayed after:

- `CudaGraphStep`: the whole step (forward, backward, gradient clipping and AdamW's update, with the
  learning rate a device tensor) in one graph: a step is one replay. The Trainer's default on CUDA.
- `CudaGraphLoss`: the loss's forward and backward (torch.cuda.make_graphed_callables); the caller runs the
  optimizer. For what the whole step cannot hold: gradient accumulation, data parallel, Adafactor, fp16's
  grad scaler.

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

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

ARGUMENTS = ("input_ids", "attention_mask", "labels", "task_ids")


def _path_option(model: nn.Module, path: str | None) -> dict:
    """The PromptModel path every replay takes: `path`, or None for the model's own, except that "auto"
    becomes "shared_prefix": path="auto" weighs the shared-prefix pass's extra host time against the
    arithmetic it saves, and a replay has no host time, while the shared prefix never does more arithmetic
    than concat. Encoder and seq2seq models have one path (no option)."""
    model_path = getattr(model, "path", None)
    if path is None and model_path is not None:
        path = "shared_prefix" if model_path == "auto" else model_path
    return {} if path is None else {"path": path}


def _given(caller: str, device: torch.device, *tensors) -> dict[str, torch.Tensor]:
    """The call's tensors by argument name (None left out), each checked to be on the model's device."""
    given = {name: t for name, t in zip(ARGUMENTS, tensors) if t is not None}
    if "labels" not in given:
        raise ValueError(f"labels is required: {caller} computes the training loss ([B, T], -100 = ignore)")
    for name, t in given.items():
        if not isinstance(t, torch.Tensor) or t.device != device:
            where = t.device if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor on the model's device {device}, got {where}")
    return given


def _shape_key(model: nn.Module, given: dict[str, torch.Tensor]) -> tuple:
    """What one capture fixes: each given argument's name, shape and dtype, the active adapter, the mode."""
    return (tuple((name, tuple(t.shape), t.dtype) for name, t in given.items()), model.active_adapter,
            model.training)


def _may_capture(owner, captured: dict) -> bool:
    """Whether `owner` (a CudaGraphLoss or CudaGraphStep) may capture one more shape beyond `captured`; past
    its max_shapes the call runs eagerly, said once."""
    if len(captured) < owner.max_shapes:
        return True
    if not owner._warned:
        warnings.warn(f"{type(owner).__name__}: more than max_shapes={owner.max_shapes} batch shapes; new shapes "
                      f"run eagerly (pad batches to a few fixed lengths to replay them)")
        owner._warned = True
    return False


def _explain_capture_failure(owner, error: RuntimeError, instead: str) -> None:
    """Called where a capture raised `error`: raises a capture error explained (something read a GPU value on
    the host); returns for any other error, which the caller re-raises as it was."""
    if "captur" in str(error):
        raise RuntimeError(f"{type(owner).__name__}: the step could not be captured as a CUDA graph ({error}); "
                           f"something in it reads a GPU value on the host. {instead}") from error


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

    path: the PromptModel path every call takes; None (default): the model's own, "auto" taken as
    "shared_prefix" (see `_path_option`).
    """

    def __init__(self, model: nn.Module, *, path: str | None = None, max_shapes: int = 4, warmup_steps: int = 3):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CudaGraphLoss needs the model on a CUDA device, got {device}; on other devices "
                             f"call the model itself")
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
        self.options = _path_option(model, path)
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
        given = _given(type(self).__name__, self.device, input_ids, attention_mask, labels, task_ids)
        stale = [name for name, p in self._trainable if p.grad is not None]
        if stale:
            raise ValueError(f"clear the gradients before each CudaGraphLoss call (optimizer.zero_grad("
                             f"set_to_none=True)): the next replay overwrites the buffers they may share, so "
                             f"they cannot accumulate; {stale[0]} has one")
        key = _shape_key(self.model, given)
        graphed = self._graphed.get(key)
        if graphed is None:
            if not _may_capture(self, self._graphed):
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
            _explain_capture_failure(self, error, "Call the model eagerly instead.")
            raise


class _CudaRecorder:
    """How `CudaGraphStep` warms up, captures and replays on CUDA. A seam: the tests put an eager recorder
    in its place (`RECORDER`) to hold the step's bookkeeping to eager training off CUDA."""

    device_type = "cuda"

    def pool(self):
        return torch.cuda.graph_pool_handle()

    @contextlib.contextmanager
    def side_stream(self):
        """Warm-up runs on a side stream, as capture does, so that lazily made state (cuBLAS workspaces,
        the allocator's blocks) is made for it."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream().wait_stream(stream)

    def record(self, body, pool):
        """A graph of `body()` (recorded, not run), replayed by `.replay()`."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            body()
        return graph


RECORDER = _CudaRecorder()


@dataclass
class _Captured:
    graph: object                                   # .replay() runs the step on `inputs`
    inputs: dict[str, torch.Tensor]                 # the graph's own copies of the call's tensors
    grads: list[torch.Tensor | None]                # the graph's gradient buffers, per trainable parameter


class CudaGraphStep:
    """A whole training step from one CUDA graph per batch shape: forward, backward, gradient clipping and
    AdamW's update, so that a step costs one replay of host time.

        step = CudaGraphStep(model, lr=1e-2, max_grad_norm=1.0)      # every adapter added; model on CUDA
        for i, batch in enumerate(batches):
            loss, grad_norm = step(batch["input_ids"], batch["attention_mask"], batch["labels"], lr=lrs[i])
            print(float(loss))                                       # read it before the next call

    model: a fastprompt prompt model on a CUDA device. optimizer: None to make AdamW(lr, weight_decay) on the
    trainable parameters (`optim.adamw_for_graphs`), or one made so: torch.optim.AdamW, capturable, its
    learning rate a tensor on the model's device (a float would be fixed into the graph at capture).
    max_grad_norm: clip the gradients' total norm to it (None: no clipping, the norm still returned).
    autocast: a context-manager factory the forward runs under (e.g. bf16 autocast with cache_enabled=False:
    a cast cache would outlive the capture). path, max_shapes: as `CudaGraphLoss`.

    A call takes input_ids [B, T] int64, attention_mask [B, T], labels [B, T] (required; -100 = ignore) and
    task_ids [B] int64 (MPT), all on the model's device, and lr (float, or None to keep the last one); it
    runs one optimizer step on the token-mean loss and returns (loss, grad_norm): float32 0-dim tensors on
    the device, buffers the next call overwrites. Afterwards the trainable parameters' .grad hold this step's
    gradients (buffers of the graph: they never accumulate across calls).

    A new shape runs `warmup_steps` eager steps and the capture first; the parameters and the optimizer's
    state are put back as they were before them, so the run's trajectory is the eager one's (the random
    number stream aside: warm-up consumes some, which only dropout would see). Shapes beyond `max_shapes`
    run the same step eagerly, with one warning.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, lr: float = 1e-3,
                 weight_decay: float = 0.0, max_grad_norm: float | None = None, autocast=contextlib.nullcontext,
                 path: str | None = None, max_shapes: int = 4, warmup_steps: int = 3):
        from fastprompt.train.optim import adamw_for_graphs

        self._recorder = RECORDER
        device = next(model.parameters()).device
        if device.type != self._recorder.device_type:
            raise ValueError(f"CudaGraphStep needs the model on a CUDA device, got {device}; on other devices "
                             f"train eagerly")
        if max_shapes < 1 or warmup_steps < 1:
            raise ValueError(f"max_shapes and warmup_steps must be >= 1 (warm-up makes the optimizer's state "
                             f"before capture), got {max_shapes} and {warmup_steps}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = optimizer if optimizer is not None else adamw_for_graphs(self.params, lr, weight_decay)
        self._lr = _check_graph_optimizer(self.optimizer, device)
        self.model = model
        self.device = device
        self.options = _path_option(model, path)
        self.max_grad_norm = float("inf") if max_grad_norm is None else float(max_grad_norm)
        self.autocast = autocast
        self.max_shapes = max_shapes
        self.warmup_steps = warmup_steps
        self._loss = torch.zeros((), dtype=torch.float32, device=device)
        self._grad_norm = torch.zeros((), dtype=torch.float32, device=device)
        self._captured: dict[tuple, _Captured] = {}
        self._pool = self._recorder.pool()
        self._warned = False

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, task_ids: torch.Tensor | None = None, *,
                 lr: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        given = _given(type(self).__name__, self.device, input_ids, attention_mask, labels, task_ids)
        if lr is not None:
            self._lr.fill_(lr)
        key = _shape_key(self.model, given)
        captured = self._captured.get(key)
        if captured is None:
            if not _may_capture(self, self._captured):
                self._step(given)
                return self._loss, self._grad_norm
            captured = self._captured[key] = self._capture(given)
        for name, t in given.items():
            captured.inputs[name].copy_(t)
        for p, grad in zip(self.params, captured.grads):   # where this graph writes them (see _step)
            p.grad = grad
        captured.graph.replay()
        return self._loss, self._grad_norm

    def step_without_targets(self, lr: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The step of a batch with no target tokens, as an eager step takes it: zero loss, zero
        gradients, and the optimizer still steps (AdamW's moments and weight decay move the prompt). A
        replay cannot: its token-mean loss would be 0/0."""
        if lr is not None:
            self._lr.fill_(lr)
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self._loss.zero_()
        self._grad_norm.zero_()
        return self._loss, self._grad_norm

    def _step(self, inputs: dict[str, torch.Tensor]) -> None:
        """One step on `inputs`, eagerly or while being captured. .grad is set to None first, so the
        backward writes the gradients (no accumulation); under capture it allocates them in the graph's
        pool, where each replay writes them again."""
        for p in self.params:
            p.grad = None
        with self.autocast():
            loss = self.model(**inputs, **self.options).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self._loss.copy_(loss.detach())
        self._grad_norm.copy_(grad_norm)

    def _capture(self, given: dict[str, torch.Tensor]) -> _Captured:
        """Warm up, capture the step on private copies of the inputs, and put the parameters and the
        optimizer's state back as they were before warm-up (warm-up steps are not the run's steps)."""
        inputs = {name: t.detach().clone() for name, t in given.items()}
        before = self._snapshot()
        try:
            with self._recorder.side_stream():
                for _ in range(self.warmup_steps):
                    self._step(inputs)
            graph = self._recorder.record(lambda: self._step(inputs), self._pool)
        except RuntimeError as error:
            _explain_capture_failure(self, error, "Train eagerly instead.")
            raise
        finally:
            self._restore(before)
        return _Captured(graph, inputs, [p.grad for p in self.params])

    def _snapshot(self) -> tuple[list[torch.Tensor], dict]:
        with torch.no_grad():
            params = [p.detach().clone() for p in self.params]
            state = {p: {k: v.clone() for k, v in self.optimizer.state[p].items() if torch.is_tensor(v)}
                     for p in self.params if p in self.optimizer.state}
        return params, state

    def _restore(self, snapshot: tuple[list[torch.Tensor], dict]) -> None:
        """In place (the graph holds these tensors): the parameters, and the optimizer's state, zero where
        warm-up made it (AdamW's state starts at zero, its step count included)."""
        params, state = snapshot
        with torch.no_grad():
            for p, value in zip(self.params, params):
                p.copy_(value)
            for p in self.params:
                for name, value in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        saved = state.get(p, {}).get(name)
                        value.copy_(saved) if saved is not None else value.zero_()


def _check_graph_optimizer(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """The one learning-rate tensor every group of `optimizer` reads, after checking that a graph can hold
    its step: AdamW (whose state starts at zero, see `_restore`), capturable on CUDA, lr a tensor on
    `device` shared by the groups."""
    hint = "make one with fastprompt.train.adamw_for_graphs(params, lr)"
    if not isinstance(optimizer, torch.optim.AdamW):
        raise ValueError(f"CudaGraphStep's optimizer must be torch.optim.AdamW, got {type(optimizer).__name__}; "
                         f"{hint}")
    lrs = [group["lr"] for group in optimizer.param_groups]
    if not all(isinstance(lr, torch.Tensor) and lr.device == device for lr in lrs) or len({id(lr) for lr in lrs}) != 1:
        raise ValueError(f"CudaGraphStep's optimizer must read its learning rate from one tensor on {device} "
                         f"(a float is fixed into the graph at capture); {hint}")
    if device.type == "cuda" and not all(group["capturable"] for group in optimizer.param_groups):
        raise ValueError(f"CudaGraphStep's optimizer must be capturable (capturable=True); {hint}")
    return lrs[0]
