"""Training soft prompts: data loading, a Trainer and the `fastprompt train` / `fastprompt eval` commands;
MPT source training and target adaptation (`fastprompt.train.mpt`), SPoT transfer (`fastprompt.train.spot`),
data-parallel and FSDP runs under torchrun (`fastprompt.train.distributed`).

    from fastprompt.train import Trainer, TrainingConfig, load_data, task_model
"""

from fastprompt.train.data import Example, PromptDataset, collate, load_data, micro_batch_indices, read_records
from fastprompt.train.distributed import Distributed
from fastprompt.train.trainer import (
    TrainResult,
    Trainer,
    TrainingConfig,
    latest_checkpoint,
    lr_factor,
    make_optimizer,
    plot_loss_curve,
    read_log,
    target_count,
    task_model,
)

__all__ = [
    "Distributed",
    "Example",
    "PromptDataset",
    "TrainResult",
    "Trainer",
    "TrainingConfig",
    "collate",
    "latest_checkpoint",
    "load_data",
    "lr_factor",
    "make_optimizer",
    "micro_batch_indices",
    "plot_loss_curve",
    "read_log",
    "read_records",
    "target_count",
    "task_model",
]
