"""Multitask prompt tuning (Wang et al.): task k's prompt = P* ∘ (prefix_task_cols[k] @ prefix_task_rows[k])."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastprompt.config import check_positive_int
from fastprompt.methods.base import PromptSource, load_tensor, register
from fastprompt.methods.prompt_tuning import PromptTuningConfig, init_token_ids
from fastprompt.ops import mpt_prompts

MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"


@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """MPT (Wang et al.): task k's prompt = P* ∘ (prefix_task_cols[k] @ prefix_task_rows[k]).

    prompt_tuning_init: RANDOM, TEXT, AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK or ONLY_SOURCE_SHARED; the
    last three read `prompt_tuning_init_state_dict_path` (a source MPT checkpoint).
    """

    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int = 0
    num_ranks: int = 1
    num_tasks: int = 1
    _inits = ("RANDOM", "TEXT", "AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MULTITASK_PROMPT_TUNING
        if self.prompt_tuning_init in self._inits[2:] and not self.prompt_tuning_init_state_dict_path:
            raise ValueError(f"prompt_tuning_init={self.prompt_tuning_init!r} needs "
                             "prompt_tuning_init_state_dict_path (a source MPT checkpoint)")
        for name in ("num_ranks", "num_tasks"):
            check_positive_int(name, getattr(self, name))


@register(MULTITASK_PROMPT_TUNING, MultitaskPromptTuningConfig)
class MultitaskPromptTuning(PromptSource):
    kind = "tokens"
    routes_by_task = True
    prompts_the_decoder = True

    @classmethod
    def build(cls, config, backbone):
        return cls(config, backbone.word_embeddings)

    def __init__(self, config, word_embeddings: nn.Embedding):
        super().__init__(config)
        P, d, r, n = config.num_virtual_tokens, config.token_dim, config.num_ranks, config.num_tasks
        self.embedding = nn.Embedding(P, d)  # the shared prompt P*
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, 0.02, (n, P, r)))
        self.prefix_task_rows = nn.Parameter(torch.normal(0.0, 0.02, (n, r, d)))
        if config.inference_mode:
            return
        ids = init_token_ids(config, word_embeddings.num_embeddings, P) if config.prompt_tuning_init == "TEXT" else None
        if ids is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(word_embeddings.weight[ids.to(word_embeddings.weight.device)].float())
        if config.prompt_tuning_init in ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"):
            self._init_from_source(config)

    def _init_from_source(self, config) -> None:
        from fastprompt.io import read_tensors

        source = read_tensors(config.prompt_tuning_init_state_dict_path)
        load_tensor(self.embedding.weight, source, "prompt_embeddings")
        if config.prompt_tuning_init == "ONLY_SOURCE_SHARED":
            return
        cols, rows = source.get("prefix_task_cols"), source.get("prefix_task_rows")
        if cols is None or rows is None:
            raise ValueError(f"prompt_tuning_init_state_dict_path={config.prompt_tuning_init_state_dict_path!r} "
                             "has no prefix_task_cols/prefix_task_rows (not an MPT checkpoint)")
        if config.prompt_tuning_init == "AVERAGE_SOURCE_TASKS":
            cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
        else:
            task = config.prompt_tuning_init_task
            if not 0 <= task < cols.shape[0]:
                raise ValueError(f"prompt_tuning_init_task must lie in [0, {cols.shape[0]}) (source tasks), got {task}")
            cols, rows = cols[task:task + 1], rows[task:task + 1]
        # Every target task starts from the chosen source factors.
        n = config.num_tasks
        load_tensor(self.prefix_task_cols, {"c": cols.expand(n, -1, -1)}, "c")
        load_tensor(self.prefix_task_rows, {"r": rows.expand(n, -1, -1)}, "r")

    @property
    def num_entries(self) -> int:
        return self.config.num_tasks

    def prompts(self, entries, backend=None):
        return mpt_prompts(self.embedding.weight, self.prefix_task_cols, self.prefix_task_rows, entries,
                           backend=backend)

    def peft_state_dict(self):
        return {"prompt_embeddings": self.embedding.weight.detach(),
                "prefix_task_cols": self.prefix_task_cols.detach(),
                "prefix_task_rows": self.prefix_task_rows.detach()}

    def load_peft_state_dict(self, state):
        load_tensor(self.embedding.weight, state, "prompt_embeddings")
        load_tensor(self.prefix_task_cols, state, "prefix_task_cols")
        load_tensor(self.prefix_task_rows, state, "prefix_task_rows")
