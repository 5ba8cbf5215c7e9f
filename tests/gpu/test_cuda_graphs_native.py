"""CudaGraphLoss on CUDA: each replay equals an eager step (loss and every prompt gradient) on new inputs,
after optimizer updates, on a second shape, for prompt tuning, prefix tuning and MPT with task ids; the
gradients it hands to .grad do not silently accumulate. CudaGraphStep on CUDA: each replay of the whole
step (capturable AdamW included) equals the same eager step, and it is the Trainer's default."""

from __future__ import annotations

import pytest
import torch

import fastprompt
from fastprompt.train import CudaGraphLoss
from tests.helpers import DEVICE, assert_close
from tests.peft_pairs import METHODS
from tests.tiny_models import batch, tiny_model

pytestmark = pytest.mark.gpu


def _model(method: str):
    torch.manual_seed(0)
    model = fastprompt.get_peft_model(tiny_model("llama"), METHODS[method]()).to(DEVICE)
    with torch.no_grad():
        for p in model.prompt_sources.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _inputs(method: str, B: int, T: int, seed: int):
    ids, mask, labels = (t.to(DEVICE) for t in batch(B, T, padding="left", seed=seed))
    task_ids = torch.arange(B, device=DEVICE) % 3 if method == "mpt" else None
    return ids, mask, labels, task_ids


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert grads, "no trainable parameter got a gradient"
    return grads


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix", "mpt"])
def test_replays_equal_eager_steps(method):
    model = _model(method)
    graphed = CudaGraphLoss(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step, (B, T) in enumerate([(5, 23), (5, 23), (5, 23), (3, 11)]):   # new values, an update, a new shape
        inputs = _inputs(method, B, T, seed=step)
        loss = graphed(*inputs)
        loss.backward()
        got_loss, got = loss.detach().clone(), _grads(model)
        ids, mask, labels, task_ids = inputs
        want_loss = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids).loss
        want_loss.backward()
        want = _grads(model)
        assert_close(f"step {step} loss", got_loss, want_loss.detach(), 1e-5)
        assert sorted(got) == sorted(want)
        for name, grad in want.items():
            assert_close(f"step {step} grad {name}", got[name], grad, 1e-4)
        for name, p in model.named_parameters():
            if name in got:
                p.grad = got[name]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert len(graphed._graphed) == 2   # one capture per shape


def test_gradients_left_in_grad_are_refused():
    model = _model("prompt_tuning")
    graphed = CudaGraphLoss(model)
    inputs = _inputs("prompt_tuning", 4, 9, seed=0)
    graphed(*inputs).backward()
    with pytest.raises(ValueError, match="clear the gradients before each CudaGraphLoss call"):
        graphed(*inputs)


@pytest.mark.parametrize("method", ["prompt_tuning", "mpt"])
def test_trainer_with_cuda_graphs_equals_eager(tmp_path, method):
    """Trainer(cuda_graphs=True): bucketed batches replayed from graphs, accumulation over 2 micro-batches,
    the same losses and prompts as an eager run."""
    from fastprompt.train import Trainer, TrainingConfig
    from tests.train.common import dataset, prompt_model, seq2seq_records

    config = (fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=3, num_tasks=2) if method == "mpt"
              else fastprompt.PromptTuningConfig(num_virtual_tokens=3))
    data = dataset(tmp_path, seq2seq_records(7, seed=5, tasks=["a", "b"] if method == "mpt" else None))
    logs, prompts = {}, {}
    for graphs in (False, True):
        model = prompt_model(config).to(DEVICE)
        options = dict(output_dir=str(tmp_path / f"out-{graphs}"), steps=4, batch_size=2, grad_accum=2, lr=0.05,
                       max_grad_norm=None, progress="none", plot=False, cuda_graphs=graphs)
        logs[graphs] = Trainer(model, TrainingConfig(**options), data).train().log
        prompts[graphs] = [p.detach().clone() for p in model.prompt_sources.parameters()]
    for a, b in zip(logs[False], logs[True], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for a, b in zip(prompts[False], prompts[True]):
        assert_close("prompt", b, a, 1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix", "mpt"])
def test_whole_step_replays_equal_eager_steps(method):
    """CudaGraphStep: forward, backward, clipping and capturable AdamW in one graph per shape; each replay's
    loss, gradient norm, gradients and updated prompt equal the same eager step's (same optimizer, same
    path), on new values, a new learning rate each step and a second shape captured mid-run."""
    from fastprompt.train import CudaGraphStep, adamw_for_graphs

    graphed_model, eager_model = _model(method), _model(method)
    step = CudaGraphStep(graphed_model, lr=1.0, weight_decay=0.1, max_grad_norm=0.05)
    params = [p for p in eager_model.parameters() if p.requires_grad]
    optimizer = adamw_for_graphs(params, 1.0, weight_decay=0.1)
    for i, (B, T) in enumerate([(5, 23), (5, 23), (3, 11), (5, 23)]):
        lr = 0.05 / (i + 1)
        ids, mask, labels, task_ids = _inputs(method, B, T, seed=i)
        loss, grad_norm = step(ids, mask, labels, task_ids, lr=lr)
        optimizer.param_groups[0]["lr"].fill_(lr)
        optimizer.zero_grad(set_to_none=True)
        want = eager_model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids,
                           path="shared_prefix").loss
        want.backward()
        want_norm = torch.nn.utils.clip_grad_norm_(params, 0.05)
        want_grads = [p.grad.clone() for p in params]
        optimizer.step()
        assert_close(f"step {i} loss", loss, want.detach(), 1e-5)
        assert_close(f"step {i} grad norm", grad_norm, want_norm, 1e-4)
        for p, g in zip(step.params, want_grads):
            assert_close(f"step {i} grad", p.grad, g, 1e-4)
        for a, b in zip(graphed_model.prompt_sources.parameters(), eager_model.prompt_sources.parameters()):
            assert_close(f"step {i} prompt", a, b, 1e-4)
    assert len(step._captured) == 2


def test_trainer_default_is_the_whole_step_and_equals_eager(tmp_path):
    """On CUDA, TrainingConfig's defaults replay the whole step (CudaGraphStep) and train as an eager run."""
    from fastprompt.train import Trainer, TrainingConfig
    from tests.train.common import dataset, prompt_model, seq2seq_records

    data = dataset(tmp_path, seq2seq_records(7, seed=5))
    logs, prompts = {}, {}
    for graphs in (False, None):
        model = prompt_model().to(DEVICE)
        options = dict(output_dir=str(tmp_path / f"out-{graphs}"), steps=4, batch_size=2, lr=0.05,
                       schedule="cosine", warmup=1, progress="none", plot=False, cuda_graphs=graphs)
        trainer = Trainer(model, TrainingConfig(**options), data)
        assert trainer.whole_step == (graphs is None)
        logs[graphs] = trainer.train().log
        prompts[graphs] = [p.detach().clone() for p in model.prompt_sources.parameters()]
    for a, b in zip(logs[False], logs[None], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    for a, b in zip(prompts[False], prompts[None]):
        assert_close("prompt", b, a, 1e-4)
