"""A Trainer for PromptModel: only the prompt parameters train.

    trainer = Trainer(model, TrainingConfig(output_dir="out", steps=200, lr=0.3, optimizer="adafactor"),
                      train_data, eval_data, pad_token_id=tokenizer.pad_token_id)
    result = trainer.train()            # or trainer.train(resume=True) after an interruption
    trainer.evaluate()                  # {"eval_loss", "eval_token_accuracy", "eval_accuracy", ...}

Exact resume: the examples of optimizer step s are a deterministic function of (seed, s) (see
`data.DataOrder`), the learning rate a function of s, and a checkpoint keeps the prompt
parameters, the optimizer (with tail averaging's running mean, `averaging`), the RNG state, the grad scaler
and the early-stopping state; so a run stopped at step k and resumed produces the same losses as an
uninterrupted run (bit for bit on a CPU).

Gradient accumulation: each step takes ``batch_size * grad_accum`` examples, split into ``grad_accum``
micro-batches; each micro-batch's loss is its token sum divided by the target tokens of the whole step,
so the gradient equals that of the token-mean loss over the whole step's batch.

Data parallel (`fastprompt.train.distributed`): with ``distributed=Distributed(rank, world_size)`` a step
takes ``world_size`` times as many examples, each rank runs its share of the micro-batches, and the prompt
gradients are summed over ranks: the same update as one process on the same global batch.

Subclasses change the objective through two hooks: `normalizers` (global counts for a step) and
`compute_loss` (one micro-batch's share of the step's loss); see `fastprompt.train.mpt`.

The backbone keeps its mode (``from_pretrained`` gives eval mode: no backbone dropout); the prompt
sources are put in train mode while training.

CUDA graphs (the default on CUDA, ``cuda_graphs=None``): the whole step, forward, backward, gradient
clipping and AdamW's update, is replayed from one graph per batch shape
(`fastprompt.train.cuda_graphs.CudaGraphStep`), so the host no longer sets the pace of a step. Where the
update cannot join the graph (gradient accumulation, data parallel, Adafactor, fp16's grad scaler) each
micro-batch's loss is replayed (`CudaGraphLoss`) and the update runs eagerly, said in one line on stderr;
where no graph can serve (rows routed to adapters by name, a subclass with its own loss, a sharded
backbone) the trainer runs eagerly and says why in one line; ``cuda_graphs=True`` makes the latter a
ValueError, ``cuda_graphs=False`` always runs eagerly. Off CUDA it runs eagerly, silently.
Batches are padded to fixed shapes for that: ``batch_size`` rows (filler rows carry no labels) and a length
from `data.bucket_length` (16, 24, 32, 48, 64, ...: at most 50% padding), one capture per length. The graph
computes the micro-batch's token-mean loss; with accumulation its share of the step is that mean times its
target tokens over the step's, the same number as the eager share up to rounding. Rows go to one adapter,
or to the tasks of one MPT adapter (routing by adapter name is a per-row list of strings, which a graph
cannot take).

This module holds the loop and evaluation; beside it: the options (`config`), the optimizer and learning-rate
schedule (`optim`), tail averaging (`averaging`), the checkpoint folders (`checkpoints`), the JSON-lines log
(`log`), the loss-curve PNG (`loss_curve`) and the progress display (`progress`).
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fastprompt.methods import source_class
from fastprompt.train import averaging, checkpoints
from fastprompt.train.config import TrainingConfig
from fastprompt.train.cuda_graphs import CudaGraphLoss, CudaGraphStep
from fastprompt.train.data import CLASSIFICATION, DataOrder, Example, PromptDataset, bucket_length, collate
from fastprompt.train.distributed import Distributed
from fastprompt.train.log import LOG_NAME, append_record, read_log, truncate_log
from fastprompt.train.loss_curve import PLOT_NAME, plot_loss_curve
from fastprompt.train.optim import lr_factor, make_optimizer
from fastprompt.train.progress import Progress

def target_count(model, labels: torch.Tensor) -> int:
    """How many tokens the model's mean loss averages over: virtual-token methods also score the first
    input token (predicted by the last virtual token, as in PEFT); prefix tuning does not."""
    kind = model.prompt_sources[model.active_adapter].kind
    counted = labels if kind == "tokens" else labels[:, 1:]
    return int((counted != -100).sum())


def _take_grads(params, summed: dict) -> None:
    """Move each parameter's .grad into `summed` (added to what is there), leaving .grad None."""
    for p in params:
        if p.grad is not None:
            summed[p] = summed[p] + p.grad if p in summed else p.grad.clone()
            p.grad = None


