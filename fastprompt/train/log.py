"""The JSON-lines log of a training run (``train_log.jsonl``): one record per optimizer step and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from fastprompt import io

LOG_NAME = "train_log.jsonl"


def read_log(path) -> list[dict]:
    """The records of a run's log, oldest first; [] when there is no log yet."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_record(path: Path, record: dict) -> None:
    """Add one record to the end of the log."""
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop the records an interrupted run wrote after the checkpoint's step."""
    kept = [r for r in read_log(path) if r.get("step", 0) <= step]
    io.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))
