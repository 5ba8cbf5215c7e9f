"""Transfer commands: MPT source training and target adaptation, SPoT ranking and transfer.
`add_commands(subparsers)` adds them to the `fastprompt` parser.

    # teachers for MPT, source prompts for SPoT: one prompt-tuning adapter per task (OUT/<task>)
    fastprompt train --method prompt-tuning --data a=A.jsonl --data b=B.jsonl --out sources
    fastprompt mpt-source --model M --teachers sources --data a=A.jsonl --data b=B.jsonl --out mpt \\
        --distill-weight 1.0 --temperature 2.0 --num-ranks 1
    fastprompt mpt-target --model M --source mpt --data t=T.jsonl [--data u=U.jsonl] --out target --init average
    fastprompt spot-rank --sources sources [--targets probe] --out spot --similarity average
    fastprompt spot-transfer --model M --sources sources --target-prompt probe --data t=T.jsonl --out target \\
        --top-k 1

Every training command takes `fastprompt train`'s optimisation, data and model options, runs under
torchrun the same way, writes PEFT-format adapters and a fastprompt_data.json that `fastprompt eval`
reads (with a "transfer" entry recording where the run started from).
"""

from __future__ import annotations

import json
from pathlib import Path

from fastprompt.train.cli import (
    add_data_options,
    add_model_options,
    add_training_options,
    load_training_data,
    pad_id,
    run_trainer,
    training_config,
    training_setup,
)

TARGET_INITS = {"average": "AVERAGE_SOURCE_TASKS", "exact": "EXACT_SOURCE_TASK", "shared": "ONLY_SOURCE_SHARED"}


def add_commands(subparsers) -> None:
    """Add mpt-source, mpt-target, spot-rank and spot-transfer to an argparse subparsers object."""
    source = subparsers.add_parser("mpt-source", help="MPT source training: distil per-task teacher prompts "
                                                      "into one shared prompt P* with task factors U, V")
    _add_common(source, data_help="source-task records, TASK=FILE (each task needs a teacher)")
    source.add_argument("--teachers", required=True,
                        help="folder with one prompt-tuning adapter per source task (TEACHERS/<task>)")
    source.add_argument("--num-virtual-tokens", type=int, default=None, help="default: the teachers'")
    source.add_argument("--num-ranks", type=int, default=1, help="rank of each task's factors U_k V_k")
    source.add_argument("--init", choices=("random", "text"), default="random", help="initialisation of P*")
    source.add_argument("--init-text", default=None, help="text for --init text")
    source.add_argument("--distill-weight", type=float, default=1.0, help="λ in L_LM + λ (L_KL + L_hidden)")
    source.add_argument("--temperature", type=float, default=1.0, help="τ of the KL term")
    source.set_defaults(run=run_mpt_source)

    target = subparsers.add_parser("mpt-target", help="MPT target adaptation from a source checkpoint "
                                                      "(several targets: one shared prompt, own factors)")
    _add_common(target, data_help="target records; several tasks share one P*")
    target.add_argument("--source", required=True, help="an MPT source checkpoint folder (mpt-source's --out)")
    target.add_argument("--init", choices=sorted(TARGET_INITS), default="average",
                        help="average: P* and the mean source factors; exact: one source task's factors; "
                             "shared: P* only (PEFT's AVERAGE_SOURCE_TASKS / EXACT_SOURCE_TASK / "
                             "ONLY_SOURCE_SHARED)")
    target.add_argument("--init-task", default="0", help="--init exact: source task name or index")
    target.set_defaults(run=run_mpt_target)

    rank = subparsers.add_parser("spot-rank", help="SPoT: similarity of task prompts (CSV, heatmap PNG, ranking)")
    rank.add_argument("--sources", required=True, help="folder of source prompts (one adapter per task)")
    rank.add_argument("--targets", default=None, help="folder of target prompts (default: the sources)")
    rank.add_argument("--out", required=True, help="folder for similarity.csv, similarity.png, ranking.json")
    _add_similarity(rank)
    rank.add_argument("--no-plot", action="store_true", help="skip the heatmap PNG")
    rank.set_defaults(run=run_spot_rank)

    transfer = subparsers.add_parser("spot-transfer", help="SPoT: start a target prompt from the most similar "
                                                           "source prompt(s) and tune it")
    _add_common(transfer, data_help="records of the one target task")
    transfer.add_argument("--sources", required=True, help="folder of source prompts (one adapter per task)")
    transfer.add_argument("--target-prompt", required=True,
                          help="the target's task embedding: a prompt briefly tuned on the target")
    transfer.add_argument("--top-k", type=int, default=1, help="1: the best source; k: the average of the top k")
    _add_similarity(transfer)
    transfer.set_defaults(run=run_spot_transfer)


def _add_common(parser, data_help: str) -> None:
    parser.add_argument("--model", required=True, help="local model folder (weights and tokenizer)")
    parser.add_argument("--data", action="append", required=True, metavar="[TASK=]FILE", help=data_help)
    parser.add_argument("--eval-data", action="append", metavar="[TASK=]FILE", help="evaluation records")
    add_training_options(parser)
    add_data_options(parser)
    add_model_options(parser)


def _add_similarity(parser) -> None:
    parser.add_argument("--similarity", choices=("average", "per-token"), default="average",
                        help="cosine of average-pooled prompt tokens, or the average cosine of token pairs")


