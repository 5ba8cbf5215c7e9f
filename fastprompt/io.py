"""Checkpoints: PEFT-compatible adapter folders and fastprompt training checkpoints, written atomically.

Adapter folder (PEFT's layout): `adapter_config.json` with PEFT's field names and
`adapter_model.safetensors` with PEFT's keys (`prompt_embeddings`; MPT adds `prefix_task_cols` and
`prefix_task_rows`). `peft.PeftModel.from_pretrained` reads what fastprompt writes and vice versa.

Training checkpoint: everything PEFT's adapter file throws away (P-tuning encoders, the prefix MLP),
plus optimizer, RNG and step state, so training resumes exactly.

All or nothing, whole folders: `save_pretrained` and `save_training_checkpoint` write everything into a
new sibling folder (`.<name>.<random>.tmp`) and switch it with the old folder in one atomic exchange
(`renameat2(RENAME_EXCHANGE)` on Linux), so a reader, or a run killed at any moment, sees either the whole
previous save or the whole new one, never files of two saves. Files and folders are fsynced before the
exchange and the parent after it, so the same holds after a power cut. A mount point cannot be exchanged:
a save into one switches its entries one by one instead. Files of the old folder that the new save
does not own (a tokenizer, other adapters, a run's checkpoints) are carried over as hard links. A killed
save leaves only its sibling temporaries, which the next save into that folder removes. One writer per
folder at a time.
"""

from __future__ import annotations

import ctypes
import glob
import json
import math
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastprompt.config import FASTPROMPT_FIELDS

CONFIG_NAME = "adapter_config.json"
EXTRAS_NAME = "fastprompt_config.json"  # fastprompt's own config fields (FASTPROMPT_FIELDS), when set
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
TRAINING_STATE_NAME = "fastprompt_training_state.safetensors"
TRAINING_META_NAME = "fastprompt_training_state.json"
OPTIMIZER_NAME = "optimizer.pt"
RNG_NAME = "rng_state.pt"


TRAINING_NAMES = (TRAINING_STATE_NAME, TRAINING_META_NAME, OPTIMIZER_NAME, RNG_NAME)
ADAPTER_NAMES = (CONFIG_NAME, EXTRAS_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME)
# adapter_config.json fields and the JSON types they take (None is allowed for all but peft_type)
_CONFIG_TYPES = {
    "peft_type": (str,), "task_type": (str,), "prompt_tuning_init": (str,), "prompt_tuning_init_text": (str,),
    "tokenizer_name_or_path": (str,), "encoder_reparameterization_type": (str,), "init_weights": (str,),
    "base_model_name_or_path": (str,), "revision": (str,), "prompt_tuning_init_state_dict_path": (str,),
    "num_virtual_tokens": (int,), "token_dim": (int,), "num_transformer_submodules": (int,),
    "num_attention_heads": (int,), "num_layers": (int,), "encoder_hidden_size": (int,),
    "encoder_num_layers": (int,), "prompt_tuning_init_task": (int,), "num_ranks": (int,), "num_tasks": (int,),
    "inference_mode": (bool,), "prefix_projection": (bool,), "encoder_dropout": (int, float),
}
_staging = threading.local()  # the staging folders this thread is writing (see atomic_folder)


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _inside_staging(path: Path) -> bool:
    return any(root == path or root in path.parents for root in getattr(_staging, "roots", ()))


@contextmanager
def atomic_folder(folder) -> Iterator[Path]:
    """Yield an empty folder to write a save into; on success it replaces `folder` in one atomic exchange
    (the old folder's other files carried over, see the module docstring), on failure it is removed and
    `folder` is untouched. Everything written is fsynced, with its folder, before the exchange, and the
    parent after it, so a power cut leaves the old save or the new one, never empty files.

    A mount point cannot be renamed: there the save is written into a temporary folder inside it and its
    entries are switched in one by one (each file or subfolder atomically, the folder as a whole not).
    Inside another atomic_folder's staging folder it yields `folder` itself: the outer switch covers it."""
    target = Path(os.path.realpath(folder))  # through a symlink: the folder it names is switched, not the link
    if _inside_staging(target):
        target.mkdir(parents=True, exist_ok=True)
        yield target
        return
    if target.exists() and not target.is_dir():
        raise ValueError(f"{str(target)!r} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    in_place = os.path.ismount(target)
    home = target if in_place else target.parent
    _remove_temporaries(home, target.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=home))
    # mkdtemp's folder is private (0700); the saved folder keeps the old one's mode, or the umask's default.
    os.chmod(staging, target.stat().st_mode & 0o7777 if target.is_dir() else 0o777 & ~_umask())
    roots = _staging.__dict__.setdefault("roots", [])
    roots.append(staging)
    try:
        yield staging
        if target.is_dir():
            _carry(target, staging)
        _fsync_tree(staging)
        if in_place:
            _switch_entries(staging, target)
            _fsync_path(target)
            return
        cwd = os.getcwd()
        _switch(staging, target)
        _fsync_path(target.parent)
        if cwd == str(target) or cwd.startswith(str(target) + os.sep):
            os.chdir(cwd)  # the process stood in the old folder, about to be removed: move it to the new one
    finally:
        roots.remove(staging)
        shutil.rmtree(staging, ignore_errors=True)  # the previous folder after a switch, else the failed save


