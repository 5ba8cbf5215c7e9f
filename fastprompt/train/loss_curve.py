"""The loss-curve figure of a training run (``loss_curve.png``), drawn with matplotlib when it is installed."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fastprompt import io

PLOT_NAME = "loss_curve.png"


def plot_loss_curve(records: list[dict], path, *, say: Callable[[str], None] = print) -> Path | None:
    """Training loss per step (and eval loss where evaluated) from a run's log records, as a PNG at `path`.

    Returns the path, or None when nothing was drawn: no training records, or matplotlib is not installed
    (an optional dependency: the `demo` and `bench` extras have it), which `say` reports in one line.
    """
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    path = Path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say(f"matplotlib is not installed: skipped the loss curve {path.name} (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
