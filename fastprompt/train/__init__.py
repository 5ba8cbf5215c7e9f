"""Training soft prompts: data loading, a Trainer and the `fastprompt train` / `fastprompt eval` commands;
MPT source training and target adaptation (`fastprompt.train.mpt`), SPoT transfer (`fastprompt.train.spot`),
data-parallel and FSDP runs under torchrun (`fastprompt.train.distributed`).

    from fastprompt.train import Trainer, TrainingConfig, load_data, task_model
"""

from fastprompt.train.checkpoints import latest_checkpoint
from fastprompt.train.config import TrainingConfig
from fastprompt.train.data import Example, PromptDataset, collate, load_data, micro_batch_indices, read_records
from fastprompt.train.distributed import Distributed
from fastprompt.train.log import read_log
from fastprompt.train.loss_curve import plot_loss_curve
from fastprompt.train.optim import lr_factor, make_optimizer
from fastprompt.train.trainer import TrainResult, Trainer, target_count, task_model

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
