"""The default-recipe study: held-out accuracy of soft-prompt recipes on real classification tasks, over seeds.

    python -m bench.recipes --out /tmp/recipes.jsonl                 # every task x recipe x seed (hours on a CPU)
    python -m bench.recipes --out /tmp/recipes.jsonl --tasks sentiment --recipes new --seeds 0 1
    python -m bench.recipes --out /tmp/recipes.jsonl --methods prefix-tuning p-tuning   # their recipes
    python -m bench.recipes --summary /tmp/recipes.jsonl             # the README's table from a finished file
    python -m bench.recipes --start --tasks news --recipes new peft-example   # held-out accuracy before training
    python -m bench.recipes --out /tmp/bias.jsonl --bias --tasks debates --recipes new   # what the bias costs

Model: SmolLM2-135M-Instruct (`fastprompt.offline.smollm2`). Tasks (`fastprompt.offline.datasets`, each a fixed
split made with seed 0, so a run's seed changes only the prompt's start and the data order):
- sentiment: Rotten Tomatoes snippets of at most 16 words, positive / negative;
- news: BBC News, five topics, articles cut to 24 words;
- news-500: news's training rows, tested on 500 held-out rows (news's 100 and the next 400 of the split), so
  that one row weighs 0.002;
- sentiment-280: sentiment trained on its first 280 training rows only (debates's count), tested on the same 200
  rows: 100 steps of batch 8 then run 2.9 epochs, as on debates, on a task the model learns well, to tell a
  recipe's unsteadiness over several epochs from its unsteadiness on a task near chance;
- debates: 2016 presidential debates, Clinton / Trump, statements cut to 24 words;
- speeches: 2012 national convention speeches' paragraphs, Democrat / Republican, cut to 24 words (1,000
  training rows, 500 held out): a second political-attribution task, with a test set large enough to tell a
  recipe's spread over seeds from debates's 100-row noise;
- subjectivity: Rotten Tomatoes plot summaries against critic reviews, every text cut to 16 words (1,000
  training rows, 200 held out, both balanced): a task of 0.8 epochs measured after the others, to test on a
  task no recipe was chosen on whether PEFT's example's optimisation holds within one epoch.
- speeches-1400, subjectivity-1000: speeches and subjectivity tested on more rows, as news-500 is news: their
  held-out rows and the next of the split (900 and 800, half of each label), to tell the default's spread over
  seeds from its held-out rows' noise.

Methods (--methods; default prompt tuning only): prompt-tuning, prefix-tuning, p-tuning, mpt. Every recipe trains
with AdamW, batch 8 (but new-b16), gradient clipping at 1.0, the label's verbalizer as target.

Prompt-tuning recipes:
- old: fastprompt's defaults before this study (`recipe.OLD_RECIPE`): random start, P=20, lr 3e-2, constant;
- peft-example: PEFT's documented prompt-tuning example (the causal-LM guide on twitter_complaints): TEXT
  init from a hand-written task instruction, P=8, lr 3e-2, linear decay without warm-up;
- hand-tuned: the best hand recipe found for this model: the hand-written instruction as init (P = its
  tokens), lr 1e-2, constant, 150 steps;
- new: `recipe.default_recipe` as `fastprompt train` applies it to a run that reads its rows more than once
  (debates, sentiment-280): the instruction generated from the label words (nothing written by hand), lr 1e-2,
  warm-up 10, cosine; the default on every task until the subjectivity runs (see new-peft-schedule);
- new-lr3e-2: a candidate: `new` with PEFT's example learning rate, 3e-2;
- new-ensemble: a candidate: three prompts of `new`, trained in one mixed batch (batch 8 per member: each
  step 24 rows, each routed to its member's adapter) and answering together
  (`fastprompt.train.ensembles`: the label with the highest mean log-likelihood over the members);
- new-early-stop: a candidate: `new` with `fastprompt train`'s held-out split (10% of the training records, at
  most 200) evaluated every 20 steps, ending with the prompt of the best held-out accuracy (`restore_best`);
- new-200: a candidate: `new` trained for 200 steps instead of 100 (1.6 epochs of sentiment's and news's 1000
  training rows, 5.7 of debates's 280);
- new-p8: a candidate: `new` with PEFT's example length, 8 virtual tokens (the instruction cut to its first 8
  tokens, as PEFT's TEXT init cuts: news's 16 lose three of the five topics, the others' 10 their last words),
  to tell the prompt's length from its text;
- new-choice: a candidate: `new` trained on the classification objective of PET and LM-BFF (Schick & Schütze;
  Gao et al.): cross-entropy over the label words' logits at the answer position (a softmax over the task's
  choices, not the vocabulary), the decision the evaluation scores, in place of the verbalizer's LM loss;
- new-hand: a candidate: `new` started from the hand-written instruction of peft-example and hand-tuned (P = its
  tokens), what `fastprompt train --init-text` gives: the default's schedule with PEFT's example's information;
- new-peft-schedule: `new`'s start (the generated instruction, P = its tokens) with PEFT's example's
  optimisation: lr 3e-2, linear decay, no warm-up; a candidate until it became the default of a run that reads
  its rows at most once (sentiment, news, news-500, speeches, subjectivity: 100 steps of 8 rows, 0.8 epochs),
  then that default without its tail averaging (new-tail-average);
- new-residual: a candidate: `new` with residual prompt tuning's reparameterization (Razdaibiedina et al.,
  2023, reported to steady prompt tuning across seeds and learning rates): each virtual token e trains as
  e + LayerNorm(W_up ReLU(W_down e)), one bottleneck MLP shared by the tokens (`residual_prompts`), the
  LayerNorm's gain starting at 0 so that the prompt starts as the instruction;
- new-b16: a candidate: `new` with batch 16 instead of 8 (twice the rows per step, half the gradient noise of
  the data order, which is all a run's seed changes from a text start);
- new-balanced: a candidate: `new` trained on label-balanced data, each rarer label's rows repeated in turn until
  every label has as many rows as the most frequent (`balance_labels`). Debates's training rows are 62.5%
  Trump and its held-out rows 50%; every other task's training rows are balanced already, where new-balanced
  is `new` exactly;
- new-soup: a candidate: new-ensemble's three prompts, trained in one mixed batch from the same start, averaged
  into one prompt after training (`soup_members`: a "model soup" of the virtual tokens), which answers alone:
  the ensemble's averaging of the data order's noise in a prompt served at one prompt's cost;
- new-lr6e-2-linear: a candidate: new-peft-schedule (the default within one epoch) at twice its rate, lr 6e-2,
  to tell whether the rate that lifted news from lr 1e-2 to 3e-2 lifts it further;
- new-tail-average: a candidate: new-peft-schedule ending with the mean of its prompts after each of the last
  half of its steps (`average_tail` 0.5: `TrainingConfig.average_last` 50, `fastprompt.train.averaging`: tail
  averaging, as stochastic weight averaging averages a run's late weights, Izmailov et al., 2018), not the last
  step's alone, aimed at subjectivity's seed 7, whose last ten steps at a rate falling to 0 moved it from 0.875
  to 0.795 (a narrow decision margin; README, "Ten seeds"); a candidate until it became prompt tuning's default
  within one epoch (sentiment, news, news-500, speeches, subjectivity), where new-peft-schedule was, and the
  default until new-quarter-tail-average replaced it;
- new-cosine-tail-average: a candidate: `new` (the default over several epochs: lr 1e-2, warm-up, cosine)
  ending with the mean of its prompts after each of the last half of its steps, to tell whether tail averaging
  steadies the runs that read their rows several times (debates, sentiment-280) as it did within one epoch;
- new-quarter-tail-average: a candidate: the default within one epoch averaging the last quarter of its steps
  (`average_tail` 0.25: the last 25) instead of the last half, aimed at speeches, where the mean of the last
  half leaned to one label on some seeds (README, "Tail averaging"), while still averaging over subjectivity's
  seed 7's last ten steps; a candidate until it became prompt tuning's default within one epoch, where
  new-tail-average was (README, "Tail averaging's length");
- new-stratified: a candidate: the default within one epoch (new-quarter-tail-average) with stratified batches
  (`TrainingConfig.stratify`: each label's rows spread evenly over the epoch, so that every batch of 8 holds
  each label in its share of the data, within two rows), aimed at speeches, whose prompts' lean swings from seed
  to seed (Democrat on 101 to 360 of its 500 held-out rows): the label mix of a run's last batches is the data
  order's most direct handle on its prompt's lean.

Prefix-tuning and P-tuning recipes (PEFT's start: a random prefix, the P-tuning MLP encoder's initialisation;
no prefix projection, MLP encoder):
- old: `recipe.OLD_RECIPE`: P=20, lr 3e-2, constant, 100 steps (encoder hidden size: PEFT's default, the
  model's hidden size);
- new: prompt tuning's default schedule from PEFT's start (`recipe.default_recipe` for these methods until
  prefix tuning's moved to new-text and P-tuning's to peft-example, then peft-example-text): P=20, lr 1e-2,
  warm-up 10, cosine, 100 steps;
- peft-example: PEFT's documented example for the method, in 100 steps without warm-up:
  prefix tuning from the task guide "Prefix tuning for conditional generation" (t5-large on
  financial_phrasebank, docs/source/task_guides/seq2seq-prefix-tuning.md): P=20, AdamW lr 1e-2, linear decay
  (get_linear_schedule_with_warmup, num_warmup_steps=0);
  P-tuning from the task guide "P-tuning for sequence classification" (roberta-large on GLUE MRPC,
  docs/source/task_guides/ptuning-seq-classification.md): P=20, encoder_hidden_size=128, lr 1e-3, weight
  decay 0.01, the HF Trainer's default linear decay without warm-up.
- new-text: `new` started from the instruction that names the label words (P = its tokens), as prompt tuning's
  `new` starts from its embeddings: prefix tuning from its keys/values (`fastprompt.train.prefix_init`; prefix
  tuning's default), P-tuning from its embeddings as the table of a residual encoder (`encoder_residual`:
  the virtual tokens are the table plus the encoder's output, its last layer starting at zero;
  `fastprompt.train.encoder_init`), encoder width 128;
- peft-example-text (P-tuning; its default): peft-example from new-text's start;
- new-text-lr5e-3 (prefix tuning): a candidate: prefix tuning's default at half its rate, lr 5e-3, to tell
  whether its seeds' own spread on subjectivity (0.041, p = 0.03: the data order alone) is its rate's;
- new-text-within-one (prefix tuning): a candidate: prefix tuning's default start with prompt tuning's
  optimisation within one epoch (lr 3e-2, linear decay, no warm-up), to tell whether the epochs rule holds
  for prefix tuning too;
- new-text-tail-average (prefix tuning): a candidate: prefix tuning's default ending with the mean of its
  prefixes after each of the last half of its steps (`average_tail` 0.5), to tell whether tail averaging,
  prompt tuning's cure for its seeds' own spread on subjectivity, is prefix tuning's too;
- peft-example-text-tail-average (P-tuning): a candidate: P-tuning's default ending with the mean of its
  encoder's and table's weights after each of the last half of its steps (`average_tail` 0.5), aimed at its
  spread on debates.

MPT (one task, num_ranks 1, as `fastprompt train --method mpt` builds it on single-task data), every recipe from
the default's instruction start, peft-start and new with the default's schedule over several epochs
(`recipe.default_recipe("mpt", ...)`: lr 1e-2, warm-up 10, cosine):
- peft-start: the instruction in P* and the task factors U, V from PEFT's N(0, 0.02), so the prompt
  P* ∘ (U V) starts near 0 (the default until this study measured it);
- new: the default: U V all ones (`fastprompt.train.mpt.start_tasks_at_shared_prompt`), so the prompt starts
  as the instruction, as prompt tuning's does;
- new-peft-schedule: `new` with prompt tuning's default within one epoch (lr 3e-2, linear decay, no warm-up),
  to tell whether the epochs rule holds for MPT; it did, and it is MPT's default within one epoch;
- new-tail-average: a candidate: new-peft-schedule ending with the mean of P*, U and V after each of the last
  half of its steps (`average_tail` 0.5), as prompt tuning's default does within one epoch;
- new-cosine-tail-average: a candidate: `new` ending with the mean of P*, U and V after each of the last half of
  its steps, aimed at its spread on debates (prompt tuning's candidate of that name, for MPT).

Each finished run appends one JSON line to --out; a rerun skips the (method, task, recipe, seed) already there
(a line without "method" is prompt tuning: the file's runs before prefix tuning and P-tuning were measured).
A line's "right" (runs from 2026-12-07 on) marks each held-out row answered right ("1") or wrong ("0"), in the
test split's order: `bench.seed_spread` reads it to tell a recipe's spread over seeds from its test rows' noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

# tasks tested on more of their split's held-out rows than their base task (module docstring): task -> its base
WIDER_TESTS = {"news-500": "news", "speeches-1400": "speeches", "subjectivity-1000": "subjectivity"}
TASK_INSTRUCTIONS = {   # hand-written, for the peft-example and hand-tuned recipes
    "sentiment": "Movie review sentiment, positive or negative?\n",
    "news": "News article topic: business, entertainment, politics, sport or technology?\n",
    "debates": "Who said this in the debate, Clinton or Trump?\n",
    "speeches": "Convention speech by which party, Democrat or Republican?\n",
    "subjectivity": "A film's plot summary or a critic's review?\n",
}
TASK_INSTRUCTIONS.update({wider: TASK_INSTRUCTIONS[base] for wider, base in WIDER_TESTS.items()})
TASK_INSTRUCTIONS["sentiment-280"] = TASK_INSTRUCTIONS["sentiment"]   # sentiment's task, trained on fewer rows
RECIPES = ("old", "peft-example", "peft-start", "hand-tuned", "new", "new-lr3e-2", "new-ensemble", "new-early-stop",
           "new-200", "new-p8", "new-choice", "new-hand", "new-peft-schedule", "new-residual", "new-b16",
           "new-balanced", "new-soup", "new-text", "peft-example-text", "new-lr6e-2-linear", "new-text-lr5e-3",
           "new-text-within-one", "new-tail-average", "new-text-tail-average", "new-cosine-tail-average",
           "peft-example-text-tail-average", "new-quarter-tail-average", "new-stratified",
           "new-quarter-tail-average-b16")
HALF_TAIL = 0.5   # the share of the steps that the "-tail-average" candidates average: the last half, as measured
QUARTER_TAIL = 0.25   # new-quarter-tail-average's share: the last quarter
ENSEMBLE_MEMBERS = 3
RESIDUAL_BOTTLENECK = 256   # new-residual's MLP width
METHODS = ("prompt-tuning", "prefix-tuning", "p-tuning", "mpt")
METHOD_RECIPES = {"prompt-tuning": ("old", "peft-example", "hand-tuned", "new", "new-lr3e-2", "new-ensemble",
                                    "new-early-stop", "new-200", "new-p8", "new-choice", "new-hand",
                                    "new-peft-schedule", "new-residual", "new-b16", "new-balanced",
                                    "new-soup", "new-lr6e-2-linear", "new-tail-average",
                                    "new-cosine-tail-average", "new-quarter-tail-average", "new-stratified",
                                    "new-quarter-tail-average-b16"),
                  "prefix-tuning": ("old", "peft-example", "new", "new-text", "new-text-lr5e-3", "new-text-within-one",
                                    "new-text-tail-average"),
                  "p-tuning": ("old", "peft-example", "new", "new-text", "peft-example-text",
                               "peft-example-text-tail-average"),
                  "mpt": ("peft-start", "new", "new-peft-schedule", "new-tail-average", "new-cosine-tail-average")}
TEST_SIZE = {"sentiment": 200, "sentiment-280": 200, "news": 100, "news-500": 500, "debates": 100, "speeches": 500,
             "speeches-1400": 1400, "subjectivity": 200, "subjectivity-1000": 1000}
TRAIN_ROWS = 1000   # the training rows of every task but debates (280: all it has) and sentiment-280
SMALL_TRAIN = 280   # sentiment-280's training rows: debates's count


def load_task(name: str):
    from fastprompt.offline import datasets

    if name == "debates":   # all its training rows (280)
        return datasets.debates(test_size=TEST_SIZE[name], max_words=24)
    base = {**WIDER_TESTS, "sentiment-280": "sentiment"}.get(name, name)
    loaders = {"sentiment": lambda: datasets.rotten_tomatoes(test_size=TEST_SIZE[base], max_words=16),
               "news": lambda: datasets.bbc_news(test_size=TEST_SIZE[base], max_words=24),
               "speeches": lambda: datasets.speeches(test_size=TEST_SIZE[base], max_words=24),
               "subjectivity": lambda: datasets.subjectivity(test_size=TEST_SIZE[base])}
    if base not in loaders:
        raise ValueError(f"task must be one of {sorted(TASK_INSTRUCTIONS)}, got {name!r}")
    split = loaders[base]()
    # sentiment-280 trains on the first 280 of sentiment's training rows; a wider test also takes the rows of the
    # split that follow the training rows (module docstring)
    train = split.train[:SMALL_TRAIN if name == "sentiment-280" else TRAIN_ROWS]
    test = split.test + split.train[TRAIN_ROWS:][:TEST_SIZE[name] - len(split.test)]
    return dataclasses.replace(split, name=name, train=train, test=test)


def recipe_options(recipe: str, task, method: str = "prompt-tuning") -> dict:
    """The start and the optimisation of `recipe` for `method` on `task` (a TaskData)."""
    from fastprompt.train.recipe import OLD_RECIPE, default_recipe, instruction

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if recipe not in METHOD_RECIPES[method]:
        raise ValueError(f"recipe {recipe!r} does not apply to {method}: its recipes are {METHOD_RECIPES[method]}")
    if method == "mpt":   # the default's text and schedule ("peft-start" leaves the task factors as PEFT draws them):
        # over several epochs, or within one (new-peft-schedule: the rate of prompt tuning's within one epoch)
        epochs = 1 if recipe in ("new-peft-schedule", "new-tail-average") else None
        options = dataclasses.asdict(default_recipe("mpt", list(task.verbalizers.values()), epochs))
        return {**options, "average_tail": HALF_TAIL} if recipe.endswith("-tail-average") else options
    if method != "prompt-tuning":
        if recipe == "old":
            return {**dataclasses.asdict(OLD_RECIPE), "encoder_hidden_size": None}
        if recipe == "new":   # the schedule of prompt tuning's default from PEFT's start (fixed here: the
            # defaults themselves moved once measured: prefix tuning to new-text, P-tuning to peft-example-text)
            return {"init": "random", "init_text": None, "num_virtual_tokens": 20, "lr": 1e-2, "schedule": "cosine",
                    "warmup": 10, "steps": 100, "max_grad_norm": 1.0, "encoder_hidden_size": None}
        if recipe in ("new-text", "peft-example-text"):   # started from the instruction: prefix tuning from its
            # keys/values (train.prefix_init), P-tuning's residual encoder from its embeddings (train.encoder_init)
            width = {"encoder_hidden_size": 128} if method == "p-tuning" else {}
            return {**recipe_options(recipe.removesuffix("-text"), task, method), **width, "init": "text",
                    "init_text": instruction(list(task.verbalizers.values())), "num_virtual_tokens": None}
        if recipe == "new-text-lr5e-3":
            return {**recipe_options("new-text", task, method), "lr": 5e-3}
        if recipe.endswith("-tail-average"):   # the method's default ending with the mean of the last half's prompts
            return {**recipe_options(recipe.removesuffix("-tail-average"), task, method), "average_tail": HALF_TAIL}
        if recipe == "new-text-within-one":   # prompt tuning's rate, decay and warm-up within one epoch
            within_one = default_recipe("prompt-tuning", list(task.verbalizers.values()), epochs=1)
            return {**recipe_options("new-text", task, method),
                    **{key: getattr(within_one, key) for key in ("lr", "schedule", "warmup")}}
        # peft-example: PEFT's task guides "Prefix tuning for conditional generation" and "P-tuning for sequence
        # classification", in this study's 100 steps
        if method == "prefix-tuning":
            return {"init": "random", "num_virtual_tokens": 20, "lr": 1e-2, "schedule": "linear", "warmup": 0,
                    "steps": 100, "encoder_hidden_size": None}
        return {"init": "random", "num_virtual_tokens": 20, "lr": 1e-3, "schedule": "linear", "warmup": 0,
                "steps": 100, "encoder_hidden_size": 128, "weight_decay": 0.01}
    if recipe == "old":
        return dataclasses.asdict(OLD_RECIPE)
    if recipe == "peft-example":
        return {"init": "text", "init_text": TASK_INSTRUCTIONS[task.name], "num_virtual_tokens": 8, "lr": 3e-2,
                "schedule": "linear", "warmup": 0, "steps": 100}
    if recipe == "hand-tuned":
        return {"init": "text", "init_text": TASK_INSTRUCTIONS[task.name], "num_virtual_tokens": None, "lr": 1e-2,
                "schedule": "constant", "warmup": 0, "steps": 150}
    if recipe == "new":   # epochs not given: the schedule of a run that reads its rows more than once
        return dataclasses.asdict(default_recipe("prompt-tuning", list(task.verbalizers.values())))
    if recipe == "new-lr3e-2":
        return {**recipe_options("new", task), "lr": 3e-2}
    if recipe == "new-ensemble":
        return {**recipe_options("new", task), "ensemble": ENSEMBLE_MEMBERS}
    if recipe == "new-early-stop":
        return {**recipe_options("new", task), "eval_every": 20}
    if recipe == "new-200":
        return {**recipe_options("new", task), "steps": 200}
    if recipe == "new-p8":
        return {**recipe_options("new", task), "num_virtual_tokens": 8}
    if recipe == "new-choice":
        return {**recipe_options("new", task), "loss": "choices"}
    if recipe == "new-hand":
        return {**recipe_options("new", task), "init_text": TASK_INSTRUCTIONS[task.name]}
    if recipe == "new-peft-schedule":
        peft = recipe_options("peft-example", task)
        return {**recipe_options("new", task), **{k: peft[k] for k in ("lr", "schedule", "warmup", "steps")}}
    if recipe == "new-residual":
        return {**recipe_options("new", task), "residual_bottleneck": RESIDUAL_BOTTLENECK}
    if recipe == "new-b16":
        return {**recipe_options("new", task), "batch_size": 16}
    if recipe == "new-balanced":
        return {**recipe_options("new", task), "balance_labels": True}
    if recipe == "new-soup":
        return {**recipe_options("new-ensemble", task), "soup": True}
    if recipe == "new-lr6e-2-linear":
        return {**recipe_options("new-peft-schedule", task), "lr": 6e-2}
    if recipe == "new-tail-average":   # ends with the mean of the last half's prompts
        return {**recipe_options("new-peft-schedule", task), "average_tail": HALF_TAIL}
    if recipe == "new-cosine-tail-average":
        return {**recipe_options("new", task), "average_tail": HALF_TAIL}
    if recipe == "new-quarter-tail-average":
        return {**recipe_options("new-peft-schedule", task), "average_tail": QUARTER_TAIL}
    if recipe == "new-stratified":
        return {**recipe_options("new-quarter-tail-average", task), "stratify": True}
    if recipe == "new-quarter-tail-average-b16":   # the default within one epoch with twice the rows a step: is
        # the seeds' own spread on speeches-1400 (not its held-out rows' noise) the gradient's noise?
        return {**recipe_options("new-quarter-tail-average", task), "batch_size": 16}
    raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")


def adapter_config(method: str, options: dict, tokenizer):
    """The fastprompt config of `method` for `options`, built as `fastprompt train` builds it; its virtual tokens."""
    import fastprompt
    from fastprompt.offline.smollm2 import smollm2_folder

    if method == "prefix-tuning":
        tokens = options["num_virtual_tokens"] or len(tokenizer(options["init_text"])["input_ids"])
        return fastprompt.PrefixTuningConfig(num_virtual_tokens=tokens, prefix_projection=False,
                                             encoder_hidden_size=options["encoder_hidden_size"]), tokens
    if method == "p-tuning":
        tokens = options["num_virtual_tokens"] or len(tokenizer(options["init_text"])["input_ids"])
        return fastprompt.PromptEncoderConfig(num_virtual_tokens=tokens, encoder_reparameterization_type="MLP",
                                              encoder_hidden_size=options["encoder_hidden_size"],
                                              encoder_residual=options["init"] == "text"), tokens
    init = options["init"].upper()
    extra = {}
    if init == "TEXT":
        extra = {"prompt_tuning_init_text": options["init_text"], "tokenizer_name_or_path": str(smollm2_folder())}
    tokens = options["num_virtual_tokens"] or len(tokenizer(options["init_text"])["input_ids"])
    if method == "mpt":   # one task, as `fastprompt train --method mpt` builds it on single-task data
        return fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=tokens, prompt_tuning_init=init, num_tasks=1,
                                                      **extra), tokens
    return fastprompt.PromptTuningConfig(num_virtual_tokens=tokens, prompt_tuning_init=init, **extra), tokens


def choice_loss_trainer(model, config, train, held, pad_token_id):
    """A Trainer whose loss is the cross-entropy over the task's label words at the answer position: each
    row's logits at the token before its target, restricted to the first token of every verbalizer (which
    must differ), against the row's label; the step's loss is the mean over its rows."""
    import torch
    import torch.nn.functional as F

    from fastprompt.train import Trainer

    if len(train.choices) != 1:
        raise ValueError(f"the choice loss trains one classification task; got the choices of {list(train.choices)}")
    [choices] = train.choices.values()
    first = [ids[0] for _, ids in choices]
    if len(set(first)) != len(first):
        raise ValueError(f"the choice loss needs verbalizers whose first tokens differ; got {choices}")

    class ChoiceLossTrainer(Trainer):
        def normalizers(self, batches):
            return {**super().normalizers(batches), "rows": max(1, sum(b["rows"] for b in batches))}

        def compute_loss(self, batch, norms):
            inputs = self.model_inputs(batch)
            labels = inputs.pop("labels")
            logits = self.model(**inputs).logits[:, -labels.shape[1]:]
            answer = (labels != -100).int().argmax(1)          # each row's first target position
            rows = torch.arange(len(labels), device=labels.device)
            scores = logits[rows, answer - 1][:, first].float()  # [rows, choices]
            wanted = (labels[rows, answer][:, None] == torch.tensor(first, device=labels.device)).int().argmax(1)
            return F.cross_entropy(scores, wanted, reduction="sum") / norms["rows"], {}

    return ChoiceLossTrainer(model, config, train, held, pad_token_id=pad_token_id)


def balance_labels(data):
    """`data` (one classification task's PromptDataset) with each rarer label's examples repeated, in order and
    cycling, until every label has as many as the most frequent; `data` itself when it is balanced already."""
    from fastprompt.train.data import PromptDataset

    by_label: dict = {}
    for example in data.examples:
        by_label.setdefault(example.label, []).append(example)
    most = max(map(len, by_label.values()))
    extra = [rows[i % len(rows)] for rows in by_label.values() for i in range(most - len(rows))]
    return PromptDataset(data.examples + extra, data.choices) if extra else data


def residual_prompts(model, bottleneck: int) -> None:
    """Reparameterize `model`'s prompt-tuning adapter as residual prompt tuning does (Razdaibiedina et al.):
    its virtual tokens E [P, d] read as E + LayerNorm(W_up ReLU(W_down E)), the MLP (width `bottleneck`)
    shared by the P tokens and trained with E. The LayerNorm's gain starts at 0, so the prompt starts as E."""
    import torch
    from torch import nn

    from fastprompt.methods.prompt_tuning import PromptTuning

    class ResidualPromptTuning(PromptTuning):
        def prompts(self, entries, backend=None):
            tokens = self.embedding.weight
            return (tokens + self.residual(tokens))[None].expand(len(entries), -1, -1)

    (source,) = model.prompt_sources.values()
    if type(source) is not PromptTuning:
        raise ValueError(f"residual_prompts reparameterizes prompt tuning; the adapter is {type(source).__name__}")
    weight = source.embedding.weight
    d = weight.shape[1]
    norm = nn.LayerNorm(d)
    with torch.no_grad():
        norm.weight.zero_()
    source.residual = nn.Sequential(nn.Linear(d, bottleneck), nn.ReLU(), nn.Linear(bottleneck, d), norm).to(
        device=weight.device, dtype=weight.dtype)
    source.__class__ = ResidualPromptTuning


def soup_members(model, names: list[str]) -> None:
    """Average the prompt-tuning tables [P, d] of `model`'s adapters `names` (trained side by side from one start)
    into each of them, so that any one of them answers as their soup."""
    import torch

    tables = [model.prompt_sources[name].embedding.weight for name in names]
    if len({tuple(t.shape) for t in tables}) != 1:
        raise ValueError(f"soup_members averages tables of one shape, got {[tuple(t.shape) for t in tables]}")
    with torch.no_grad():
        mean = torch.stack(tables).mean(0)
        for table in tables:
            table.copy_(mean)


def decision_bias(trainer, train, test) -> dict:
    """How much of a two-label prompt's held-out accuracy its decision's bias costs. The decision is the sign of
    d = score(second label) - score(first) (`Trainer.label_scores`); moving its threshold from 0 to t gives:
    - raw: t = 0, the trained prompt's own decision (the study's accuracy);
    - prior_matched: t such that the training rows' predicted shares equal their label shares (no held-out
      information);
    - half_matched: t such that half the training rows go to each label;
    - best_threshold: the best t on the held-out rows themselves (a ceiling, not a decision one could make).
    Also first_label_predicted: how many held-out rows the raw decision gives the first label."""
    (choices,) = test.choices.values()
    if len(choices) != 2:
        raise ValueError(f"decision_bias takes a two-label task, got labels {[label for label, _ in choices]}")
    first, second = (label for label, _ in choices)

    def margins(data):
        return [s[second] - s[first] for s in trainer.label_scores(data.examples, data.choices)]

    train_d, test_d = sorted(margins(train)), margins(test)
    is_second = [e.label == second for e in test.examples]

    def accuracy(threshold):
        return sum((d > threshold) == y for d, y in zip(test_d, is_second)) / len(test_d)

    def sending_first(count):   # the threshold that gives the first label the `count` lowest training rows
        return train_d[count - 1] if count else train_d[0] - 1.0

    first_rows = sum(e.label == first for e in train.examples)
    return {"raw": accuracy(0.0), "prior_matched": accuracy(sending_first(first_rows)),
            "half_matched": accuracy(sending_first(len(train_d) // 2)),
            "best_threshold": max(accuracy(t) for t in [min(test_d) - 1.0, *test_d]),
            "first_label_predicted": sum(d <= 0.0 for d in test_d)}


def run_one(task, recipe: str, seed: int, folder: Path, method: str = "prompt-tuning", bias: bool = False) -> dict:
    """Train one prompt of `method` with `recipe` and `seed`; its held-out accuracy and wall time (and with `bias`,
    on a two-label task, `decision_bias`'s figures under "decision")."""
    import torch

    import fastprompt
    from fastprompt.offline.smollm2 import load_smollm2
    from fastprompt.train import Trainer, TrainingConfig, load_data
    from fastprompt.train.averaging import last_steps
    from fastprompt.train.cli import default_holdout
    from fastprompt.train.data import hold_out
    from fastprompt.train.ensembles import ensemble_classify, member_names, replicate
    from fastprompt.train.mpt import start_tasks_at_shared_prompt
    from fastprompt.train.trainer import task_model

    options = recipe_options(recipe, task, method)
    if bias and (options.get("ensemble") or len(task.verbalizers) != 2):   # before hours of training, not after
        raise ValueError(f"bias: decision_bias reads one prompt's two-label decision; {recipe} on {task.name} has "
                         f"{len(task.verbalizers)} labels and {options.get('ensemble') or 1} prompt(s)")
    start = time.perf_counter()
    base, tokenizer = load_smollm2()
    files = task.write(folder / "data")
    train = load_data(files["train"], tokenizer, verbalizers=task.verbalizers)
    if options.get("balance_labels"):
        train = balance_labels(train)
    held = None
    if options.get("eval_every"):   # the held-out split `fastprompt train` carves by default
        train, held = hold_out(train, default_holdout(train), seed)
    test = load_data(files["test"], tokenizer, verbalizers=task.verbalizers)
    adapter, tokens = adapter_config(method, options, tokenizer)
    members = member_names(options["ensemble"]) if options.get("ensemble") else []
    torch.manual_seed(seed)
    model = task_model(base, adapter, members) if members else fastprompt.get_peft_model(base, adapter)
    if method == "mpt" and options["init"] == "text" and recipe != "peft-start":   # as `fastprompt train` starts it
        start_tasks_at_shared_prompt(model)
    if method == "prefix-tuning" and options["init"] == "text":
        from fastprompt.train.prefix_init import init_prefix_from_text

        init_prefix_from_text(model, tokenizer(options["init_text"])["input_ids"])
    if method == "p-tuning" and options["init"] == "text":
        from fastprompt.train.encoder_init import init_encoder_from_text

        init_encoder_from_text(model, tokenizer(options["init_text"])["input_ids"])
    if options.get("residual_bottleneck"):
        residual_prompts(model, options["residual_bottleneck"])
    batch_size = options.get("batch_size", 8)   # per member of an ensemble
    average_last = last_steps(options["steps"], options.get("average_tail", 0.0))   # as `fastprompt train` does
    config = TrainingConfig(output_dir=str(folder), steps=options["steps"],
                            batch_size=batch_size * max(1, len(members)),
                            lr=options["lr"], schedule=options["schedule"], warmup=options["warmup"],
                            weight_decay=options.get("weight_decay", 0.0), seed=seed, eval_batch_size=32,
                            eval_every=options.get("eval_every", 0), average_last=average_last,
                            stratify=options.get("stratify", False),
                            progress="none", plot=False)
    if options.get("loss") == "choices":
        trainer = choice_loss_trainer(model, config, train, held, tokenizer.pad_token_id)
    else:
        trainer = Trainer(model, config, replicate(train, members) if members else train, held,
                          pad_token_id=tokenizer.pad_token_id)
    result = trainer.train()
    if options.get("soup"):
        soup_members(model, members)
        model.set_adapter(members[0])   # rows without a task name read the active adapter
        predictions = trainer.classify(test.examples, test.choices)
    elif members:
        predictions = ensemble_classify(trainer, test, members)
    else:
        predictions = trainer.classify(test.examples, test.choices)
    right = [p == e.label for p, e in zip(predictions, test.examples)]
    held_out = sum(right) / len(test)
    extra = {"ensemble": len(members)} if members else {}
    if options.get("soup"):
        extra["soup"] = True
    extra["predicted"] = {label: predictions.count(label) for label, _ in test.choices[None]}   # label bias
    extra["right"] = "".join("01"[r] for r in right)   # per held-out row, in order: for bench.seed_spread
    if bias:
        extra["decision"] = decision_bias(trainer, train, test)
    if task.name in WIDER_TESTS:   # the same prompt on its base task's own test rows, comparable with its runs
        base = WIDER_TESTS[task.name]
        extra[f"{base}_accuracy"] = sum(right[:TEST_SIZE[base]]) / TEST_SIZE[base]
    if average_last:
        extra["average_last"] = average_last
    if options.get("residual_bottleneck"):
        extra["residual_bottleneck"] = options["residual_bottleneck"]
    if held is not None:
        extra.update(held_out=len(held), eval_every=config.eval_every, best_step=result.best_step)
    if method in ("prefix-tuning", "p-tuning"):
        extra["weight_decay"] = config.weight_decay
        if method == "p-tuning":   # the encoder's width as resolved on the model (PEFT's default: hidden size)
            extra["encoder_hidden_size"] = model.peft_config["default"].encoder_hidden_size
    return {"method": method, "task": task.name, "recipe": recipe, "seed": seed, "accuracy": held_out,
            "test_examples": len(test), "num_virtual_tokens": tokens, "batch_size": batch_size,
            **{k: options[k] for k in ("lr", "schedule", "warmup", "steps")},
            **extra,
            "seconds": round(time.perf_counter() - start, 1), "date": date.today().isoformat(),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"}


def start_accuracy(task, recipe: str, folder: Path) -> float:
    """Held-out accuracy of `recipe`'s untrained prompt-tuning prompt on `task`: where training starts from."""
    import fastprompt
    from fastprompt.demo import accuracy
    from fastprompt.offline.smollm2 import load_smollm2
    from fastprompt.train import Trainer, TrainingConfig, load_data

    base, tokenizer = load_smollm2()
    files = task.write(folder / "data")
    test = load_data(files["test"], tokenizer, verbalizers=task.verbalizers)
    adapter, _ = adapter_config("prompt-tuning", recipe_options(recipe, task), tokenizer)
    config = TrainingConfig(output_dir=str(folder), eval_batch_size=32, progress="none", plot=False)
    trainer = Trainer(fastprompt.get_peft_model(base, adapter), config, test, pad_token_id=tokenizer.pad_token_id)
    return accuracy(trainer, test)


def done_runs(path: Path) -> set:
    if not path.is_file():
        return set()
    return {(*recipe_key(r), r["seed"]) for r in map(json.loads, path.read_text().splitlines())}


def recipe_key(record: dict) -> tuple[str, str, str]:
    """A result line's (method, task, recipe); a line without "method" is prompt tuning's (module docstring)."""
    return record.get("method", "prompt-tuning"), record["task"], record["recipe"]


def study_order(key: tuple[str, str, str]) -> tuple:
    """The sort key of a (method, task, recipe) in the study's tables: method and recipe as METHODS and RECIPES
    list them, tasks by name."""
    method, task, recipe = key
    return METHODS.index(method), task, RECIPES.index(recipe)


def summary(path: Path) -> str:
    """The markdown table: method, task, recipe, seeds, mean, min, max, max - min of the held-out accuracy."""
    groups: dict[tuple, list[float]] = {}
    for record in map(json.loads, path.read_text().splitlines()):
        groups.setdefault(recipe_key(record), []).append(record["accuracy"])
    lines = ["| method | task | recipe | seeds | mean | min | max | max − min |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (method, task, recipe), values in sorted(groups.items(), key=lambda kv: study_order(kv[0])):
        lines.append(f"| {method} | {task} | {recipe} | {len(values)} | {statistics.mean(values):.3f} | "
                     f"{min(values):.3f} | {max(values):.3f} | {max(values) - min(values):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="JSON-lines results file (appended to; finished runs skipped)")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_INSTRUCTIONS), choices=list(TASK_INSTRUCTIONS))
    parser.add_argument("--methods", nargs="+", default=["prompt-tuning"], choices=METHODS)
    parser.add_argument("--recipes", nargs="+", default=None, choices=RECIPES,
                        help="default: every recipe of each method")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--bias", action="store_true",
                        help="also record, per run of a two-label task, the accuracy its decision's bias costs "
                             "(decision_bias)")
    parser.add_argument("--summary", type=Path, help="print the table of a results file and exit")
    parser.add_argument("--start", action="store_true",
                        help="print each prompt-tuning recipe's held-out accuracy before training and exit")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    if args.out is None and not args.start:
        parser.error("--out is required (or --summary FILE, or --start)")
    methods = ["prompt-tuning"] if args.start else args.methods   # --start measures prompt tuning's starts
    for method in methods:
        wrong = [r for r in args.recipes or () if r not in METHOD_RECIPES[method]]
        if wrong:
            parser.error(f"recipe(s) {', '.join(wrong)} do not apply to {method}; "
                         f"{method}'s recipes: {', '.join(METHOD_RECIPES[method])}")
    import torch

    torch.set_num_threads(args.threads)
    if args.start:
        for task in map(load_task, args.tasks):
            for recipe in args.recipes or METHOD_RECIPES["prompt-tuning"]:
                with tempfile.TemporaryDirectory(prefix="fastprompt-recipes-") as folder:
                    print(f"{task.name} {recipe}: {start_accuracy(task, recipe, Path(folder)):.3f}", flush=True)
        return 0
    done = done_runs(args.out)
    tasks = [load_task(name) for name in args.tasks]
    for seed in args.seeds:       # seeds outermost: every method, task and recipe has results early
        for method in args.methods:
            for task in tasks:
                for recipe in args.recipes or METHOD_RECIPES[method]:
                    if (method, task.name, recipe, seed) in done:
                        continue
                    with tempfile.TemporaryDirectory(prefix="fastprompt-recipes-") as folder:
                        record = run_one(task, recipe, seed, Path(folder), method, bias=args.bias)
                    print(json.dumps(record), flush=True)
                    with args.out.open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
