"""SPoT driver (Vu et al. 2022): prompts from training runs, the similarity report, the transferred target.

    fastprompt train --method prompt-tuning --data a=A.jsonl --data b=B.jsonl --out sources   # source prompts
    fastprompt train --method prompt-tuning --data t=T.jsonl --steps 50 --out probe          # target embedding
    fastprompt spot-rank --sources sources --targets probe --out spot      # similarity.csv/.png, ranking.json
    fastprompt spot-transfer --model M --sources sources --target-prompt probe --data t=T.jsonl --out target

In Python:

    sources, probe = load_prompts("sources"), load_prompts("probe")
    report = compare(probe, sources, metric="average")
    write_report(report, "spot")
    ranking = [name for name, _ in report.ranking("t")]
    model = spot_target_model(base, transfer_prompt(sources, ranking, top_k=3), tasks=["t"])
    Trainer(model, TrainingConfig(...), target_data, tasks=["t"]).train()

The similarity measures and the transfer rule live in `fastprompt.methods.spot`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fastprompt import io
from fastprompt.methods import P_TUNING, PROMPT_TUNING, PromptTuningConfig, as_fastprompt_config
from fastprompt.methods.spot import rank_sources, similarity_matrix

CSV_NAME = "similarity.csv"
PLOT_NAME = "similarity.png"
RANKING_NAME = "ranking.json"
RUN_DATA_NAME = "fastprompt_data.json"   # what `fastprompt train` writes beside its adapters


def load_prompts(folder) -> dict[str, torch.Tensor]:
    """Task name -> prompt [P, d] (fp32, CPU) of the prompt-tuning or P-tuning adapters in `folder`.

    A `fastprompt train` output with several tasks holds one subfolder per task (listed in its
    fastprompt_data.json); otherwise the root adapter is taken, named after the folder, plus every
    subfolder holding an adapter (checkpoints and best/ excepted).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"prompt folder {str(folder)!r} does not exist")
    run = json.loads((folder / RUN_DATA_NAME).read_text()) if (folder / RUN_DATA_NAME).is_file() else {}
    if run.get("tasks"):
        places = {task: folder / task for task in run["tasks"]}
    else:
        places = {folder.resolve().name: folder} if (folder / io.CONFIG_NAME).is_file() else {}
        places.update({p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and (p / io.CONFIG_NAME).is_file()
                       and p.name != "best" and not p.name.startswith("checkpoint-")})
    if not places:
        raise ValueError(f"{str(folder)!r} holds no adapter ({io.CONFIG_NAME} not found)")
    prompts = {}
    for task, place in places.items():
        config_dict, tensors = io.load_adapter_files(place)
        config = as_fastprompt_config(config_dict)
        if config.peft_type not in (PROMPT_TUNING, P_TUNING):
            raise ValueError(f"{str(place)!r} is a {config.peft_type} adapter; SPoT compares prompt-tuning or "
                             "P-tuning prompts")
        prompts[task] = tensors["prompt_embeddings"].float()
    return prompts


@dataclass
class SimilarityReport:
    """Similarities of target prompts (rows) to source prompts (columns) under one metric."""

    metric: str
    targets: list[str]
    sources: list[str]
    matrix: torch.Tensor          # [len(targets), len(sources)] fp32

    def ranking(self, target: str) -> list[tuple[str, float]]:
        """The sources for `target`, most similar first; a source of the target's own name is left out
        (a task is not its own source)."""
        if target not in self.targets:
            raise ValueError(f"target {target!r} is not one of {self.targets}")
        row = self.matrix[self.targets.index(target)].tolist()
        return rank_sources({s: v for s, v in zip(self.sources, row) if s != target})


def compare(targets: dict[str, torch.Tensor], sources: dict[str, torch.Tensor],
            metric: str = "average") -> SimilarityReport:
    """The SimilarityReport of every target prompt [P, d] against every source prompt (see
    `fastprompt.methods.spot.similarity_matrix` for the metrics)."""
    matrix = similarity_matrix(list(targets.values()), list(sources.values()), metric)
    return SimilarityReport(metric, list(targets), list(sources), matrix)


