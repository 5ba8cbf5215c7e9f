"""Checkpoints: PEFT-compatible adapter folders and fastprompt training checkpoints, written atomically.

Adapter folder (PEFT's layout): `adapter_config.json` with PEFT's field names and
`adapter_model.safetensors` with PEFT's keys (`prompt_embeddings`; MPT adds `prefix_task_cols` and
`prefix_task_rows`). `peft.PeftModel.from_pretrained` reads what fastprompt writes and vice versa.

Training checkpoint: everything PEFT's adapter file throws away (P-tuning encoders, the prefix MLP),
plus optimizer, RNG and step state, so training resumes exactly.

Every file is written to a temporary name in its folder and renamed into place, so a failure never
leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
TRAINING_STATE_NAME = "fastprompt_training_state.safetensors"
TRAINING_META_NAME = "fastprompt_training_state.json"
OPTIMIZER_NAME = "optimizer.pt"
RNG_NAME = "rng_state.pt"


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) for a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_tensors(path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file (or a torch .bin/.pt state dict); ValueError if missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as error:
        raise ValueError(f"checkpoint file {str(path)!r} is corrupt or unreadable: {error}") from error


def adapter_folder(root, adapter_name: str, default_name: str = "default") -> Path:
    """PEFT's convention: the default adapter at the root, others in a subfolder named after them."""
    root = Path(root)
    return root if adapter_name == default_name else root / adapter_name


def save_adapter(folder, config_dict: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write one adapter in PEFT's layout."""
    folder = Path(folder)
    write_tensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    write_json(folder / CONFIG_NAME, config_dict)


def load_adapter_files(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, tensors) of a PEFT or fastprompt adapter folder, with errors naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"adapter folder {str(folder)!r} does not exist")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"adapter folder {str(folder)!r} has no {CONFIG_NAME}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(config_path)!r} is not valid JSON: {error}") from error
    weights = folder / WEIGHTS_NAME
    if not weights.is_file() and (folder / LEGACY_WEIGHTS_NAME).is_file():
        weights = folder / LEGACY_WEIGHTS_NAME
    return config, read_tensors(weights)


def save_training_checkpoint(folder, model, optimizer: torch.optim.Optimizer | None = None,
                             step: int = 0, extra: dict | None = None) -> None:
    """Everything needed to resume: full prompt-source parameters (encoders included), optimizer,
    RNG state and step. Also writes the PEFT-format adapters beside it (`model.save_pretrained`)."""
    folder = Path(folder)
    tensors = {f"{name}.{key}": value for name, source in model.prompt_sources.items()
               for key, value in source.state_dict().items()}
    write_tensors(folder / TRAINING_STATE_NAME, tensors)
    if optimizer is not None:
        atomic_write(folder / OPTIMIZER_NAME, lambda tmp: torch.save(optimizer.state_dict(), tmp))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    atomic_write(folder / RNG_NAME, lambda tmp: torch.save(rng, tmp))
    configs = {name: {**cfg.to_dict(), "inference_mode": False} for name, cfg in model.peft_config.items()}
    write_json(folder / TRAINING_META_NAME, {"step": step, "configs": configs,
                                             "active_adapter": model.active_adapter, "extra": extra or {}})
    model.save_pretrained(folder)


def load_training_checkpoint(folder, model, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore what `save_training_checkpoint` wrote into `model` (and `optimizer`); returns the metadata
    ({"step", "configs", "active_adapter", "extra"}). The model must have the same adapters."""
    folder = Path(folder)
    meta_path = folder / TRAINING_META_NAME
    if not meta_path.is_file():
        raise ValueError(f"{str(folder)!r} is not a fastprompt training checkpoint (no {TRAINING_META_NAME})")
    meta = json.loads(meta_path.read_text())
    tensors = read_tensors(folder / TRAINING_STATE_NAME)
    for name, source in model.prompt_sources.items():
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        missing = sorted(set(source.state_dict()) - set(own))
        if missing:
            raise ValueError(f"training checkpoint {str(folder)!r} has no tensors {missing} for adapter {name!r}")
        source.load_state_dict(own)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=False))
    rng = torch.load(folder / RNG_NAME, weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return meta