def _fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and folder under `root` (symlinks are not followed), folders after their
    entries."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder, name)
            if not path.is_symlink():
                _fsync_path(path)
        _fsync_path(Path(folder))


def _switch_entries(staging: Path, target: Path) -> None:
    """Move the complete new save in `staging` (which lies inside `target`) into `target` entry by entry:
    files by rename, subfolders by `_switch`; entries of `target` that the new save does not hold go into
    `staging`, to be removed with it."""
    written = {entry.name for entry in os.scandir(staging)}
    for name in written:
        source, dest = staging / name, target / name
        if source.is_dir() and not source.is_symlink():
            _switch(source, dest)
        else:
            os.replace(source, dest)
    for entry in os.scandir(target):
        if entry.name not in written and not _is_temporary(entry.name):
            os.rename(entry.path, staging / entry.name)


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (another thread may be creating
    files); elsewhere set and restored."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_temporaries(home: Path, name: str) -> None:
    """What killed saves of `name` left in `home` (its parent, or the folder itself for a mount point)."""
    for path in home.glob(f".{glob.escape(name)}.*.tmp"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _carry(old: Path, new: Path) -> None:
    """Hard-link into `new` what `old` holds and the new save neither wrote nor owns: a written adapter
    folder owns every adapter file name in it, a written training checkpoint every training file name (an
    optimizer state the new save did not write must not survive from an older step), and the root's
    adapter files too. Stray temporaries are left behind."""
    owned = set(ADAPTER_NAMES) if (new / CONFIG_NAME).exists() else set()
    if (new / TRAINING_META_NAME).exists():
        owned |= set(TRAINING_NAMES) | set(ADAPTER_NAMES)
    for entry in os.scandir(old):
        source, dest = Path(entry.path), new / entry.name
        if _is_temporary(entry.name) or entry.name in owned:
            continue
        if entry.is_dir(follow_symlinks=False):
            dest.mkdir(exist_ok=True)
            _carry(source, dest)
        elif not os.path.lexists(dest):
            if entry.is_symlink():
                os.symlink(os.readlink(source), dest)
            else:
                try:
                    os.link(source, dest)
                except OSError:  # a file system without hard links
                    shutil.copy2(source, dest)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _switch(staging: Path, target: Path) -> None:
    """Put `staging` at `target` in one step; afterwards `staging` holds what was at `target`, if anything."""
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(staging), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE) == 0:
            return
        errno = ctypes.get_errno()
        if errno not in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: no exchange here; else a real failure
            raise OSError(errno, f"could not switch {str(target)!r} to the new save: {os.strerror(errno)}")
    # Without an atomic exchange: two renames, and a reader may find no folder between them (never a
    # mixed one).
    previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.rename(target, previous / "previous")
    os.rename(staging, target)
    os.rename(previous / "previous", staging)
    previous.rmdir()


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) for a temporary file beside `path`, then fsync it and rename it over `path`, and
    fsync the folder (inside an atomic_folder's staging folder, its own fsync before the switch covers it).
    The file gets the umask's default mode (0644 under umask 022), as `open` would give it, not mkstemp's
    private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    staged = _inside_staging(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if not staged:
            _fsync_path(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not staged:
        _fsync_path(path.parent)


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_tensors(path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file (or a torch .bin/.pt state dict); ValueError naming the file if it
    is missing, corrupt or not a dict of tensors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    # Unpickling garbage raises almost anything (UnpicklingError, EOFError, UnicodeDecodeError, ...): all
    # of it means this file cannot be read.
    except Exception as error:
        raise ValueError(f"checkpoint file {str(path)!r} is corrupt or unreadable: {type(error).__name__}: "
                         f"{error}") from error
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise ValueError(f"checkpoint file {str(path)!r} does not hold a dict of named tensors")
    return tensors


def adapter_folder(root, adapter_name: str, default_name: str = "default") -> Path:
    """PEFT's convention: the default adapter at the root, others in a subfolder named after them."""
    root = Path(root)
    return root if adapter_name == default_name else root / adapter_name


def save_adapter(folder, config_dict: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write one adapter in PEFT's layout, all or nothing (`atomic_folder`): adapter_config.json holds PEFT's
    fields only, so PEFT loads it without a warning; fastprompt's own (`FASTPROMPT_FIELDS`), where set, go
    to fastprompt_config.json beside it."""
    extras = {key: config_dict[key] for key in FASTPROMPT_FIELDS if config_dict.get(key) not in (None, False)}
    with atomic_folder(folder) as staging:
        write_tensors(staging / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        write_json(staging / CONFIG_NAME, {k: v for k, v in config_dict.items() if k not in FASTPROMPT_FIELDS})
        if extras:
            write_json(staging / EXTRAS_NAME, extras)


def load_adapter_files(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, tensors) of a PEFT or fastprompt adapter folder; ValueError naming the file when a
    file is unreadable, a config field has the wrong JSON type, or a tensor is not floating point or not
    finite (a NaN or inf prompt gives non-finite logits to every row that reads it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"adapter folder {str(folder)!r} does not exist")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"adapter folder {str(folder)!r} has no {CONFIG_NAME}")
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(config_path)!r} is not UTF-8 text: {error}") from error
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{str(config_path)!r} is not valid JSON: {error}") from error
    _check_config(config_path, config)
    if (folder / EXTRAS_NAME).is_file():
        config = {**config, **_read_extras(folder / EXTRAS_NAME)}
    weights = folder / WEIGHTS_NAME
    if not weights.is_file() and (folder / LEGACY_WEIGHTS_NAME).is_file():
        weights = folder / LEGACY_WEIGHTS_NAME
    tensors = read_tensors(weights)
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise ValueError(f"{str(weights)!r}: tensor {key!r} must be floating point, got {value.dtype}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{str(weights)!r}: tensor {key!r} holds NaN or inf values")
    return config, tensors


def _read_extras(path: Path) -> dict:
    """fastprompt_config.json: an object of FASTPROMPT_FIELDS, each of its type (a list of strings, or a bool)."""
    extras = read_json_object(path)
    for key, value in extras.items():
        if key not in FASTPROMPT_FIELDS:
            raise ValueError(f"{str(path)!r}: unknown field {key!r}; expected some of {sorted(FASTPROMPT_FIELDS)}")
        if FASTPROMPT_FIELDS[key] == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{str(path)!r}: {key} must be true or false, got {value!r}")
        elif not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"{str(path)!r}: {key} must be a list of strings, got {value!r}")
    return extras


def _check_config(path: Path, config) -> None:
    if not isinstance(config, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(config).__name__}")
    for key, types in _CONFIG_TYPES.items():
        value = config.get(key)
        if value is None and key != "peft_type":
            continue
        # bool is an int in Python, not in JSON; a float field takes any finite number
        if (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
                or (float in types and not math.isfinite(value))):
            names = " or ".join({str: "a string", int: "an integer", bool: "true or false",
                                 float: "a number"}[t] for t in types if not (t is int and float in types))
            raise ValueError(f"{str(path)!r}: {key} must be {names}, got {value!r}")


def save_training_checkpoint(folder, model, optimizer: torch.optim.Optimizer | None = None,
                             step: int = 0, extra: dict | None = None) -> None:
    """Everything needed to resume: full prompt-source parameters (encoders included), optimizer,
    RNG state and step. Also writes the PEFT-format adapters beside it (`model.save_pretrained`). All or
    nothing (`atomic_folder`): the folder holds one step, this one or the previous save's."""
    tensors = {f"{name}.{key}": value for name, source in model.prompt_sources.items()
               for key, value in source.state_dict().items()}
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    configs = {name: {**cfg.to_dict(), "inference_mode": False} for name, cfg in model.peft_config.items()}
    with atomic_folder(folder) as staging:
        write_tensors(staging / TRAINING_STATE_NAME, tensors)
        if optimizer is not None:
            atomic_write(staging / OPTIMIZER_NAME, lambda tmp: torch.save(optimizer.state_dict(), tmp))
        atomic_write(staging / RNG_NAME, lambda tmp: torch.save(rng, tmp))
        model.save_pretrained(staging)
        write_json(staging / TRAINING_META_NAME, {"step": step, "configs": configs,
                                                  "active_adapter": model.active_adapter, "extra": extra or {}})


def load_training_checkpoint(folder, model, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore what `save_training_checkpoint` wrote into `model` (and `optimizer`); returns the metadata
    ({"step", "configs", "active_adapter", "extra"}). The model must have the same adapters.

    Nothing in the folder can run code: the optimizer and RNG states are read with `weights_only=True`
    (tensors, numbers, strings and containers only), and a file that needs more is refused. Every file is
    read and checked before anything is restored, so a refused checkpoint changes neither the model, nor
    the optimizer, nor the RNG. ValueError naming the file when one is missing, corrupt or not finite."""
    folder = Path(folder)
    meta_path = folder / TRAINING_META_NAME
    if not meta_path.is_file():
        raise ValueError(f"{str(folder)!r} is not a fastprompt training checkpoint (no {TRAINING_META_NAME})")
    meta = read_json_object(meta_path)
    tensors = read_tensors(folder / TRAINING_STATE_NAME)
    _check_finite(folder / TRAINING_STATE_NAME, tensors)
    own_by_source = {}
    for name, source in model.prompt_sources.items():
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        missing = sorted(set(source.state_dict()) - set(own))
        if missing:
            raise ValueError(f"training checkpoint {str(folder)!r} has no tensors {missing} for adapter {name!r}")
        own_by_source[name] = own
    optimizer_state = _load_state(folder / OPTIMIZER_NAME) if optimizer is not None else None
    if optimizer_state is not None:
        _check_finite(folder / OPTIMIZER_NAME, optimizer_state)
    rng = _load_state(folder / RNG_NAME)
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor):
        raise ValueError(f"{str(folder / RNG_NAME)!r} is not an RNG state (a dict with a 'cpu' byte tensor)")
    for name, source in model.prompt_sources.items():
        source.load_state_dict(own_by_source[name])
    if optimizer is not None:
        _load_optimizer_state(optimizer, optimizer_state)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return meta


# How an optimizer computes, not what it learned: the run's own, whatever run saved the checkpoint.
OPTIMIZER_IMPLEMENTATION = ("lr", "capturable", "foreach", "fused", "differentiable")


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict(state), keeping this run's implementation options (a CUDA-graph step's
    learning-rate tensor and capturable AdamW, or an eager run's float and plain AdamW: a run resumes from a
    checkpoint of either), with each step count where that implementation keeps it (a capturable one on its
    parameter's device, else on the CPU). The learning rate is the run's schedule's, set every step."""
    own = [{k: group[k] for k in OPTIMIZER_IMPLEMENTATION if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, options in zip(optimizer.param_groups, own):
        group.update(options)
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                optimizer.state[p]["step"] = step.to(p.device if group.get("capturable") else "cpu")


def _load_state(path: Path):
    """A torch-saved state (optimizer, RNG) read with weights_only=True: unpickling is restricted to
    tensors, numbers, strings and containers, so a planted payload is refused, never run."""
    if not path.is_file():
        raise ValueError(f"checkpoint file {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for a forbidden global, EOFError/RuntimeError when cut short
        raise ValueError(f"checkpoint file {str(path)!r} is corrupt or holds more than tensors and plain "
                         f"values (refused: loading it could run code): {type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}") from error


def _check_finite(path: Path, state) -> None:
    """ValueError naming `path` if any floating-point tensor in `state` (nested dicts/lists) has NaN or inf."""
    stack = [state]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"checkpoint file {str(path)!r} holds NaN or inf values")
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"checkpoint file {str(path)!r} holds NaN or inf values")


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; ValueError naming the file when it is missing, truncated or not an object."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file {str(path)!r} does not exist")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{str(path)!r} is corrupt (not valid UTF-8 JSON): {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(value).__name__}")
    return value
