"""MPT: the distillation objective against a plain concatenation forward, source training, target init
equal to P* ∘ mean factors, and PEFT loading the checkpoints of both stages."""

import json
import warnings

import pytest
import torch

import fastprompt
from fastprompt.train import TrainingConfig
from fastprompt.train.mpt import (
    DistillationTrainer,
    next_token_states,
    prompt_hidden_states,
    source_model,
    start_tasks_at_shared_prompt,
    target_model,
)
from tests.helpers import assert_close
from tests.tiny_models import tiny_model
from tests.train.common import dataset, seq2seq_records

P, TASKS = 3, ["down", "up"]


def _randomise(source, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in source.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.7)


def _teachers_dir(tmp_path):
    teachers = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=P),
                                         TASKS[0])
    teachers.add_adapter(TASKS[1], fastprompt.PromptTuningConfig(num_virtual_tokens=P))
    for k, name in enumerate(TASKS):
        _randomise(teachers.prompt_sources[name], 10 + k)
    teachers.save_pretrained(tmp_path / "teachers")
    return tmp_path / "teachers"


def _source(tmp_path):
    config = fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=P, num_tasks=2, num_ranks=2)
    model, teachers = source_model(tiny_model("llama"), _teachers_dir(tmp_path), TASKS, config)
    _randomise(model.prompt_sources["default"], 7)
    return model, teachers


def _trainer(tmp_path, model, teachers, **kwargs):
    data = dataset(tmp_path, seq2seq_records(9, seed=3, tasks=TASKS))
    config = TrainingConfig(output_dir=str(tmp_path / "out"), steps=3, batch_size=5, lr=0.05, progress="none",
                            plot=False)
    return DistillationTrainer(model, config, data, teachers=teachers, **kwargs)


def _concat_hidden(model, prompts, ids, mask):
    """Plain definition: the prompt [B, P, d] placed before each row, through the HF decoder."""
    embeds = torch.cat([prompts, model.backbone.word_embeddings(ids)], dim=1)
    full_mask = torch.cat([torch.ones_like(mask[:, :P]), mask], dim=1)
    hidden = model.base_model.model(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state
    return hidden[:, P:], hidden[:, P - 1]


def _student_prompts(model, task_ids):
    source = model.prompt_sources["default"]
    return source.embedding.weight[None] * (source.prefix_task_cols @ source.prefix_task_rows)[task_ids]


def test_hidden_states_equal_a_concatenation_forward(tmp_path):
    model, teachers = _source(tmp_path)
    batch = _trainer(tmp_path, model, teachers).step_batches(0)[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    task_ids = torch.tensor([TASKS.index(t) for t in batch["tasks"]])
    teacher_prompts = torch.stack([model.prompt_sources[teachers[t]].embedding.weight for t in batch["tasks"]])
    real = mask.bool()
    with torch.no_grad():
        for name, kwargs, prompts in [("student", {"task_ids": task_ids}, _student_prompts(model, task_ids)),
                                      ("teacher", {"adapter_names": [teachers[t] for t in batch["tasks"]]},
                                       teacher_prompts)]:
            hidden, last = prompt_hidden_states(model, ids, mask, **kwargs)
            ref_hidden, ref_last = _concat_hidden(model, prompts, ids, mask)
            assert_close(f"{name} hidden", hidden[real], ref_hidden[real], 1e-4)
            assert_close(f"{name} last virtual", last, ref_last, 1e-4)
            logits = model.backbone.lm_head(hidden)
            assert_close(f"{name} logits", logits[real], model(input_ids=ids, attention_mask=mask, **kwargs).logits[real],
                         1e-5)


@pytest.mark.parametrize("weight, temperature", [(0.7, 2.0), (1.0, 1.0)])
def test_distillation_loss_equals_hand_computation(tmp_path, weight, temperature):
    model, teachers = _source(tmp_path)
    trainer = _trainer(tmp_path, model, teachers, distill_weight=weight, temperature=temperature)
    batch = trainer.step_batches(0)[0]
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    task_ids = torch.tensor([TASKS.index(t) for t in batch["tasks"]])
    teacher_prompts = torch.stack([model.prompt_sources[teachers[t]].embedding.weight for t in batch["tasks"]])
    with torch.no_grad():
        loss, terms = trainer.compute_loss(batch, trainer.normalizers([batch]))
        s_hidden, s_last = _concat_hidden(model, _student_prompts(model, task_ids), ids, mask)
        t_hidden, t_last = _concat_hidden(model, teacher_prompts, ids, mask)
        targets = labels != -100
        s_logits = model.backbone.lm_head(next_token_states(s_hidden, s_last))[targets].double()
        t_logits = model.backbone.lm_head(next_token_states(t_hidden, t_last))[targets].double()
        n_targets = int(targets.sum())
        lm = -torch.log_softmax(s_logits, -1).gather(-1, labels[targets][:, None]).sum() / n_targets
        p_t = torch.softmax(t_logits / temperature, -1)
        kl = (p_t * (p_t.log() - torch.log_softmax(s_logits / temperature, -1))).sum() * temperature ** 2 / n_targets
        real = mask.bool()
        hidden = (s_hidden[real] - t_hidden[real]).double().pow(2).mean()
        own_loss = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids).loss
    assert float(terms["lm_loss"]) == pytest.approx(float(lm), rel=1e-4)
    assert float(terms["lm_loss"]) == pytest.approx(float(own_loss), rel=1e-5)    # PromptModel's own loss
    assert float(terms["kl_loss"]) == pytest.approx(float(kl), rel=1e-3)
    assert float(terms["hidden_loss"]) == pytest.approx(float(hidden), rel=1e-4)
    assert float(loss) == pytest.approx(float(lm + weight * (kl + hidden)), rel=1e-4)


def test_source_training_updates_only_the_student_and_saves_it_alone(tmp_path):
    model, teachers = _source(tmp_path)
    before = {n: p.clone() for n, p in model.named_parameters()}
    result = _trainer(tmp_path, model, teachers, distill_weight=0.5, temperature=2.0).train()
    changed = {n.split(".")[1] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"default"}
    for record in result.log:
        assert record["loss"] == pytest.approx(record["lm_loss"] + 0.5 * (record["kl_loss"] + record["hidden_loss"]),
                                               rel=1e-5)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []   # no teacher folders
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "MULTITASK_PROMPT_TUNING" and config["num_tasks"] == 2
    loaded = fastprompt.from_pretrained(tiny_model("llama"), out)
    assert torch.equal(loaded.prompt_sources["default"].prefix_task_rows, model.prompt_sources["default"].prefix_task_rows)


def test_distillation_trainer_refuses_a_missing_or_trainable_teacher(tmp_path):
    model, teachers = _source(tmp_path)
    with pytest.raises(ValueError, match=r"no teacher for tasks \['up'\]"):
        _trainer(tmp_path, model, {"down": teachers["down"]})
    for param in model.prompt_sources[teachers["up"]].parameters():
        param.requires_grad_(True)
    with pytest.raises(ValueError, match="is trainable"):
        _trainer(tmp_path, model, teachers)


def _source_checkpoint(tmp_path, num_tasks=3, ranks=2):
    model = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.MultitaskPromptTuningConfig(
        num_virtual_tokens=5, num_tasks=num_tasks, num_ranks=ranks))
    _randomise(model.prompt_sources["default"], 21)
    model.save_pretrained(tmp_path / "source")
    return tmp_path / "source", model.prompt_sources["default"]