def task_model(base_model, config, tasks: list[str], *, path: str = "auto"):
    """A PromptModel ready for a (multi-)task run of the Trainer: one adapter per task named after it,
    all from `config` (rows reach theirs by name); for MPT, or without tasks, one adapter "default"."""
    import fastprompt

    if source_class(config.peft_type).routes_by_task or not tasks:
        return fastprompt.get_peft_model(base_model, config, path=path)
    model = fastprompt.get_peft_model(base_model, config, tasks[0], path=path)
    for task in tasks[1:]:
        model.add_adapter(task, config)
    return model


@dataclass
class TrainResult:
    step: int
    stopped_early: bool
    best_metric: float | None
    best_step: int | None = None                       # the step of the best evaluation
    restored_best: bool = False                        # the model ends with that step's prompt (restore_best)
    averaged: bool = False                             # the steps ended with the mean of the last ones (average_last)
    log: list[dict] = field(default_factory=list)      # this call's records (train and eval)

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.log if "loss" in r]


class Trainer:
    """Trains a PromptModel's trainable prompt parameters on a `PromptDataset` (see the module docstring).

    Rows are routed by their task: MPT adapters get ``task_ids`` (the task's index in `tasks`, by default
    the sorted task names of the training data); other methods get ``adapter_names`` (the task's name:
    one adapter per task); rows without a task use the active adapter.

    distributed: this process's rank and the world size for data-parallel training (see the module
    docstring); the default is a single process.
    """

    def __init__(self, model, config: TrainingConfig, train_data: PromptDataset,
                 eval_data: PromptDataset | None = None, *, pad_token_id: int = 0, tasks: list[str] | None = None,
                 distributed: Distributed | None = None):
        self.model = model
        self.config = config
        self.dist = distributed or Distributed()
        self.train_data = train_data
        self.eval_data = eval_data
        self.pad_token_id = pad_token_id
        self.tasks = list(tasks) if tasks is not None else train_data.tasks
        self.task_index = {t: i for i, t in enumerate(self.tasks)}
        self.routes_by_task = model.prompt_sources[model.active_adapter].routes_by_task
        self.output_dir = Path(config.output_dir)
        self.optimizer = None
        self._graphed_loss: CudaGraphLoss | None = None   # made by train(): graphs, the update eager
        self._graphed_step: CudaGraphStep | None = None   # made by train(): the whole step in a graph
        self._check_routing(train_data, "train_data")
        if eval_data is not None:
            self._check_routing(eval_data, "eval_data")
        obstacle = self._graph_obstacle()
        if config.cuda_graphs and obstacle:
            raise ValueError(f"cuda_graphs=True: {obstacle}; set cuda_graphs=False")
        # Whether micro-batches replay CUDA graphs: config.cuda_graphs, or where it is None, wherever one can.
        self.use_graphs = obstacle is None if config.cuda_graphs is None else config.cuda_graphs
        if config.cuda_graphs is None and obstacle and self.model.backbone.device.type == "cuda":
            print(f"fastprompt: training without CUDA graphs: {obstacle}", file=sys.stderr)
        # Whether the graph holds the whole step (else each micro-batch's loss, the update eager).
        split = self._update_obstacle() if self.use_graphs else None
        self.whole_step = self.use_graphs and split is None
        if split:
            print(f"fastprompt: CUDA graphs replay each micro-batch's loss, the update runs eagerly: {split}",
                  file=sys.stderr)

    # routing ---------------------------------------------------------------------------------
    def _check_routing(self, data: PromptDataset, argument: str) -> None:
        for task in data.tasks:
            if task not in self.task_index:
                raise ValueError(f"{argument}: task {task!r} is not one of the training tasks {self.tasks}")
            if not self.routes_by_task and task not in self.model.adapter_names:
                raise ValueError(f"{argument}: task {task!r} has no adapter of that name; loaded: "
                                 f"{self.model.adapter_names}")
        if self.routes_by_task and len(self.tasks) > self.model.active_peft_config.num_tasks:
            raise ValueError(f"{len(self.tasks)} tasks {self.tasks} but the MPT adapter has num_tasks="
                             f"{self.model.active_peft_config.num_tasks}")

    def _graph_obstacle(self) -> str | None:
        """Why a CUDA graph cannot serve this run's micro-batches, or None when one can."""
        device = self.model.backbone.device
        if device.type != "cuda":
            return f"it needs the model on a CUDA device, got {device}"
        named = sorted({t for t in self.train_data.tasks if t is not None})
        if not self.routes_by_task and named and named != [self.model.active_adapter]:
            return (f"a graph trains the active adapter ({self.model.active_adapter!r}) or the tasks of one MPT "
                    f"adapter, but train_data routes rows to adapters {named} by name")
        if type(self).compute_loss is not Trainer.compute_loss:
            return f"{type(self).__name__} computes its own loss, which is not graphed"
        if any(type(p).__name__ == "DTensor" for p in self.model.backbone.model.parameters()):
            return "the backbone is sharded (FSDP), whose collectives a graph does not capture"
        return None

    def _update_obstacle(self) -> str | None:
        """Why the optimizer's update cannot join the graph (`CudaGraphStep`), or None when it can."""
        cfg = self.config
        if cfg.grad_accum > 1:
            return f"grad_accum={cfg.grad_accum} (the whole-step graph takes one micro-batch per step)"
        if self.dist.world_size > 1:
            return "data parallel (the gradients are summed over ranks between the backward and the update)"
        if cfg.optimizer != "adamw":
            return f"optimizer={cfg.optimizer!r} has no capturable form (AdamW has)"
        if cfg.precision == "fp16":
            return "fp16's grad scaler checks the gradients for overflow on the host"
        return None

    def model_inputs(self, batch: dict) -> dict:
        """Model kwargs from a collated batch: tensors on the model's device plus the rows' routing."""
        device = self.model.backbone.device
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels") if k in batch}
        tasks = batch.get("tasks") or []
        if self.routes_by_task:
            inputs["task_ids"] = torch.tensor([self.task_index.get(t, 0) for t in tasks], dtype=torch.long,
                                              device=device)
        elif any(t is not None for t in tasks) and not self.use_graphs:  # one adapter with graphs
            inputs["adapter_names"] = list(tasks)
        return inputs

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.precision)
        # A graph captures the casts themselves; autocast's weight-cast cache would outlive the capture.
        return torch.autocast(self.model.backbone.device.type, dtype=dtype, enabled=dtype is not None,
                              cache_enabled=not self.use_graphs)

    # training --------------------------------------------------------------------------------
    @property
    def examples_per_step(self) -> int:
        """The global batch: batch_size × grad_accum × world_size examples per optimizer step."""
        return self.config.batch_size * self.config.grad_accum * self.dist.world_size

    @functools.cached_property
    def batch_order(self) -> DataOrder:
        """Which training examples each step reads (each epoch's order made once), stratified by (task, label)
        where the config says so."""
        cfg = self.config
        strata = [(e.task, e.label) for e in self.train_data.examples] if cfg.stratify else None
        return DataOrder(len(self.train_data), cfg.seed, cfg.shuffle, strata)

    def step_batches(self, step: int) -> list[dict]:
        """The micro-batches of optimizer step `step` (0-based) over all ranks: a function of (seed, step)
        only, given the data and the config."""
        cfg = self.config
        indices = self.batch_order.indices(self.examples_per_step, step)
        chunks = [[self.train_data[i] for i in indices[i:i + cfg.batch_size]]
                  for i in range(0, len(indices), cfg.batch_size)]
        if not self.use_graphs:
            return [collate(chunk, self.pad_token_id) for chunk in chunks]
        return [collate(chunk, self.pad_token_id, rows=cfg.batch_size,
                        length=bucket_length(max(len(e.input_ids) for e in chunk), self.train_data.longest))
                for chunk in chunks]

    def normalizers(self, batches: list[dict]) -> dict[str, int]:
        """Counts over a whole step (every micro-batch of every rank) that `compute_loss` divides by:
        ``target_tokens``, the tokens the token-mean LM loss averages over (at least 1)."""
        return {"target_tokens": max(1, sum(target_count(self.model, b["labels"]) for b in batches))}

    def compute_loss(self, batch: dict, norms: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch's share of the step's loss: (0-dim loss to backpropagate, extra 0-dim terms to
        log). Shares add up over micro-batches and ranks to the step's loss, so each is a sum over the
        micro-batch divided by step-wide counts. Here: the LM loss's token sum / norms["target_tokens"]."""
        inputs = self.model_inputs(batch)
        if self._graphed_loss is None:
            return self.model(**inputs, num_items_in_batch=norms["target_tokens"]).loss, {}
        targets = target_count(self.model, batch["labels"])
        if not targets:  # nothing to learn from; a replay's mean (and its gradients) would be 0/0
            return torch.zeros((), device=inputs["input_ids"].device, requires_grad=True), {}
        mean = self._graphed_loss(inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
                                  inputs.get("task_ids"))
        return mean * (targets / norms["target_tokens"]), {}

    def _whole_step(self, batches: list[dict], lr: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimizer step of one micro-batch from the step's graph: ({"loss": loss}, gradient norm)."""
        (batch,) = batches
        if not target_count(self.model, batch["labels"]):   # a replay's mean would be 0/0
            loss, grad_norm = self._graphed_step.step_without_targets(lr)
        else:
            inputs = self.model_inputs(batch)
            loss, grad_norm = self._graphed_step(inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
                                                 inputs.get("task_ids"), lr=lr)
        return {"loss": loss}, grad_norm

    def _eager_update(self, batches: list[dict], norms: dict[str, int], lr: float, params: list, scaler
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimizer step: each micro-batch's share of the loss forward and backward (eager, or its
        loss replayed from a graph), the gradients summed over ranks, clipped and applied eagerly. Returns
        the shares of the loss and the other logged terms, and the gradient norm before clipping."""
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        shares: dict[str, torch.Tensor] = {}
        summed_grads: dict[torch.nn.Parameter, torch.Tensor] = {}
        for batch, weight in self.dist.shard(batches):
            with self._autocast():
                loss, terms = self.compute_loss(batch, norms)
            scaler.scale(loss * weight).backward()
            for name, value in {"loss": loss, **terms}.items():
                shares[name] = shares.get(name, 0.0) + value.detach().float() * weight
            if self._graphed_loss is not None:  # its .grad are graph buffers the next replay overwrites
                _take_grads(params, summed_grads)
        if self._graphed_loss is not None:
            for p, grad in summed_grads.items():
                p.grad = grad
        self.dist.sync_gradients(params)
        scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        scaler.step(self.optimizer)
        scaler.update()
        return shares, grad_norm

    def save_model(self, folder) -> None:
        """Write the trained adapters in PEFT's layout (all of them; subclasses may select)."""
        self.model.save_pretrained(folder)

    def train(self, resume: bool | str = False) -> TrainResult:
        """Train for `config.steps` optimizer steps (or until early stopping). resume=True continues from
        the newest checkpoint in the output folder, a path from that checkpoint."""
        cfg, model = self.config, self.model
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters (load adapters with is_trainable=True)")
        frozen = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("prompt_sources.")]
        if frozen:
            raise ValueError(f"only prompt parameters may train; these also require grad: {frozen[:5]}")
        self.optimizer = make_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay, for_graphs=self.whole_step)
        if self.whole_step:
            # max_grad_norm 0 or None: no clipping, as `_eager_update` reads it (CudaGraphStep would clip to 0)
            self._graphed_step = CudaGraphStep(model, self.optimizer, max_grad_norm=cfg.max_grad_norm or None,
                                               autocast=self._autocast, max_shapes=16)
        elif self.use_graphs and self._graphed_loss is None:
            self._graphed_loss = CudaGraphLoss(model, max_shapes=16)
        device_type = model.backbone.device.type
        scaler = torch.amp.GradScaler(device_type, enabled=cfg.precision == "fp16")
        state = {"best": None, "best_step": None, "bad_evals": 0, "tokens": 0}
        self._best_params = None   # a copy of the trainable parameters at the best evaluation of this call
        tail_from = averaging.first_step(cfg.steps, cfg.average_last) if cfg.average_last else None
        main = self.dist.is_main
        self.output_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.output_dir / LOG_NAME
        step = 0
        if resume:
            folder = (Path(resume) if isinstance(resume, (str, Path))
                      else checkpoints.latest_checkpoint(self.output_dir))
            if folder is None:
                raise ValueError(f"resume: no {checkpoints.CHECKPOINT_PREFIX}* folder in {str(self.output_dir)!r}")
            step = checkpoints.load_checkpoint(folder, model, self.optimizer, state=state, scaler=scaler,
                                               data_order=self._data_order())
            if tail_from:
                averaging.check_resumed(self.optimizer, params, step, tail_from)
            if main:
                truncate_log(log_path, step)
        else:
            torch.manual_seed(cfg.seed)
            if main:
                log_path.unlink(missing_ok=True)
        self.dist.broadcast_parameters(params)
        self._best_is_current = state["best_step"] == step   # the model holds the best evaluation's prompt
        result = TrainResult(step, False, state["best"])
        metric = self._metric_name()
        higher = metric != "eval_loss"
        progress = Progress(cfg.progress if main else "none", cfg.steps, step, cfg.log_every)
        start, tokens_now = time.perf_counter(), 0
        was_training = model.prompt_sources.training
        model.prompt_sources.train()
        try:
            while step < cfg.steps:
                batches = self.step_batches(step)
                norms = self.normalizers(batches)
                lr = cfg.lr * lr_factor(cfg.schedule, step, cfg.warmup, cfg.steps)
                step_tokens = sum(int(b["attention_mask"][:b["rows"]].sum()) for b in batches)  # no filler
                if self._graphed_step is not None:
                    shares, grad_norm = self._whole_step(batches, lr)
                else:
                    shares, grad_norm = self._eager_update(batches, norms, lr, params, scaler)
                summed = self.dist.all_reduce_sum(torch.stack(list(shares.values()))).tolist()
                step += 1
                self._best_is_current = False
                if tail_from:
                    averaging.accumulate(self.optimizer, params, step, tail_from)
                state["tokens"] += step_tokens
                tokens_now += step_tokens
                elapsed = time.perf_counter() - start
                record = {"step": step, **dict(zip(shares, summed)), "lr": lr, "grad_norm": float(grad_norm),
                          "target_tokens": norms["target_tokens"], "tokens": state["tokens"],
                          "tokens_per_s": tokens_now / max(elapsed, 1e-9),
                          "epoch": step * self.examples_per_step / len(self.train_data)}
                self._log(log_path, record, result)
                progress.update(step, record)
                stop = False
                if self.eval_data is not None and cfg.eval_every and step % cfg.eval_every == 0:
                    stop = self._evaluate_and_track(step, state, metric, higher, log_path, result, progress)
                if cfg.save_every and step % cfg.save_every == 0 and main:
                    self.save_checkpoint(step, state, scaler)
                if stop:
                    result.stopped_early = True
                    break
            result.averaged = bool(tail_from) and averaging.apply(self.optimizer, params)
            if result.averaged:
                self._best_is_current = False
                progress.message(f"the prompt is the mean of those after steps {tail_from}-{step} (average_last)")
            if self.eval_data is not None and (result.averaged or not result.stopped_early and not (
                    cfg.eval_every and step % cfg.eval_every == 0)):
                self._evaluate_and_track(step, state, metric, higher, log_path, result, progress,
                                         averaged=result.averaged)
        finally:
            progress.close()
            model.prompt_sources.train(was_training)
        result.restored_best = self._restore_best(state, step, params, progress)
        if main:
            self.save_model(self.output_dir)
            if cfg.plot:
                plot_loss_curve(read_log(log_path), self.output_dir / PLOT_NAME, say=progress.message)
        self.dist.barrier()  # the other ranks return once rank 0's files are in place
        result.step, result.best_metric, result.best_step = step, state["best"], state["best_step"]
        return result

    def _restore_best(self, state: dict, step: int, params: list, progress) -> bool:
        """With config.restore_best, put back the trainable parameters of the best evaluation when the model no
        longer holds them (steps, or the tail average, came after it); whether the model now holds them."""
        best_step = state["best_step"]
        if not self.config.restore_best or best_step is None or self._best_is_current:
            return False
        if self._best_params is None:   # the best evaluation came before a resume: its copy was not kept
            progress.message(f"the best evaluation (step {best_step}) predates the resume: the final adapter is "
                             f"step {step}'s; {self.output_dir / 'best'} holds step {best_step}'s")
            return False
        with torch.no_grad():
            for p, best in zip(params, self._best_params):
                p.copy_(best)
        progress.message(f"restored the prompt of step {best_step}, the best evaluation (restore_best)")
        return True

    def _metric_name(self) -> str:
        if self.config.metric != "auto":
            return self.config.metric
        return "eval_accuracy" if self.eval_data is not None and self.eval_data.has_classification else "eval_loss"

    def _evaluate_and_track(self, step, state, metric, higher, log_path, result, progress, averaged=False) -> bool:
        """Evaluate the model's prompt (after `step` steps; `averaged`: the tail average's) and track the best."""
        metrics = self.evaluate()
        if metric not in metrics:
            raise ValueError(f"metric {metric!r} is not among the evaluation's metrics {sorted(metrics)}")
        value = metrics[metric]
        best = state["best"]
        improved = best is None or (value > best + self.config.min_delta if higher
                                    else value < best - self.config.min_delta)
        if improved:
            state["best"], state["best_step"], state["bad_evals"] = value, step, 0
            self._best_is_current = True
            if self.config.restore_best:
                self._best_params = [p.detach().clone() for p in self.model.parameters() if p.requires_grad]
            if self.dist.is_main:
                self.save_model(self.output_dir / "best")
        else:
            state["bad_evals"] += 1
        tail = {"averaged_last": self.config.average_last} if averaged else {}
        self._log(log_path, {"step": step, **tail, **metrics, "best_" + metric: state["best"]}, result)
        progress.message(f"step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                       if isinstance(v, float)))
        return self.config.patience is not None and state["bad_evals"] >= self.config.patience

    def _log(self, path: Path, record: dict, result: TrainResult) -> None:
        result.log.append(record)
        if self.dist.is_main:
            append_record(path, record)

    def _data_order(self) -> dict:
        """What fixes each step's examples (see `step_batches`); a resumed run must match its checkpoint's."""
        return {"seed": self.config.seed, "examples_per_step": self.examples_per_step,
                "num_examples": len(self.train_data), "stratify": self.config.stratify}

    def save_checkpoint(self, step: int, state: dict, scaler=None) -> Path:
        """`checkpoints.save_checkpoint` into ``output_dir/checkpoint-<step>``: the prompt parameters, the
        optimizer and RNG state, plus the data-order and early-stopping state."""
        return checkpoints.save_checkpoint(self.output_dir, step, self.model, self.optimizer, state=state,
                                           scaler=scaler, data_order=self._data_order(), config=self.config)

    # evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data: PromptDataset | None = None) -> dict:
        """eval_loss (token mean over all target tokens), eval_token_accuracy (greedy next token), and for
        classification records eval_accuracy (the label whose verbalizer scores highest), also per task."""
        data = data if data is not None else self.eval_data
        if data is None or len(data) == 0:
            raise ValueError("evaluate: no evaluation data")
        model = self.model
        size = self.config.eval_batch_size or self.config.batch_size
        was_training = model.prompt_sources.training
        model.prompt_sources.eval()
        try:
            loss_sum, count, correct, scored = 0.0, 0, 0, 0
            for i in range(0, len(data), size):
                batch = collate([data[j] for j in range(i, min(i + size, len(data)))], self.pad_token_id)
                n = target_count(model, batch["labels"])
                with self._autocast():
                    out = model(**self.model_inputs(batch))
                loss_sum += float(out.loss) * n
                count += n
                targets = batch["labels"][:, 1:].to(out.logits.device)
                hits = (out.logits[:, :-1].argmax(-1) == targets) & (targets != -100)
                correct += int(hits.sum())
                scored += int((targets != -100).sum())
            metrics = {"eval_loss": loss_sum / max(count, 1), "eval_token_accuracy": correct / max(scored, 1),
                       "eval_examples": len(data)}
            classified = [e for e in data.examples if e.kind == CLASSIFICATION]
            if classified:
                predictions = self.classify(classified, data.choices)
                right = [p == e.label for p, e in zip(predictions, classified)]
                metrics["eval_accuracy"] = sum(right) / len(right)
                tasks = sorted({e.task for e in classified if e.task is not None})
                for task in tasks:
                    own = [r for r, e in zip(right, classified) if e.task == task]
                    metrics[f"eval_accuracy/{task}"] = sum(own) / len(own)
            return metrics
        finally:
            model.prompt_sources.train(was_training)

    def classify(self, examples, choices: dict) -> list[str]:
        """Each example's predicted label: the candidate whose verbalizer has the highest log-likelihood
        after the example's text (summed over its tokens, or averaged with config.score="mean")."""
        return [max(scores, key=scores.get) for scores in self.label_scores(examples, choices)]

    @torch.no_grad()
    def label_scores(self, examples, choices: dict) -> list[dict[str, float]]:
        """Each example's {label: log-likelihood of its verbalizer after the example's text} under the
        active adapter (summed over the verbalizer's tokens, or averaged with config.score="mean");
        choices: task -> [(label, token ids)], as `PromptDataset.choices`."""
        rows, owners = [], []
        for k, e in enumerate(examples):
            for label, ids in choices[e.task]:
                prompt = e.input_ids[:e.prompt_len]
                rows.append(Example(prompt + ids, [-100] * len(prompt) + ids, e.task, e.kind, e.source, len(prompt),
                                    label))
                owners.append(k)
        size = (self.config.eval_batch_size or self.config.batch_size) * 2
        scores = []
        for i in range(0, len(rows), size):
            batch = collate(rows[i:i + size], self.pad_token_id)
            with self._autocast():
                logits = self.model(**{k: v for k, v in self.model_inputs(batch).items() if k != "labels"}).logits
            log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
            targets = batch["labels"][:, 1:].to(logits.device)
            token = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)
            total = token.sum(-1)
            if self.config.score == "mean":
                total = total / (targets != -100).sum(-1).clamp(min=1)
            scores.extend(total.tolist())
        per_example: list[dict[str, float]] = [{} for _ in examples]
        for owner, row, score in zip(owners, rows, scores):
            per_example[owner][row.label] = score
        return per_example
