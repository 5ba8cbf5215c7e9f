"""A training run's ``checkpoint-<step>`` folders: finding them, and what the Trainer saves in them besides
`io.save_training_checkpoint`'s prompt parameters, optimizer and RNG state (the data order, the
early-stopping state, the grad scaler and the run's options), so that a resumed run continues exactly."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from fastprompt import io

CHECKPOINT_PREFIX = "checkpoint-"


def list_checkpoints(output_dir) -> list[Path]:
    """The ``checkpoint-<step>`` folders of a run, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / io.TRAINING_META_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(output_dir) -> Path | None:
    """The newest ``checkpoint-<step>`` folder of a run, or None when it has none."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir: Path, step: int, model, optimizer, *, state: dict, scaler, data_order: dict,
                    config) -> Path:
    """`io.save_training_checkpoint` into ``output_dir/checkpoint-<step>`` plus the trainer's `state`
    (best metric, evaluations without gain, tokens seen), the grad scaler, the `data_order` that fixes each
    step's examples and the run's `TrainingConfig`; then keep only the newest ``config.keep_checkpoints``."""
    folder = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    extra = {"trainer": {
        **state,    # best metric and its step, evaluations without gain, tokens seen: load_checkpoint reads them back
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "data": {**data_order, "next_step": step, "shuffle": config.shuffle},
        "config": asdict(config)}}
    io.save_training_checkpoint(folder, model, optimizer, step, extra=extra)
    if config.keep_checkpoints:
        for old in list_checkpoints(output_dir)[:-config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(folder, model, optimizer, *, state: dict, scaler, data_order: dict) -> int:
    """Restore a `save_checkpoint` folder into the model, optimizer, `state` (updated in place) and grad
    scaler; returns its step. Refuses a checkpoint whose data order differs from `data_order`, since the
    resumed steps would then see other examples than the interrupted run's."""
    meta = io.load_training_checkpoint(folder, model, optimizer)
    saved = meta["extra"].get("trainer", {})
    data = saved.get("data", {})
    changed = {k: (data.get(k), v) for k, v in data_order.items() if data.get(k, v) != v}
    if changed:
        raise ValueError(f"resume: the data order would differ from the checkpoint's ({changed}: "
                         f"(checkpoint, now)); use the same seed, batch size and data")
    state.update({k: saved[k] for k in state if k in saved})
    if saved.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(saved["scaler"])
    return int(meta["step"])
