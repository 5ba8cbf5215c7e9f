"""The options of a training run (`TrainingConfig`), checked when made."""

from __future__ import annotations

from dataclasses import dataclass

from fastprompt.train.optim import OPTIMIZERS, SCHEDULES
from fastprompt.train.progress import PROGRESS_MODES

PRECISIONS = ("fp32", "bf16", "fp16")
SCORES = ("sum", "mean")


@dataclass
class TrainingConfig:
    """Options of `Trainer` (the CLI's flags have the same names)."""

    output_dir: str
    steps: int = 100                      # optimizer steps
    batch_size: int = 8                   # examples per micro-batch (per rank in a distributed run)
    grad_accum: int = 1                   # micro-batches per optimizer step and rank
    lr: float = 3e-2
    optimizer: str = "adamw"              # "adamw" or "adafactor" (Lester et al.: Adafactor, lr 0.3)
    weight_decay: float = 0.0
    schedule: str = "constant"            # "constant", "linear" or "cosine", after `warmup` linear steps
    warmup: int = 0
    max_grad_norm: float | None = 1.0     # None: no clipping (the norm is still logged)
    average_last: int = 0                 # end with the mean of the prompt after each of the last N steps
                                          # (tail averaging, fastprompt.train.averaging); 0: the last step's
    precision: str = "fp32"               # "bf16" / "fp16": autocast (fp16 with a grad scaler)
    eval_every: int = 0                   # 0: evaluate only at the end (when there is eval data)
    eval_batch_size: int | None = None
    metric: str = "auto"                  # "eval_loss" (lower is better) or "eval_accuracy" etc. (higher);
                                          # "auto": accuracy when the eval data has classification records
    patience: int | None = None           # stop after this many evaluations without improvement
    min_delta: float = 0.0
    restore_best: bool = True             # end with the prompt of the best evaluation, not the last step's
    save_every: int = 0                   # 0: no intermediate checkpoints
    keep_checkpoints: int | None = None   # keep only the newest N checkpoint folders
    seed: int = 0
    shuffle: bool = True
    stratify: bool = False                # each batch holds every (task, label) in its share of the data
                                          # (stratified order, fastprompt.train.data.epoch_order)
    log_every: int = 10                   # progress lines (the JSON-lines log has every step)
    progress: str = "auto"                # "auto" (tqdm on a terminal, else lines), "tqdm", "print", "none"
    plot: bool = True                     # loss-curve PNG at the end (skipped, with a note, without matplotlib)
    score: str = "sum"                    # classification: "sum" or "mean" log-probability of the verbalizer
    cuda_graphs: bool | None = None       # replay each micro-batch's loss from a CUDA graph (batches padded
                                          # to bucketed lengths; see fastprompt.train.trainer). None: wherever
                                          # a graph can serve (CUDA), True: required, False: never

    def __post_init__(self):
        checks = {"schedule": SCHEDULES, "optimizer": OPTIMIZERS, "precision": PRECISIONS,
                  "progress": PROGRESS_MODES, "score": SCORES}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("steps", "batch_size", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("warmup", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.average_last, int) or not 0 <= self.average_last <= self.steps:
            raise ValueError(f"average_last must be an int from 0 to steps ({self.steps}), got {self.average_last!r}")
        if self.stratify and not self.shuffle:
            raise ValueError("stratify orders the shuffled data: it needs shuffle=True")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be a positive int or None, got {self.patience!r}")
