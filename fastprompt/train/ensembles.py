"""Prompt ensembles trained in one mixed batch: K prompts of one classification task learn side by side.

Lester et al. ensemble prompt tuning by training several prompts of one task and combining their answers;
fastprompt trains them together: every training example appears once per member, each copy routed to its
member's adapter by name, so one step of batch ``K × b`` gives each member about b rows (its own draw of the
data), and the backbone runs once per step for all of them. The ensemble's answer is the label with the
highest mean log-likelihood over the members (`fastprompt.ensemble.combine_predictions`'s "mean").

    names = member_names(3)                                   # ["member0", "member1", "member2"]
    model = task_model(base, config, names)                   # one adapter per member, the same start
    trainer = Trainer(model, TrainingConfig(..., batch_size=8 * 3), replicate(train, names), ...)
    trainer.train()
    predictions = ensemble_classify(trainer, test, names)
"""

from __future__ import annotations

import dataclasses

import torch

from fastprompt.ensemble import combine_predictions
from fastprompt.train.data import PromptDataset


def member_names(count: int) -> list[str]:
    """The adapter names of an ensemble of `count` (≥ 2) prompts: member0, member1, ..."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got count={count!r}")
    return [f"member{i}" for i in range(count)]


def replicate(data: PromptDataset, names: list[str]) -> PromptDataset:
    """`data` (one task: its examples carry no task name) once per member, each copy's task the member's
    name, so the Trainer routes it to that member's adapter; each member gets the task's label choices."""
    if data.tasks:
        raise ValueError(f"an ensemble trains one task's data; got examples of tasks {data.tasks}")
    if not names:
        raise ValueError("names must list at least one member")
    examples = [dataclasses.replace(e, task=name) for name in names for e in data.examples]
    choices = {name: data.choices[None] for name in names} if None in data.choices else {}
    return PromptDataset(examples, choices)


def ensemble_classify(trainer, data: PromptDataset, names: list[str]) -> list[str]:
    """Each of `data`'s examples' label under the ensemble `names` of `trainer.model` (`data`: one task's
    classification examples): the label whose verbalizer's log-likelihood (as `Trainer.label_scores` gives
    it), averaged over the members, is highest (`combine_predictions`, "mean"). Leaves the model's active
    adapter as it was."""
    model = trainer.model
    missing = [n for n in names if n not in model.adapter_names]
    if missing or not names:
        raise ValueError(f"names must be loaded adapters; missing {missing or names}, loaded: {model.adapter_names}")
    if data.tasks:
        raise ValueError(f"an ensemble answers one task's data; got examples of tasks {data.tasks}")
    labels = [label for label, _ in data.choices[None]]
    active = model.active_adapter
    try:
        scores = []
        for name in names:
            model.set_adapter(name)
            scores.append([[own[label] for label in labels]
                           for own in trainer.label_scores(data.examples, data.choices)])
    finally:
        model.set_adapter(active)
    chosen = combine_predictions(torch.tensor(scores, dtype=torch.float64), how="mean")   # [n_examples]
    return [labels[i] for i in chosen.tolist()]
