"""How much of a recipe's spread over seeds is its held-out rows' noise, and how much the seeds' own.

    python -m bench.seed_spread bench/results/recipes-rows-cpu-x86_64-2026-12-07.jsonl [MORE.jsonl ...]
    python -m bench.seed_spread FILE --compare prompt-tuning:peft-example prompt-tuning:new-peft-schedule

A recipe's seeds are scored on the same held-out rows. Two prompts of equal worth still disagree on some rows, and
on 100 rows a few disagreements are several points of accuracy: the max - min a recipe table shows is the seeds'
own spread (what unlimited held-out rows would show) plus that noise. From each run's answers row by row ("right",
which `bench.recipes` records), a two-way analysis of variance of the seeds x rows table of right (1) and wrong (0),
one answer per cell, splits the two:
- noise: the max - min expected over the seeds from the rows alone, were the seeds of equal worth:
  d_S * sqrt(MS_error / n);
- own: the max - min expected of the seeds' accuracies on unlimited rows: d_S * sqrt(max(0, MS_seed - MS_error) / n);
- p: how often seeds of equal worth spread as far as observed: the share of 10,000 shuffles of each row's answers
  among the seeds whose max - min is at least the observed one.
n is the number of rows, MS_seed = n * (the variance of the seeds' accuracies), MS_error the residual mean square,
d_S the expected range of S standard normal draws (`EXPECTED_RANGE`).

`--compare A B` asks instead whether recipe B's mean accuracy is above recipe A's on each task both were run on:
the difference of the means over seeds and its 95% interval from a two-way bootstrap (`compare`: 10,000 draws,
each redrawing the held-out rows, the same rows for both recipes, and each recipe's seeds), so that the interval
holds both what another draw of test rows and what other seeds would show.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.recipes import recipe_key, study_order

# d_S, the expected max - min of S independent standard normal draws (the d2 constants of quality control)
EXPECTED_RANGE = {2: 1.128, 3: 1.693, 4: 2.059, 5: 2.326, 6: 2.534, 7: 2.704, 8: 2.847, 9: 2.970, 10: 3.078}
SHUFFLES = 10_000
DRAWS = 10_000


def answers(paths: list[Path]) -> dict[tuple[str, str, str], torch.Tensor]:
    """Each (method, task, recipe) of one or more results files with its runs' answers: a (seeds, rows) float tensor
    of 1 (right) and 0 (wrong), seeds in ascending order. Runs without "right" (before it was recorded) are left
    out."""
    runs: dict[tuple[str, str, str], dict[int, str]] = {}
    for record in (json.loads(line) for path in paths for line in path.read_text().splitlines()):
        if "right" in record:
            runs.setdefault(recipe_key(record), {})[record["seed"]] = record["right"]
    table = {}
    for key, by_seed in runs.items():
        lengths = {len(right) for right in by_seed.values()}
        if len(lengths) != 1:
            raise ValueError(f"{key}: every seed must answer the same held-out rows, got row counts {sorted(lengths)}")
        table[key] = torch.tensor([[float(c == "1") for c in by_seed[seed]] for seed in sorted(by_seed)])
    return table


def split_spread(right: torch.Tensor, shuffles: int = SHUFFLES, seed: int = 0) -> dict[str, float]:
    """The spread over seeds of `right` (seeds x rows, float 1/0), split as the module docstring says: its observed
    max - min ("observed"), "noise", "own" and "p"."""
    seeds, rows = right.shape
    if not 2 <= seeds <= max(EXPECTED_RANGE) or rows < 2:
        raise ValueError(f"right must be (2..{max(EXPECTED_RANGE)} seeds, >= 2 rows), got {tuple(right.shape)}")
    accuracy = right.mean(1)
    grand = right.mean()
    residual = right - accuracy[:, None] - right.mean(0)[None, :] + grand
    ms_error = residual.pow(2).sum() / ((seeds - 1) * (rows - 1))
    ms_seed = rows * accuracy.var()
    observed = (accuracy.max() - accuracy.min()).item()
    generator = torch.Generator().manual_seed(seed)
    at_least = 0
    for start in range(0, shuffles, 1000):   # chunks keep the (shuffles, seeds, rows) table small
        count = min(1000, shuffles - start)
        order = torch.rand(count, seeds, rows, generator=generator).argsort(dim=1)
        shuffled = right.expand(count, seeds, rows).gather(1, order).mean(2)
        at_least += int((shuffled.max(1).values - shuffled.min(1).values >= observed - 1e-9).sum())
    d = EXPECTED_RANGE[seeds]
    return {"observed": observed, "noise": d * (ms_error / rows).sqrt().item(),
            "own": d * ((ms_seed - ms_error).clamp(min=0) / rows).sqrt().item(), "p": at_least / shuffles}


def compare(first: torch.Tensor, second: torch.Tensor, draws: int = DRAWS, seed: int = 0) -> dict[str, float]:
    """How far `second`'s mean accuracy is above `first`'s, both (seeds, rows) float tensors of 1 (right) and 0
    (wrong) on the same held-out rows (their seed counts may differ): "difference" (second's mean - first's), its
    95% bootstrap interval "low" and "high", and "above", the share of draws in which second's mean is higher."""
    if first.dim() != 2 or second.dim() != 2 or first.shape[1] != second.shape[1] or first.shape[1] < 2:
        raise ValueError(f"first and second must be (seeds, rows) on the same >= 2 rows, got {tuple(first.shape)} and "
                         f"{tuple(second.shape)}")
    rows = first.shape[1]
    generator = torch.Generator().manual_seed(seed)
    differences = []
    for start in range(0, draws, 1000):   # chunks keep the (draws, seeds, rows) tables small
        count = min(1000, draws - start)
        picked_rows = torch.randint(rows, (count, rows), generator=generator)   # shared: the rows are paired

        def mean(right):   # each draw's mean over its redrawn seeds, then over its redrawn rows
            picked_seeds = torch.randint(right.shape[0], (count, right.shape[0]), generator=generator)
            return right[picked_seeds].mean(1).gather(1, picked_rows).mean(1)

        differences.append(mean(second) - mean(first))
    spread = torch.cat(differences)
    low, high = spread.quantile(torch.tensor([0.025, 0.975], dtype=spread.dtype)).tolist()
    return {"difference": (second.mean() - first.mean()).item(), "low": low, "high": high,
            "above": (spread > 0).float().mean().item()}


