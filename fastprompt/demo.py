"""`fastprompt demo`: prompt-tune a real small model on real data on a CPU, offline, in about a minute
(50 s on an otherwise idle 2-core x86-64 CPU, the one-time model conversion included; README says where).

SmolLM2-135M-Instruct learns Rotten Tomatoes sentiment (critic snippets, fresh or rotten); both ship inside
PyPI packages (`fastprompt.offline`). The soft prompt starts as the embeddings of a hand-written
instruction, so before tuning the frozen model reads exactly that text: its held-out accuracy then is the
instruction's zero-shot accuracy. Tuning only the prompt (P × 576 numbers) on a few hundred snippets, on the
shared-prefix path (the prompt's keys and values are computed once per step for the whole batch), raises it
clearly. Each label is scored by its verbalizer's log-likelihood after the snippet (``positive`` /
``negative``).

`fastprompt demo --tiny` runs the runtime end to end on a tiny built-in model instead, with nothing beyond
fastprompt installed (`fastprompt.tiny_demo`).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

INSTRUCTION = "Movie review sentiment, positive or negative?\n"
DEFAULT_STEPS = {"tiny": 100, "sentiment": 30}


@dataclass
class SentimentResult:
    zero_shot: float          # held-out accuracy with the untuned prompt (the instruction's own embeddings)
    tuned: float              # held-out accuracy after tuning
    train_examples: int       # examples seen in training (steps × batch size)
    test_examples: int
    num_virtual_tokens: int
    seconds: float            # wall time, model conversion and loading included
    output_dir: str           # the tuned adapter (PEFT's layout), train_log.jsonl, loss_curve.png, data/


def accuracy(trainer, data) -> float:
    """Fraction of `data`'s classification examples (a PromptDataset) whose best-scoring verbalizer under
    `trainer.model` is their label."""
    predictions = trainer.classify(data.examples, data.choices)
    return sum(p == e.label for p, e in zip(predictions, data.examples)) / len(data.examples)


def tune_sentiment(output_dir, *, steps: int = DEFAULT_STEPS["sentiment"], batch_size: int = 8, lr: float = 0.03,
                   optimizer: str = "adamw", test_size: int = 100, max_words: int | None = 16,
                   instruction: str = INSTRUCTION, seed: int = 0, path: str = "shared_prefix", cache=None,
                   progress: str = "print") -> SentimentResult:
    """Tune a prompt-tuning adapter of SmolLM2-135M-Instruct on Rotten Tomatoes sentiment; returns the
    held-out accuracy before and after.

    output_dir: folder for the adapter, logs and the data files; steps, batch_size, lr, optimizer: as in
    `fastprompt.train.TrainingConfig`; test_size: held-out snippets (balanced); max_words: use only snippets
    of at most this many words (CPU time grows with length); instruction: the text the prompt starts from
    (its token count is the number of virtual tokens); seed: fixes the split, the data order and training;
    path: the PromptModel forward path; cache: the converted-model cache folder (see
    `fastprompt.offline.smollm2`).
    """
    import fastprompt
    from fastprompt.offline.datasets import rotten_tomatoes
    from fastprompt.offline.smollm2 import instruction_config, load_smollm2
    from fastprompt.train import Trainer, TrainingConfig, load_data

    start = time.perf_counter()
    task = rotten_tomatoes(test_size=test_size, max_words=max_words, seed=seed)   # before the slow part
    base, tokenizer = load_smollm2(cache)
    files = task.write(Path(output_dir) / "data")
    train = load_data(files["train"], tokenizer, verbalizers=task.verbalizers)
    test = load_data(files["test"], tokenizer, verbalizers=task.verbalizers)
    config = instruction_config(instruction, tokenizer, cache)
    model = fastprompt.get_peft_model(base, config, path=path)
    model.print_trainable_parameters()
    trainer = Trainer(model, TrainingConfig(output_dir=str(output_dir), steps=steps, batch_size=batch_size, lr=lr,
                                            optimizer=optimizer, seed=seed, eval_batch_size=32, log_every=5,
                                            progress=progress), train, pad_token_id=tokenizer.pad_token_id)
    zero_shot = accuracy(trainer, test)
    print(f"zero-shot accuracy on {len(test)} held-out snippets: {zero_shot:.1%}", flush=True)
    trainer.train()
    tuned = accuracy(trainer, test)
    return SentimentResult(zero_shot, tuned, steps * batch_size, len(test), config.num_virtual_tokens,
                           time.perf_counter() - start, str(output_dir))


def main(args) -> int:
    """The `demo` command: --tiny runs `fastprompt.tiny_demo`; else `tune_sentiment` into --out (default:
    a temporary folder, removed afterwards) and print the accuracies."""
    from fastprompt.offline.packages import MissingPackageError

    steps = DEFAULT_STEPS["tiny" if args.tiny else "sentiment"] if args.steps is None else args.steps
    if args.tiny:
        from fastprompt import tiny_demo

        return tiny_demo.main(steps, out=args.out)
    with tempfile.TemporaryDirectory(prefix="fastprompt-demo-") as scratch:
        try:
            result = tune_sentiment(args.out or scratch, steps=steps)
        except MissingPackageError as error:
            raise SystemExit(f"fastprompt demo: {error}\n(`fastprompt demo --tiny` needs nothing beyond "
                             f"fastprompt)") from error
    print(f"SmolLM2-135M-Instruct, Rotten Tomatoes sentiment, {result.test_examples} held-out snippets:")
    print(f"  zero-shot (the instruction, {result.num_virtual_tokens} tokens) {result.zero_shot:.1%}  ->  "
          f"tuned soft prompt {result.tuned:.1%}   ({result.train_examples} training examples, "
          f"{result.seconds:.0f} s)")
    if args.out:
        print(f"adapter saved in {args.out} (PEFT's format)")
    return 0
