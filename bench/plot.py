"""PNG plots drawn from the JSON results of `python -m bench`.

    python -m bench.plot bench/results/training-*.json bench/results/serving-*.json [--out DIR]

One figure per (model, dtype, device) found, each line a provider with status "ok":
- training-throughput-vs-seq-len-<model>-<dtype>.png: tokens/s against sequence length (the rows of
  `--sweep` with sweep == "seq_len");
- training-throughput-vs-num-virtual-<model>-<dtype>.png: tokens/s against the prompt's length P (sweep ==
  "num_virtual");
- training-memory-vs-batch-<model>-<dtype>.png: peak CUDA memory (or, where the device measures none,
  the activations saved for the backward) against batch size (sweep == "batch");
- serving-latency-vs-tasks-<model>-<dtype>.png: tokens/s, time to first token and inter-token latency
  (p50) against the number of distinct tasks.
A figure whose rows are absent (no sweep was run) is not drawn. matplotlib is imported only here.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from fastprompt.io import atomic_write


def load_rows(paths) -> list[dict]:
    """Every row of the given JSON result files, in order. ValueError naming a file that is not a list
    of rows."""
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{path}: expected a JSON list of result rows, as written by python -m bench")
        rows += data
    return rows


def _groups(rows: list[dict], keep) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("status") == "ok" and keep(row):
            groups.setdefault((row["model"], row["dtype"], row.get("device")), []).append(row)
    return groups


def _lines(ax, rows: list[dict], x: str, y: str) -> None:
    """One line per provider of y against x (log2 x axis ticked at the data), in the providers' order."""
    from matplotlib.ticker import NullFormatter

    for provider in dict.fromkeys(r["provider"] for r in rows):
        points = sorted((r[x], r[y]) for r in rows if r["provider"] == provider and r.get(y) is not None)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
    xs = sorted({r[x] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(v) for v in xs])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, alpha=0.3)


def _throughput_vs_seq_len(fig, rows: list[dict]) -> None:
    ax = fig.add_subplot()
    _lines(ax, rows, "seq_len", "tokens_per_s")
    ax.set(xlabel="sequence length (tokens per row)", ylabel="training tokens/s")
    ax.set_title(f"{rows[0]['method']}, batch {rows[0]['batch']}", fontsize=9)


def _throughput_vs_num_virtual(fig, rows: list[dict]) -> None:
    ax = fig.add_subplot()
    _lines(ax, rows, "num_virtual_tokens", "tokens_per_s")
    ax.set(xlabel="virtual tokens (P)", ylabel="training tokens/s")
    ax.set_title(f"{rows[0]['method'].rsplit('-P', 1)[0]}, batch {rows[0]['batch']}, sequence length "
                 f"{rows[0]['seq_len']}", fontsize=9)


def _memory_vs_batch(fig, rows: list[dict]) -> None:
    metric = "peak_mb" if any(r.get("peak_mb") is not None for r in rows) else "saved_mb"
    ax = fig.add_subplot()
    _lines(ax, rows, "batch", metric)
    ax.set(xlabel="batch (rows)", ylabel="peak memory of a step (MiB)" if metric == "peak_mb" else
           "activations saved for backward (MiB)")
    ax.set_title(f"{rows[0]['method']}, sequence length {rows[0]['seq_len']}", fontsize=9)


def _latency_vs_tasks(fig, rows: list[dict]) -> None:
    panels = (("tokens_per_s", "generated tokens/s"), ("ttft_ms_p50", "time to first token p50 (ms)"),
              ("itl_ms_p50", "inter-token latency p50 (ms)"))
    for i, (metric, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        _lines(ax, rows, "n_tasks", metric)
        ax.set(xlabel="distinct tasks in the batch", ylabel=label)
    ax.set_title(f"{rows[0]['rows']} rows, {rows[0]['new_tokens']} new tokens each", fontsize=9)


# (file stem, which rows, how to draw them, figure width in inches)
FIGURES = (
    ("training-throughput-vs-seq-len", lambda r: r.get("suite") == "training" and r.get("sweep") == "seq_len",
     _throughput_vs_seq_len, 6.5),
    ("training-throughput-vs-num-virtual",
     lambda r: r.get("suite") == "training" and r.get("sweep") == "num_virtual", _throughput_vs_num_virtual, 6.5),
    ("training-memory-vs-batch", lambda r: r.get("suite") == "training" and r.get("sweep") == "batch",
     _memory_vs_batch, 6.5),
    ("serving-latency-vs-tasks", lambda r: r.get("suite") == "serving", _latency_vs_tasks, 13),
)


def _save(fig, out_dir: Path, stem: str, group: tuple, date: str | None) -> Path:
    """Title the figure with what was measured where and when, and write <stem>-<model>-<dtype>.png."""
    model, dtype, device = group
    fig.suptitle(f"{model}, {dtype}, {device or 'unknown device'}" + (f", {date}" if date else ""))
    path = Path(out_dir) / f"{stem}-{re.sub(r'[^A-Za-z0-9._-]+', '-', f'{model}-{dtype}')}.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return path


def draw_rows(rows: list[dict], out_dir) -> list[Path]:
    """Draw every figure the rows allow (module docstring) into out_dir; returns the PNG paths."""
    from matplotlib.figure import Figure

    written = []
    for stem, keep, plot, width in FIGURES:
        for group, members in _groups(rows, keep).items():
            fig = Figure(figsize=(width, 4.2))
            plot(fig, members)
            fig.axes[0].legend(fontsize=8)
            written.append(_save(fig, out_dir, stem, group, members[0].get("date")))
    return written


def draw(paths, out_dir) -> list[Path]:
    """Draw the figures of the rows in the JSON files `paths` into out_dir; returns the PNG paths."""
    return draw_rows(load_rows(paths), out_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by python -m bench")
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: beside the first JSON file)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        parser.error(f"no such results file: {', '.join(missing)}")
    paths = draw(args.results, args.out or args.results[0].parent)
    for path in paths:
        print(f"plotted {path}")
    if not paths:
        print("nothing to plot: no training sweep rows (python -m bench --sweep) and no serving rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
