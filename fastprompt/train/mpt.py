"""MPT as in Wang et al. 2023: teachers, source training by prompt distillation, target adaptation.

1. Teachers: one prompt-tuning prompt per source task, e.g. `fastprompt train --method prompt-tuning
   --data a=A.jsonl --data b=B.jsonl --out teachers` (the adapters land in teachers/a, teachers/b), or in
   Python ``Trainer(task_model(base, PromptTuningConfig(...), tasks), ...)``.
2. Source training: `source_model` puts a student MPT adapter "default" (P*, U, V; task k's prompt is
   P* ∘ (U_k V_k), PEFT's parameter names) beside the frozen teachers in one PromptModel, and
   `DistillationTrainer` trains the student over all source tasks in mixed-task batches with

       L = L_LM + λ (L_KL + L_hidden)

   L_LM: the student's token-mean cross-entropy on the target tokens (as `PromptModel`'s loss).
   L_KL: τ² KL(softmax(z_teacher / τ) ‖ softmax(z_student / τ)) per target token, mean over target tokens
         (the positions L_LM scores; z are next-token logits).
   L_hidden: mean squared error between teacher and student hidden states, over the final layer's output
         (the LM head's input) at every non-padding token of the row (input and target tokens; the
         virtual tokens are the prompts themselves and are left out), mean over tokens × features.
   Each row's teacher is its task's prompt on the same frozen backbone, run without grad in the same
   mixed batch (one adapter name per row). λ = `distill_weight`, τ = `temperature`.
   The output folder holds the student alone: a PEFT MPT checkpoint with num_tasks = source tasks.
3. Target adaptation: `target_model` starts a fresh MPT adapter from a source checkpoint with PEFT's
   `prompt_tuning_init` semantics (AVERAGE_SOURCE_TASKS: P* and the mean of the source U and V, so a
   target's prompt starts at P* ∘ (mean_k U_k · mean_k V_k); EXACT_SOURCE_TASK: one source task's
   factors; ONLY_SOURCE_SHARED: P* with fresh N(0, 0.02) factors), then the plain `Trainer` tunes all of
   it. With several targets (num_tasks > 1) one shared P* trains over all of them, each with its own
   factors, all starting from the same source factors (PEFT itself accepts these inits only for
   num_tasks = 1).

In Python (`data` from `load_data` with a task per record; `tasks = data.tasks`, sorted, are the task ids):

    model, teachers = source_model(base, "runs/teachers", tasks)
    DistillationTrainer(model, TrainingConfig(output_dir="runs/mpt", lr=0.3, optimizer="adafactor"), data,
                        teachers=teachers, distill_weight=1.0, temperature=2.0, tasks=tasks,
                        pad_token_id=tokenizer.pad_token_id).train()        # runs/mpt: the PEFT MPT checkpoint
    target = target_model(base, "runs/mpt", num_tasks=1)                     # P* ∘ (mean U · mean V)
    Trainer(target, TrainingConfig(output_dir="runs/target"), target_data).train()

Checkpoints are PEFT's files. A target's adapter_config.json says prompt_tuning_init RANDOM: its weights
are complete, and PEFT would otherwise re-read the source file whenever it loads the target (and refuse
num_tasks > 1); the `mpt-target` command records the source under "transfer" in fastprompt_data.json.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fastprompt import io
from fastprompt.methods import MULTITASK_PROMPT_TUNING, MultitaskPromptTuningConfig, as_fastprompt_config
from fastprompt.train.losses import distillation_kl, hidden_mse
from fastprompt.train.trainer import Trainer

TEACHER_PREFIX = "teacher-"
SOURCE_INITS = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")


def prompt_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, task_ids=None,
                         adapter_names=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-layer hidden states of a virtual-token adapter's forward (the shared-prefix path).

    input_ids, attention_mask: [B, T] (right padding, as `collate` makes); rows choose adapters as in
    `PromptModel.forward`. Returns (hidden [B, T, d] of the rows' tokens, hidden [B, d] of each row's last
    virtual token), in the backbone's dtype; `model.backbone.lm_head` of them gives `forward`'s logits.
    """
    hidden, last_virtual = model.hidden_states(input_ids, attention_mask, task_ids=task_ids,
                                               adapter_names=adapter_names, path="shared_prefix")
    if last_virtual is None:
        raise ValueError("prompt_hidden_states needs virtual-token adapters (prompt tuning, P-tuning, MPT), "
                         "got prefix tuning")
    return hidden, last_virtual


