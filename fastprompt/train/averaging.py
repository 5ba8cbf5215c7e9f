"""Tail averaging: a run that ends with the mean of its prompts after each of its last steps, not the last
step's alone (as stochastic weight averaging averages a run's late weights: Izmailov et al., 2018).

A run of S steps averaging its last N (``TrainingConfig.average_last``) keeps, from step S - N + 1 on, a running
mean of every trainable parameter; `apply` puts the mean into the parameters when the steps end. The mean lives
in the optimizer's per-parameter state under ``"tail_mean"`` (as torchcontrib's SWA kept its buffer), with the
step it starts from, so a checkpoint carries it and a resumed run continues it exactly. Measured on the
default recipe (README, "Tail averaging"): the last steps of a decaying rate can move a prompt across a
narrow decision margin; their mean does not follow the last one.
"""

from __future__ import annotations

import torch

MEAN_KEY = "tail_mean"
FROM_KEY = "tail_from"   # the first step in the mean (1-based), to refuse a resume that would average others


def last_steps(steps: int, share: float) -> int:
    """How many of a run's `steps` steps a recipe's `average_tail` share averages (rounded down), 0 when that is
    one step: the mean of one step's prompt is that prompt, so such a run does not average."""
    count = int(steps * share)
    return count if count > 1 else 0


def first_step(steps: int, last: int) -> int:
    """The first of the `last` steps (1-based) a run of `steps` steps averages."""
    return steps - last + 1


def accumulate(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], step: int, first: int) -> None:
    """After optimizer step `step` (1-based): fold the parameters into the running mean of steps `first`..`step`
    (nothing before `first`)."""
    count = step - first + 1
    if count < 1:
        return
    with torch.no_grad():
        if count == 1:
            for p in params:
                optimizer.state[p].update({MEAN_KEY: p.detach().clone(), FROM_KEY: first})
            return
        means = [optimizer.state[p][MEAN_KEY] for p in params]
        torch._foreach_lerp_(means, [p.detach() for p in params], 1.0 / count)


def check_resumed(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], step: int, first: int) -> None:
    """ValueError unless a run resumed after `step` steps holds the running mean this run would have: one from
    step `first` when `step` >= `first`, none before."""
    held = {optimizer.state[p].get(FROM_KEY) for p in params}
    expected = {first} if step >= first else {None}
    if held != expected:
        said = ", ".join("none" if f is None else f"from step {f}" for f in sorted(held, key=str))
        raise ValueError(f"resume: the checkpoint of step {step} holds a mean of the prompts {said}, but this run "
                         f"averages from step {first}: resume with the interrupted run's steps and average_last")


def apply(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> bool:
    """Put the running mean into the parameters; whether there was one (False: no averaged step ran)."""
    if not all(MEAN_KEY in optimizer.state[p] for p in params):
        return False
    with torch.no_grad():
        for p in params:
            p.copy_(optimizer.state[p][MEAN_KEY])
    return True
