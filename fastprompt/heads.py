"""Trainable copies of base-model modules per adapter: PEFT's `modules_to_save` (a classifier head).

PEFT wraps such a module so each adapter trains its own copy and saves it in the adapter file as
`base_model.<module name>.<tensor>`. Here the copies ride with the adapter's prompt source (`WithHeads`),
so adding, loading, saving, deleting and training checkpoints carry them; for one call, `routed_heads`
puts a module in the base model's place that sends each row to its adapter's copy (mixed-task batches).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

from fastprompt.methods.base import PromptSource, load_tensor

# Names PeftModelForSequenceClassification always adds to modules_to_save (PEFT >= 0.22 also DistilBERT's
# "pre_classifier"); a model has some of them, and the others are not an error.
CLASSIFIER_NAMES = ("classifier", "score", "pre_classifier")


def copy_heads(base_model: nn.Module, names, trainable: bool) -> dict[str, nn.Module]:
    """Copies of the base model's direct children named in `names` (PEFT's modules_to_save), trainable or
    frozen. ValueError if a name other than PEFT's default classifier names is not a child, or if no name is.
    """
    children = dict(base_model.named_children())
    missing = [n for n in names if n not in children and n not in CLASSIFIER_NAMES]
    found = [n for n in names if n in children]
    if missing or (names and not found):
        raise ValueError(f"modules_to_save={list(names)}: {type(base_model).__name__} has no module named "
                         f"{missing or list(names)} (its modules: {sorted(children)}); for classification load "
                         f"the model with a head, e.g. AutoModelForSequenceClassification")
    heads = {}
    for name in found:
        head = copy.deepcopy(children[name])
        for param in head.parameters():
            param.requires_grad_(trainable)
        heads[name] = head
    return heads


def load_heads(heads: dict[str, nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Copy `base_model.<name>.<tensor>` entries of an adapter file into the heads (ValueError naming a
    missing or misshapen tensor)."""
    for name, head in heads.items():
        for key, tensor in head.state_dict(keep_vars=True).items():
            load_tensor(tensor, state, f"base_model.{name}.{key}")


class WithHeads(PromptSource):
    """A prompt source plus its adapter's copies of base-model modules (see the module docstring)."""

    def __init__(self, source: PromptSource, heads: dict[str, nn.Module]):
        super().__init__(source.config)
        self.kind, self.routes_by_task = source.kind, source.routes_by_task
        self.prompts_the_decoder = source.prompts_the_decoder
        self.source = source
        self.heads = nn.ModuleDict(heads)

    @property
    def num_entries(self) -> int:
        return self.source.num_entries

    def prompts(self, entries, backend=None):
        return self.source.prompts(entries, backend)

    def prefix_kv(self, entries):
        return self.source.prefix_kv(entries)

    def peft_state_dict(self):
        state = self.source.peft_state_dict()
        for name, head in self.heads.items():
            state.update({f"base_model.{name}.{k}": v.detach() for k, v in head.state_dict().items()})
        return state

    def load_peft_state_dict(self, state):
        load_heads(dict(self.heads), state)  # checked first: a bad file changes nothing
        self.source.load_peft_state_dict(state)


class _RowRouter(nn.Module):
    """Applies modules[g] to the rows in groups[g] of its first argument ([B, ...]) and reassembles them."""

    def __init__(self, modules: list[nn.Module], groups: list[torch.Tensor]):
        super().__init__()
        self._modules_per_group = modules  # a plain list: the copies stay owned by their adapters
        self.groups = groups

    def forward(self, x, *args, **kwargs):
        if len(self.groups) == 1:
            return self._modules_per_group[0](x, *args, **kwargs)
        outputs = [m(x[rows], *args, **kwargs) for m, rows in zip(self._modules_per_group, self.groups)]
        out = outputs[0].new_zeros((x.shape[0], *outputs[0].shape[1:]))
        for rows, y in zip(self.groups, outputs):
            out = out.index_put((rows,), y)
        return out


@contextmanager
def routed_heads(base_model: nn.Module, sources, plan):
    """For the duration of a call, replace each head module of the base model by a router that sends every
    row to its adapter's copy (the base model's own module for an adapter without one).

    sources: adapter name → prompt source (WithHeads or not); plan: the batch's BankPlan.
    """
    entry_adapter = [name for name, entries in plan.sources for _ in range(len(entries))]
    row_adapter = [entry_adapter[e] for e in plan.bank_rows.tolist()]
    adapters = list(dict.fromkeys(row_adapter))
    groups = [torch.tensor([i for i, a in enumerate(row_adapter) if a == name], dtype=torch.long,
                           device=plan.bank_rows.device) for name in adapters]
    names = {n for a in adapters if isinstance(sources[a], WithHeads) for n in sources[a].heads}
    originals = {name: getattr(base_model, name) for name in names}
    try:
        for name, original in originals.items():
            modules = [sources[a].heads[name] if isinstance(sources[a], WithHeads) and name in sources[a].heads
                       else original for a in adapters]
            setattr(base_model, name, _RowRouter(modules, groups))
        yield
    finally:
        for name, original in originals.items():
            setattr(base_model, name, original)