def next_token_states(hidden: torch.Tensor, last_virtual: torch.Tensor) -> torch.Tensor:
    """[B, T, d]: position t holds the state that predicts token t (the last virtual token for t = 0),
    so it lines up with `labels` [B, T] as in PromptModel's loss."""
    return torch.cat([last_virtual[:, None], hidden[:, :-1]], dim=1)


class DistillationTrainer(Trainer):
    """MPT source training: the `Trainer` with L = L_LM + λ (L_KL + L_hidden) (see the module docstring).

    model: a PromptModel whose active adapter is the MPT student and which holds a frozen virtual-token
        teacher per task (`source_model` builds one).
    teachers: task name -> teacher adapter name; every training task needs one.
    distill_weight: λ. temperature: τ of the KL term.
    The other arguments are the Trainer's. The log records lm_loss, kl_loss and hidden_loss besides loss.
    """

    def __init__(self, model, config, train_data, eval_data=None, *, teachers: dict[str, str],
                 distill_weight: float = 1.0, temperature: float = 1.0, **kwargs):
        super().__init__(model, config, train_data, eval_data, **kwargs)
        if not self.routes_by_task:
            raise ValueError(f"the active adapter {model.active_adapter!r} must be the MPT student, it is "
                             f"{model.active_peft_config.peft_type}")
        if not train_data.tasks or any(e.task is None for e in train_data.examples):
            raise ValueError("train_data: every record needs its source task (a 'task' field or TASK=FILE)")
        missing = [t for t in self.tasks if t not in teachers]
        if missing:
            raise ValueError(f"teachers: no teacher for tasks {missing} (given for {sorted(teachers)})")
        for task, name in teachers.items():
            if name not in model.adapter_names:
                raise ValueError(f"teachers[{task!r}]={name!r} is not a loaded adapter; loaded: {model.adapter_names}")
            if model.prompt_sources[name].kind != "tokens":
                raise ValueError(f"teachers[{task!r}]={name!r} must be a virtual-token prompt (prompt tuning)")
            if any(p.requires_grad for p in model.prompt_sources[name].parameters()):
                raise ValueError(f"teachers[{task!r}]={name!r} is trainable; load teachers frozen "
                                 "(is_trainable=False)")
        if not distill_weight >= 0:
            raise ValueError(f"distill_weight must be >= 0, got {distill_weight!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.teachers = dict(teachers)
        self.distill_weight = distill_weight
        self.temperature = temperature

    def normalizers(self, batches: list[dict]) -> dict[str, int]:
        """The Trainer's target_tokens, plus hidden_elements: non-padding tokens × hidden size."""
        hidden_size = self.model.backbone.hidden_size
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        return {**super().normalizers(batches), "hidden_elements": max(1, tokens * hidden_size)}

    def compute_loss(self, batch: dict, norms: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = self.model
        inputs = self.model_inputs(batch)
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        targets = labels != -100
        lm_head = model.backbone.lm_head
        student, student_last = prompt_hidden_states(model, ids, mask, task_ids=inputs["task_ids"])
        student_logits = lm_head(next_token_states(student, student_last)[targets])
        with torch.no_grad():
            teacher, teacher_last = prompt_hidden_states(
                model, ids, mask, adapter_names=[self.teachers[t] for t in batch["tasks"]])
            teacher_logits = lm_head(next_token_states(teacher, teacher_last)[targets])
        lm = F.cross_entropy(student_logits.float(), labels[targets], reduction="sum") / norms["target_tokens"]
        kl = distillation_kl(student_logits, teacher_logits, self.temperature) / norms["target_tokens"]
        hidden = hidden_mse(student, teacher, mask) / norms["hidden_elements"]
        return lm + self.distill_weight * (kl + hidden), {"lm_loss": lm, "kl_loss": kl, "hidden_loss": hidden}

    def save_model(self, folder) -> None:
        """The student alone, at the folder's root (PEFT's MPT checkpoint)."""
        self.model.save_pretrained(folder, selected_adapters=[self.model.active_adapter])


def start_tasks_at_shared_prompt(model, adapter_name: str | None = None) -> None:
    """Set MPT adapter `adapter_name`'s (default: the active one) task factors so that every U_k V_k is all
    ones (U = 1, V = 1/r): each task's prompt P* ∘ (U_k V_k) then starts as P* itself.

    `fastprompt train --method mpt` does this for a text start. PEFT draws the factors from N(0, 0.02),
    which leaves every task prompt near 0 whatever P* holds: the text start is lost and the gradients
    through the product are a thousandth of prompt tuning's (measured: such a start stayed near chance on
    news and debates, README "Default recipe"). Source-initialised targets keep their source factors."""
    name = adapter_name or model.active_adapter
    source = model.prompt_sources[name]
    if not source.routes_by_task:
        raise ValueError(f"adapter {name!r} is not an MPT adapter (got {type(source).__name__})")
    with torch.no_grad():
        source.prefix_task_cols.fill_(1.0)
        source.prefix_task_rows.fill_(1.0 / source.prefix_task_rows.shape[1])


def source_model(base_model, teachers_dir, tasks: list[str], config: MultitaskPromptTuningConfig | None = None,
                 *, path: str = "auto"):
    """A PromptModel for MPT source training: the student MPT adapter "default" (active, trainable) and
    each task's teacher from ``teachers_dir/<task>`` loaded frozen as ``"teacher-<task>"``.

    tasks: the source tasks in task-id order (the Trainer's `tasks`: sorted names by default).
    config: the student's MPT config; by default the teachers' num_virtual_tokens, rank 1, and
        num_tasks = len(tasks) (a given config must have that num_tasks).
    Returns (model, teachers) with teachers: task -> adapter name, for `DistillationTrainer`.
    """
    import fastprompt

    if not tasks:
        raise ValueError("tasks: MPT source training needs at least one named source task")
    folders = {task: Path(teachers_dir) / task for task in tasks}
    for task, folder in folders.items():
        if not (folder / io.CONFIG_NAME).is_file():
            raise ValueError(f"teachers_dir: no teacher for task {task!r} (expected {str(folder)!r} with "
                             f"{io.CONFIG_NAME}, as `fastprompt train --data {task}=FILE --out DIR` writes)")
    if config is None:
        first = as_fastprompt_config(io.load_adapter_files(folders[tasks[0]])[0])
        config = MultitaskPromptTuningConfig(num_virtual_tokens=first.num_virtual_tokens, num_tasks=len(tasks))
    if config.num_tasks != len(tasks):
        raise ValueError(f"config.num_tasks={config.num_tasks} must equal the number of source tasks {len(tasks)}")
    model = fastprompt.get_peft_model(base_model, config, "default", path=path)
    teachers = {}
    for task, folder in folders.items():
        teachers[task] = TEACHER_PREFIX + task
        model.load_adapter(folder, teachers[task], is_trainable=False)
    return model, teachers


def read_source(source_dir) -> tuple[MultitaskPromptTuningConfig, Path]:
    """(config, weights file) of an MPT source checkpoint folder; ValueError if it is not one."""
    source_dir = Path(source_dir)
    config = as_fastprompt_config(io.load_adapter_files(source_dir)[0])
    if config.peft_type != MULTITASK_PROMPT_TUNING:
        raise ValueError(f"source {str(source_dir)!r} is a {config.peft_type} adapter, not an MPT checkpoint")
    weights = source_dir / io.WEIGHTS_NAME
    return config, weights if weights.is_file() else source_dir / io.LEGACY_WEIGHTS_NAME


def target_model(base_model, source_dir, *, num_tasks: int = 1, init: str = "AVERAGE_SOURCE_TASKS",
                 init_task: int = 0, adapter_name: str = "default", path: str = "auto"):
    """A PromptModel with a fresh MPT adapter for `num_tasks` target tasks, initialised from the MPT
    checkpoint in `source_dir` (PEFT's prompt_tuning_init semantics, see the module docstring).

    init: AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK (source task index `init_task`) or ONLY_SOURCE_SHARED.
    The adapter's config (what save_pretrained writes) says RANDOM with no source path; its shape
    (num_virtual_tokens, num_ranks) is the source's. Every parameter trains.
    """
    import fastprompt
    from fastprompt.methods import resolve_config
    from fastprompt.methods import build_source

    if init not in SOURCE_INITS:
        raise ValueError(f"init must be one of {SOURCE_INITS}, got {init!r}")
    source, weights = read_source(source_dir)
    shape = dict(num_virtual_tokens=source.num_virtual_tokens, num_ranks=source.num_ranks, num_tasks=num_tasks)
    model = fastprompt.get_peft_model(base_model, MultitaskPromptTuningConfig(**shape), adapter_name, path=path)
    start = MultitaskPromptTuningConfig(**shape, prompt_tuning_init=init, prompt_tuning_init_task=init_task,
                                        prompt_tuning_init_state_dict_path=str(weights))
    initial = build_source(resolve_config(start, model.backbone), model.backbone)
    model.prompt_sources[adapter_name].load_state_dict(initial.state_dict())
    return model