def write_report(report: SimilarityReport, out_dir, *, plot: bool = True) -> dict[str, Path]:
    """Write similarity.csv, ranking.json ({"metric", "rankings": {target: [[source, score], ...]}}) and,
    with plot, the heatmap similarity.png into out_dir; each file atomically. Returns name -> path."""
    out_dir = Path(out_dir)
    if plot:
        _pyplot()  # fail before writing anything when matplotlib is missing
    written = {"csv": write_similarity_csv(report, out_dir / CSV_NAME)}
    rankings = {t: [[s, v] for s, v in report.ranking(t)] for t in report.targets}
    io.write_json(out_dir / RANKING_NAME, {"metric": report.metric, "rankings": rankings})
    written["ranking"] = out_dir / RANKING_NAME
    if plot:
        written["plot"] = plot_similarity(report, out_dir / PLOT_NAME)
    return written


def write_similarity_csv(report: SimilarityReport, path) -> Path:
    """The matrix as CSV: a header ``target,<source>...`` and one row per target (8 significant digits)."""
    path = Path(path)

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["target", *report.sources])
            for name, row in zip(report.targets, report.matrix.tolist()):
                writer.writerow([name, *(f"{v:.8g}" for v in row)])

    io.atomic_write(path, write)
    return path


def plot_similarity(report: SimilarityReport, path) -> Path:
    """The matrix as an annotated heatmap PNG (matplotlib, Agg backend). The colours span the matrix's own
    range, not [-1, 1]: prompts tuned from one start are all close to each other, and the ranking lives in
    the small differences. Cells and margins grow with the number and length of the task names."""
    plt = _pyplot()
    path = Path(path)
    matrix = report.matrix.float()
    n_rows, n_cols = matrix.shape
    label_inches = 0.075 * max(len(name) for name in [*report.sources, *report.targets])   # ~8 pt characters
    fig, ax = plt.subplots(figsize=(2.4 + label_inches + 0.75 * n_cols, 1.4 + label_inches + 0.45 * n_rows),
                           layout="constrained")
    low, high = float(matrix.min()), float(matrix.max())
    image = ax.imshow(matrix.numpy(), cmap="viridis", aspect="auto", vmin=low, vmax=high if high > low else low + 1e-6)
    ax.set_xticks(range(n_cols), report.sources, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), report.targets, fontsize=8)
    ax.set_xlabel("source task")
    ax.set_ylabel("target task")
    ax.set_title(f"SPoT prompt similarity\n({report.metric} cosine)", fontsize=10)
    middle = (low + high) / 2
    for i in range(n_rows):
        for j in range(n_cols):
            value = float(matrix[i, j])
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7,
                    color="black" if value > middle else "white")   # viridis is light at the top
    fig.colorbar(image, ax=ax, shrink=0.8)
    try:
        io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the similarity heatmap needs matplotlib (pip install matplotlib), or skip it "
                          "(plot=False, --no-plot)") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def spot_target_model(base_model, start: torch.Tensor, *, tasks: list[str] | None = None, path: str = "auto"):
    """A PromptModel for tuning a SPoT target: prompt-tuning adapters (one per name in `tasks`, or
    "default") of start's length, each starting from `start` [P, d] (`transfer_prompt`'s output)."""
    from fastprompt.train.trainer import task_model

    if start.dim() != 2:
        raise ValueError(f"start must be a prompt [P, d], got shape {tuple(start.shape)}")
    model = task_model(base_model, PromptTuningConfig(num_virtual_tokens=start.shape[0]), list(tasks or []),
                       path=path)
    for name in model.adapter_names:
        model.prompt_sources[name].load_peft_state_dict({"prompt_embeddings": start})
    return model