def comparison_table(paths: list[Path], first: tuple[str, str], second: tuple[str, str]) -> str:
    """The markdown table of `compare` on every task of the results files where both (method, recipe) have per-row
    answers."""
    runs = answers(paths)
    tasks = sorted({task for method, task, recipe in runs if (method, recipe) == first}
                   & {task for method, task, recipe in runs if (method, recipe) == second})
    if not tasks:
        raise ValueError(f"{', '.join(map(str, paths))}: no task has per-row answers of both {':'.join(first)} and "
                         f"{':'.join(second)}")
    lines = [f"| task | rows | {':'.join(first)} (seeds) | {':'.join(second)} (seeds) | difference | 95% interval | "
             "share of draws above |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for task in tasks:
        a, b = runs[(first[0], task, first[1])], runs[(second[0], task, second[1])]
        c = compare(a, b)
        lines.append(f"| {task} | {a.shape[1]} | {a.mean():.3f} ({a.shape[0]}) | {b.mean():.3f} ({b.shape[0]}) | "
                     f"{c['difference']:+.3f} | {c['low']:+.3f} to {c['high']:+.3f} | {c['above']:.2f} |")
    return "\n".join(lines)


def method_recipe(text: str) -> tuple[str, str]:
    """`--compare`'s METHOD:RECIPE as a (method, recipe) pair."""
    method, colon, recipe = text.partition(":")
    if not colon or not method or not recipe:
        raise argparse.ArgumentTypeError(f"expected METHOD:RECIPE (e.g. prompt-tuning:new), got {text!r}")
    return method, recipe


def table(paths: list[Path]) -> str:
    """The markdown table of `split_spread` for every (method, task, recipe) of the results files with per-row
    answers."""
    lines = ["| method | task | recipe | seeds | rows | max − min | from the rows (expected) | the seeds' own | p |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (method, task, recipe), right in sorted(answers(paths).items(), key=lambda kv: study_order(kv[0])):
        if right.shape[0] < 2:
            continue
        s = split_spread(right)
        lines.append(f"| {method} | {task} | {recipe} | {right.shape[0]} | {right.shape[1]} | {s['observed']:.3f} | "
                     f"{s['noise']:.3f} | {s['own']:.3f} | {s['p']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, nargs="+",
                        help="bench.recipes JSON-lines files whose runs record \"right\"")
    parser.add_argument("--compare", nargs=2, type=method_recipe, metavar=("A", "B"),
                        help="METHOD:RECIPE twice: B's mean accuracy against A's on each task both were run on")
    args = parser.parse_args(argv)
    print(comparison_table(args.results, *args.compare) if args.compare else table(args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