def test_target_init_is_shared_prompt_times_mean_factors(tmp_path):
    folder, source = _source_checkpoint(tmp_path)
    cols, rows, shared = source.prefix_task_cols.detach(), source.prefix_task_rows.detach(), source.embedding.weight
    expected = shared.detach() * (cols.mean(0) @ rows.mean(0))          # P* ∘ (mean U · mean V)
    target = target_model(tiny_model("llama"), folder, num_tasks=2)
    all_tasks = torch.arange(2)
    prompts = target.prompt_sources["default"].prompts(all_tasks)
    for k in range(2):                                                  # both targets start there
        assert_close(f"average init, target {k}", prompts[k], expected, 1e-6)
    assert all(p.requires_grad for p in target.prompt_sources["default"].parameters())
    exact = target_model(tiny_model("llama"), folder, init="EXACT_SOURCE_TASK", init_task=1)
    assert_close("exact init", exact.prompt_sources["default"].prompts(torch.tensor([0]))[0],
                 shared.detach() * (cols[1] @ rows[1]), 1e-6)
    only = target_model(tiny_model("llama"), folder, init="ONLY_SOURCE_SHARED")
    assert torch.equal(only.prompt_sources["default"].embedding.weight, shared)
    assert not torch.equal(only.prompt_sources["default"].prefix_task_cols[0], cols.mean(0))
    with pytest.raises(ValueError, match="init must be one of"):
        target_model(tiny_model("llama"), folder, init="RANDOM")


@pytest.mark.parametrize("init", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
def test_peft_initialises_a_target_from_our_source_checkpoint_the_same_way(tmp_path, init):
    peft = pytest.importorskip("peft")
    folder, _ = _source_checkpoint(tmp_path)
    config = peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, num_tasks=1, num_ranks=2, prompt_tuning_init=init,
        prompt_tuning_init_task=2, prompt_tuning_init_state_dict_path=str(folder / "adapter_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_model("llama"), config).prompt_encoder["default"]
    ours = target_model(tiny_model("llama"), folder, init=init, init_task=2)
    mine = ours.prompt_sources["default"]
    assert torch.equal(mine.embedding.weight, theirs.embedding.weight)
    if init != "ONLY_SOURCE_SHARED":     # there the factors are fresh random draws in both
        assert torch.equal(mine.prefix_task_cols, theirs.prefix_task_cols)
        assert torch.equal(mine.prefix_task_rows, theirs.prefix_task_rows)
    # The target checkpoint loads into PEFT without the source file (its config says RANDOM).
    ours.save_pretrained(tmp_path / "target")
    (folder / "adapter_model.safetensors").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "target").prompt_encoder["default"]
    for name in ("embedding.weight", "prefix_task_cols", "prefix_task_rows"):
        assert torch.equal(loaded.state_dict()[name], mine.state_dict()[name]), name


def test_task_prompts_start_as_the_shared_prompt():
    config = fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=4, num_tasks=3, num_ranks=2)
    model = fastprompt.get_peft_model(tiny_model("llama"), config)
    source = model.prompt_sources["default"]
    shared = source.embedding.weight.detach()
    tasks = torch.arange(3)
    # PEFT's N(0, 0.02) factors leave every task prompt near 0, whatever P* holds.
    assert source.prompts(tasks).abs().max() < 0.05 * shared.abs().max()
    start_tasks_at_shared_prompt(model)
    assert torch.equal(source.prompts(tasks), shared.expand(3, -1, -1))


def test_only_an_mpt_adapter_starts_its_tasks_at_the_shared_prompt():
    model = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="adapter 'default' is not an MPT adapter"):
        start_tasks_at_shared_prompt(model)