def run_mpt_source(args) -> int:
    import torch

    from fastprompt.train.mpt import DistillationTrainer, source_model

    with training_setup(args) as (context, base, tokenizer):
        train_data, eval_data, kwargs = load_training_data(args, tokenizer)
        tasks = train_data.tasks
        if not tasks:
            raise ValueError("--data: mpt-source needs named source tasks (TASK=FILE or a 'task' field)")
        torch.manual_seed(args.seed)
        model, teachers = source_model(base, args.teachers, tasks, _student_config(args, tasks), path=args.path)
        trainer = DistillationTrainer(model, training_config(args), train_data, eval_data, teachers=teachers,
                                      distill_weight=args.distill_weight, temperature=args.temperature,
                                      pad_token_id=pad_id(tokenizer), tasks=tasks, distributed=context)
        transfer = {"stage": "mpt-source", "teachers": str(args.teachers), "distill_weight": args.distill_weight,
                    "temperature": args.temperature}
        return run_trainer(trainer, args, "mpt", kwargs, {"transfer": transfer})


def _student_config(args, tasks):
    """The student's MPT config from the flags; the prompt length defaults to the first teacher's."""
    from fastprompt import io
    from fastprompt.methods import MultitaskPromptTuningConfig, as_fastprompt_config

    size = args.num_virtual_tokens
    if size is None:
        teacher = Path(args.teachers) / tasks[0]
        if not (teacher / io.CONFIG_NAME).is_file():
            raise ValueError(f"--teachers: no teacher for task {tasks[0]!r} (expected {str(teacher)!r})")
        size = as_fastprompt_config(io.load_adapter_files(teacher)[0]).num_virtual_tokens
    extra = {}
    if args.init == "text":
        extra = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": args.init_text,
                 "tokenizer_name_or_path": args.model}
    return MultitaskPromptTuningConfig(num_virtual_tokens=size, num_tasks=len(tasks), num_ranks=args.num_ranks,
                                       **extra)


def run_mpt_target(args) -> int:
    import torch

    from fastprompt.train.cli import DATA_CONFIG_NAME
    from fastprompt.train.mpt import target_model
    from fastprompt.train.trainer import Trainer

    init_task = args.init_task
    if not init_task.isdigit():
        saved = Path(args.source) / DATA_CONFIG_NAME
        names = json.loads(saved.read_text()).get("tasks", []) if saved.is_file() else []
        if init_task not in names:
            raise ValueError(f"--init-task {init_task!r} is not a source task of {args.source!r} ({names}); give "
                             "a name listed there or an index")
        init_task = names.index(init_task)
    with training_setup(args) as (context, base, tokenizer):
        train_data, eval_data, kwargs = load_training_data(args, tokenizer)
        tasks = train_data.tasks
        torch.manual_seed(args.seed)
        model = target_model(base, args.source, num_tasks=max(1, len(tasks)), init=TARGET_INITS[args.init],
                             init_task=int(init_task), path=args.path)
        trainer = Trainer(model, training_config(args), train_data, eval_data, pad_token_id=pad_id(tokenizer),
                          tasks=tasks, distributed=context)
        transfer = {"stage": "mpt-target", "source": str(args.source), "init": TARGET_INITS[args.init],
                    "init_task": int(init_task)}
        return run_trainer(trainer, args, "mpt", kwargs, {"transfer": transfer})


def run_spot_rank(args) -> int:
    from fastprompt.train.spot import compare, load_prompts, write_report

    sources = load_prompts(args.sources)
    targets = load_prompts(args.targets) if args.targets else sources
    report = compare(targets, sources, args.similarity)
    written = write_report(report, args.out, plot=not args.no_plot)
    print(json.dumps({"rankings": {t: report.ranking(t) for t in report.targets},
                      **{k: str(v) for k, v in written.items()}}))
    return 0


def run_spot_transfer(args) -> int:
    import torch

    from fastprompt.methods.spot import transfer_prompt
    from fastprompt.train.spot import compare, load_prompts, spot_target_model, write_report
    from fastprompt.train.trainer import Trainer

    sources = load_prompts(args.sources)
    probes = load_prompts(args.target_prompt)
    with training_setup(args) as (context, base, tokenizer):
        train_data, eval_data, kwargs = load_training_data(args, tokenizer)
        tasks = train_data.tasks
        if len(tasks) > 1:
            raise ValueError(f"--data: spot-transfer tunes one target task, got {tasks}")
        name = tasks[0] if tasks and tasks[0] in probes else None
        if name is None and len(probes) != 1:
            raise ValueError(f"--target-prompt {args.target_prompt!r} holds prompts {sorted(probes)}; keep one, "
                             f"or name the target task ({tasks}) after one of them")
        name = name or next(iter(probes))
        report = compare({name: probes[name]}, sources, args.similarity)
        ranking = [source for source, _ in report.ranking(name)]
        if context.is_main:
            write_report(report, args.out, plot=not args.no_plot)
        torch.manual_seed(args.seed)
        model = spot_target_model(base, transfer_prompt(sources, ranking, args.top_k), tasks=tasks, path=args.path)
        trainer = Trainer(model, training_config(args), train_data, eval_data, pad_token_id=pad_id(tokenizer),
                          tasks=tasks, distributed=context)
        transfer = {"stage": "spot-transfer", "sources": str(args.sources), "metric": args.similarity,
                    "top_k": args.top_k, "chosen": ranking[:args.top_k]}
        return run_trainer(trainer, args, "prompt-tuning", kwargs, {"transfer": transfer})
