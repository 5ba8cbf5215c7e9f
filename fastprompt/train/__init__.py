"""Training soft prompts: data loading, a Trainer and the `fastprompt train` / `fastprompt eval` commands;
MPT source training and target adaptation (`fastprompt.train.mpt`), SPoT transfer (`fastprompt.train.spot`),
data-parallel and FSDP runs under torchrun (`fastprompt.train.distributed`).

    from fastprompt.train import Trainer, TrainingConfig, load_data, task_model

Exports are imported on first use (fastprompt._lazy), so the `fastprompt` command's parser does not import
torch.
"""

from fastprompt._lazy import lazy_exports

_EXPORTS = {
    "latest_checkpoint": "fastprompt.train.checkpoints",
    "CudaGraphLoss": "fastprompt.train.cuda_graphs",
    "CudaGraphStep": "fastprompt.train.cuda_graphs",
    "TrainingConfig": "fastprompt.train.config",
    "Example": "fastprompt.train.data",
    "PromptDataset": "fastprompt.train.data",
    "collate": "fastprompt.train.data",
    "load_data": "fastprompt.train.data",
    "micro_batch_indices": "fastprompt.train.data",
    "read_records": "fastprompt.train.data",
    "Distributed": "fastprompt.train.distributed",
    "read_log": "fastprompt.train.log",
    "plot_loss_curve": "fastprompt.train.loss_curve",
    "adamw_for_graphs": "fastprompt.train.optim",
    "lr_factor": "fastprompt.train.optim",
    "make_optimizer": "fastprompt.train.optim",
    "TrainResult": "fastprompt.train.trainer",
    "Trainer": "fastprompt.train.trainer",
    "target_count": "fastprompt.train.trainer",
    "task_model": "fastprompt.train.trainer",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
