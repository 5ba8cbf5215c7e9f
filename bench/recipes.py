"""The default-recipe study: held-out accuracy of soft-prompt recipes on real classification tasks, over seeds.

    python -m bench.recipes --out /tmp/recipes.jsonl                 # every task x recipe x seed (hours on a CPU)
    python -m bench.recipes --out /tmp/recipes.jsonl --tasks sentiment --recipes new --seeds 0 1
    python -m bench.recipes --summary /tmp/recipes.jsonl             # the README's table from a finished file

Model: SmolLM2-135M-Instruct (`fastprompt.offline.smollm2`). Tasks (`fastprompt.offline.datasets`, each a fixed
split made with seed 0, so a run's seed changes only the prompt's start and the data order):
- sentiment: Rotten Tomatoes snippets of at most 16 words, positive / negative;
- news: BBC News, five topics, articles cut to 24 words;
- debates: 2016 presidential debates, Clinton / Trump, statements cut to 24 words.

Recipes (prompt tuning, AdamW, batch 8, gradient clipping at 1.0, the label's verbalizer as target):
- old: fastprompt's defaults before this study (`recipe.OLD_RECIPE`): random start, P=20, lr 3e-2, constant;
- peft-example: PEFT's documented prompt-tuning example (the causal-LM guide on twitter_complaints): TEXT
  init from a hand-written task instruction, P=8, lr 3e-2, linear decay without warm-up;
- hand-tuned: the best hand recipe found for this model: the hand-written instruction as init (P = its
  tokens), lr 1e-2, constant, 150 steps;
- new: `recipe.default_recipe` as `fastprompt train` applies it (the instruction generated from the label
  words: nothing written by hand);
- new-lr3e-2: a candidate: `new` with PEFT's example learning rate, 3e-2.

Each finished run appends one JSON line to --out; a rerun skips the (task, recipe, seed) already there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

TASK_INSTRUCTIONS = {   # hand-written, for the peft-example and hand-tuned recipes
    "sentiment": "Movie review sentiment, positive or negative?\n",
    "news": "News article topic: business, entertainment, politics, sport or technology?\n",
    "debates": "Who said this in the debate, Clinton or Trump?\n",
}
RECIPES = ("old", "peft-example", "hand-tuned", "new", "new-lr3e-2")
TEST_SIZE = {"sentiment": 200, "news": 100, "debates": 100}


def load_task(name: str):
    from fastprompt.offline import datasets

    if name == "sentiment":
        return datasets.rotten_tomatoes(test_size=TEST_SIZE[name], max_words=16, train_size=1000)
    if name == "news":
        return datasets.bbc_news(test_size=TEST_SIZE[name], max_words=24, train_size=1000)
    if name == "debates":
        return datasets.debates(test_size=TEST_SIZE[name], max_words=24)
    raise ValueError(f"task must be one of {sorted(TASK_INSTRUCTIONS)}, got {name!r}")


def recipe_options(recipe: str, task) -> dict:
    """The prompt-tuning start and the optimisation of `recipe` for `task` (a TaskData)."""
    import dataclasses

    from fastprompt.train.recipe import OLD_RECIPE, default_recipe

    if recipe == "old":
        return dataclasses.asdict(OLD_RECIPE)
    if recipe == "peft-example":
        return {"init": "text", "init_text": TASK_INSTRUCTIONS[task.name], "num_virtual_tokens": 8, "lr": 3e-2,
                "schedule": "linear", "warmup": 0, "steps": 100}
    if recipe == "hand-tuned":
        return {"init": "text", "init_text": TASK_INSTRUCTIONS[task.name], "num_virtual_tokens": None, "lr": 1e-2,
                "schedule": "constant", "warmup": 0, "steps": 150}
    if recipe == "new":
        return dataclasses.asdict(default_recipe("prompt-tuning", list(task.verbalizers.values())))
    if recipe == "new-lr3e-2":
        return {**recipe_options("new", task), "lr": 3e-2}
    raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")


def run_one(task, recipe: str, seed: int, folder: Path) -> dict:
    """Train one prompt with `recipe` and `seed`; its held-out accuracy and wall time."""
    import torch

    import fastprompt
    from fastprompt.demo import accuracy
    from fastprompt.offline.smollm2 import load_smollm2, smollm2_folder
    from fastprompt.train import Trainer, TrainingConfig, load_data

    options = recipe_options(recipe, task)
    start = time.perf_counter()
    base, tokenizer = load_smollm2()
    files = task.write(folder / "data")
    train = load_data(files["train"], tokenizer, verbalizers=task.verbalizers)
    test = load_data(files["test"], tokenizer, verbalizers=task.verbalizers)
    init = options["init"].upper()
    extra = {}
    if init == "TEXT":
        extra = {"prompt_tuning_init_text": options["init_text"], "tokenizer_name_or_path": str(smollm2_folder())}
    tokens = options["num_virtual_tokens"] or len(tokenizer(options["init_text"])["input_ids"])
    torch.manual_seed(seed)
    model = fastprompt.get_peft_model(base, fastprompt.PromptTuningConfig(
        num_virtual_tokens=tokens, prompt_tuning_init=init, **extra))
    config = TrainingConfig(output_dir=str(folder), steps=options["steps"], batch_size=8, lr=options["lr"],
                            schedule=options["schedule"], warmup=options["warmup"], seed=seed, eval_batch_size=32,
                            progress="none", plot=False)
    trainer = Trainer(model, config, train, pad_token_id=tokenizer.pad_token_id)
    trainer.train()
    return {"task": task.name, "recipe": recipe, "seed": seed, "accuracy": accuracy(trainer, test),
            "test_examples": len(test), "num_virtual_tokens": tokens, **{k: options[k] for k in
                                                                        ("lr", "schedule", "warmup", "steps")},
            "seconds": round(time.perf_counter() - start, 1), "date": date.today().isoformat(),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"}


def done_runs(path: Path) -> set:
    if not path.is_file():
        return set()
    return {(r["task"], r["recipe"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())}


def summary(path: Path) -> str:
    """The markdown table: task, recipe, seeds, mean, min, max, max - min of the held-out accuracy."""
    groups: dict[tuple, list[float]] = {}
    for record in map(json.loads, path.read_text().splitlines()):
        groups.setdefault((record["task"], record["recipe"]), []).append(record["accuracy"])
    lines = ["| task | recipe | seeds | mean | min | max | max − min |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for (task, recipe), values in sorted(groups.items(), key=lambda kv: (kv[0][0], RECIPES.index(kv[0][1]))):
        lines.append(f"| {task} | {recipe} | {len(values)} | {statistics.mean(values):.3f} | {min(values):.3f} | "
                     f"{max(values):.3f} | {max(values) - min(values):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="JSON-lines results file (appended to; finished runs skipped)")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_INSTRUCTIONS), choices=list(TASK_INSTRUCTIONS))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--summary", type=Path, help="print the table of a results file and exit")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    if args.out is None:
        parser.error("--out is required (or --summary FILE)")
    import torch

    torch.set_num_threads(args.threads)
    done = done_runs(args.out)
    tasks = [load_task(name) for name in args.tasks]
    for seed in args.seeds:       # seeds outermost: every task and recipe has results early
        for task in tasks:
            for recipe in args.recipes:
                if (task.name, recipe, seed) in done:
                    continue
                with tempfile.TemporaryDirectory(prefix="fastprompt-recipes-") as folder:
                    record = run_one(task, recipe, seed, Path(folder))
                print(json.dumps(record), flush=True)
                with args.out.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
