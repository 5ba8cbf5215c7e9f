"""CudaGraphStep without a GPU: its bookkeeping held to eager training, with the CUDA recorder replaced by an
eager one that runs the step where CUDA would capture it and replays by running it again. What that checks:
warm-up and capture leave the parameters and AdamW's state as they were (the trajectory is the eager one's),
each call's tensors reach the captured step, the learning rate reaches the update through its tensor, the
gradients left in .grad are the step's, the fallbacks (a shape past max_shapes, a batch without targets),
the refusals, and the Trainer's default path (the whole step, resume from either kind of checkpoint). The
captures themselves are tested natively in tests/gpu/test_cuda_graphs_native.py."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

import fastprompt
from fastprompt.train import CudaGraphStep, Trainer, TrainingConfig, adamw_for_graphs
from fastprompt.train import cuda_graphs
from tests.helpers import assert_close
from tests.peft_pairs import METHODS
from tests.tiny_models import batch, tiny_model
from tests.train.common import dataset, prompt_model, seq2seq_records


class EagerRecorder:
    """The CUDA recorder's contract off CUDA: `record` runs the step once (where a capture would allocate
    its buffers; CudaGraphStep puts back what it changes) and `replay` runs it again."""

    device_type = "cpu"

    def __init__(self):
        self.records = 0

    def pool(self):
        return None

    def side_stream(self):
        return contextlib.nullcontext()

    def record(self, body, pool):
        self.records += 1
        body()
        return SimpleNamespace(replay=body)


@pytest.fixture
def recorder(monkeypatch):
    eager = EagerRecorder()
    monkeypatch.setattr(cuda_graphs, "RECORDER", eager)
    return eager


def _model(method: str):
    torch.manual_seed(0)
    model = fastprompt.get_peft_model(tiny_model("llama"), METHODS[method]())
    with torch.no_grad():
        for p in model.prompt_sources.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _inputs(method: str, B: int, T: int, seed: int):
    ids, mask, labels = batch(B, T, padding="left", seed=seed)
    return ids, mask, labels, (torch.arange(B) % 3 if method == "mpt" else None)


# (B, T) of each step: new values, a second shape captured mid-run, the first shape again
SHAPES = [(4, 9), (4, 9), (3, 6), (4, 9), (3, 6)]
LRS = [0.05, 0.04, 0.03, 0.02, 0.01]


def _eager_run(method, max_grad_norm):
    """The reference: the same steps eagerly with the same ops (the optimizer the step makes, the path it
    takes), so that the two agree to rounding; the Trainer tests below compare with a float learning rate."""
    model = _model(method)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw_for_graphs(params, LRS[0], weight_decay=0.1)
    losses, norms, grads = [], [], []
    for step, (B, T) in enumerate(SHAPES):
        ids, mask, labels, task_ids = _inputs(method, B, T, seed=step)
        optimizer.param_groups[0]["lr"].fill_(LRS[step])
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids,
                     path="shared_prefix").loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")))
        grads.append([p.grad.clone() for p in params])
        optimizer.step()
        losses.append(loss.detach())
    return model, losses, norms, grads


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix", "mpt"])
@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_replays_equal_eager_steps(recorder, method, max_grad_norm):
    want_model, want_losses, want_norms, want_grads = _eager_run(method, max_grad_norm)
    model = _model(method)
    step = CudaGraphStep(model, lr=1.0, weight_decay=0.1, max_grad_norm=max_grad_norm)
    for i, (B, T) in enumerate(SHAPES):
        loss, grad_norm = step(*_inputs(method, B, T, seed=i), lr=LRS[i])
        assert_close(f"step {i} loss", loss, want_losses[i], 1e-6)
        assert_close(f"step {i} grad norm", grad_norm, want_norms[i], 1e-6)
        for p, want in zip(step.params, want_grads[i]):   # .grad holds this step's (clipped) gradients
            assert_close(f"step {i} grad", p.grad, want, 1e-6)
    assert recorder.records == 2                          # one capture per shape
    for (name, got), want in zip(model.prompt_sources.named_parameters(), want_model.prompt_sources.parameters()):
        assert_close(name, got, want, 1e-5)


def test_shapes_past_max_shapes_run_eagerly_with_one_warning(recorder):
    want_model, want_losses, _, _ = _eager_run("prompt_tuning", None)
    model = _model("prompt_tuning")
    step = CudaGraphStep(model, lr=1.0, weight_decay=0.1, max_shapes=1)
    with pytest.warns(UserWarning, match="more than max_shapes=1 batch shapes") as warned:
        for i, (B, T) in enumerate(SHAPES):
            loss, _ = step(*_inputs("prompt_tuning", B, T, seed=i), lr=LRS[i])
            assert_close(f"step {i} loss", loss, want_losses[i], 1e-6)
    assert len(warned) == 1 and recorder.records == 1
    for got, want in zip(model.prompt_sources.parameters(), want_model.prompt_sources.parameters()):
        assert_close("prompt", got, want, 1e-5)


def test_a_step_without_targets_still_updates_as_an_eager_one(recorder):
    """An eager step on a batch without targets has loss 0 and zero gradients, and AdamW still moves the
    prompt (its moments, its weight decay); so does this one."""
    model, want = _model("prompt_tuning"), _model("prompt_tuning")
    step = CudaGraphStep(model, lr=0.05, weight_decay=0.1)
    reference = torch.optim.AdamW([p for p in want.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    ids, mask, labels, _ = _inputs("prompt_tuning", 4, 9, seed=0)
    for optimizer_step in (lambda: step(ids, mask, labels), lambda: step.step_without_targets(lr=0.02)):
        optimizer_step()
    reference.zero_grad(set_to_none=True)
    want(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    reference.step()
    reference.param_groups[0]["lr"] = 0.02
    for p in reference.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    reference.step()
    loss, grad_norm = step._loss, step._grad_norm
    assert float(loss) == 0.0 and float(grad_norm) == 0.0
    for got, expected in zip(model.prompt_sources.parameters(), want.prompt_sources.parameters()):
        assert_close("prompt", got, expected, 1e-6)


def test_refusals(recorder):
    model = _model("prompt_tuning")
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="optimizer must be torch.optim.AdamW, got SGD"):
        CudaGraphStep(model, torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="learning rate from one tensor on cpu .*a float is fixed into the graph"):
        CudaGraphStep(model, torch.optim.AdamW(params, lr=0.1))
    with pytest.raises(ValueError, match="max_shapes and warmup_steps must be >= 1"):
        CudaGraphStep(model, warmup_steps=0)
    step = CudaGraphStep(model, adamw_for_graphs(params, 0.1))
    ids, mask, labels, _ = _inputs("prompt_tuning", 2, 5, seed=0)
    with pytest.raises(ValueError, match=r"labels is required: CudaGraphStep computes the training loss"):
        step(ids, mask)
    with pytest.raises(ValueError, match="attention_mask must be a tensor on the model's device cpu, got list"):
        step(ids, mask.tolist(), labels)


def test_refused_off_cuda():
    with pytest.raises(ValueError, match="CudaGraphStep needs the model on a CUDA device, got cpu"):
        CudaGraphStep(_model("prompt_tuning"))


# the Trainer's default ----------------------------------------------------------------------------------
def _config(folder, **kwargs):
    defaults = dict(output_dir=str(folder), steps=4, batch_size=2, lr=0.05, schedule="cosine", warmup=1,
                    weight_decay=0.01, max_grad_norm=0.5, progress="none", plot=False)
    return TrainingConfig(**{**defaults, **kwargs})


def _graphs_serve_here(monkeypatch):
    """The trainer's 'on CUDA' with the eager recorder: its obstacle check passes."""
    monkeypatch.setattr(Trainer, "_graph_obstacle", lambda self: None)


@pytest.mark.parametrize("config, max_grad_norm", [
    (fastprompt.PromptTuningConfig(num_virtual_tokens=3), 0.5),
    (fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=3, num_tasks=2), 0.5),
    (fastprompt.PromptTuningConfig(num_virtual_tokens=3), 0.0),     # 0: no clipping, as the eager step reads it
], ids=["prompt", "mpt", "prompt-no-clipping"])
def test_the_trainers_default_step_is_the_whole_graph_and_equals_eager(tmp_path, recorder, monkeypatch, capsys,
                                                                      config, max_grad_norm):
    tasks = ["a", "b"] if config.peft_type == "MULTITASK_PROMPT_TUNING" else None
    data = dataset(tmp_path, seq2seq_records(7, seed=5, tasks=tasks))
    eager = Trainer(prompt_model(config), _config(tmp_path / "eager", max_grad_norm=max_grad_norm), data)
    _graphs_serve_here(monkeypatch)
    graphed = Trainer(prompt_model(config), _config(tmp_path / "graphed", max_grad_norm=max_grad_norm), data)
    assert graphed.whole_step and capsys.readouterr().err == ""
    eager_log, graphed_log = eager.train().log, graphed.train().log
    assert isinstance(graphed._graphed_step, CudaGraphStep) and graphed._graphed_loss is None
    assert recorder.records >= 1
    for a, b in zip(eager_log, graphed_log, strict=True):
        assert b["lr"] == a["lr"] and b["tokens"] == a["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for a, b in zip(eager.model.prompt_sources.parameters(), graphed.model.prompt_sources.parameters()):
        assert_close("prompt", b, a, 1e-5)


@pytest.mark.parametrize("first", ["graphed", "eager"])
def test_resume_across_kinds_of_step(tmp_path, recorder, monkeypatch, first):
    """A run stopped at step 2 and resumed, with the whole-step graph on one side of the checkpoint and
    eager steps on the other, gives the uninterrupted run's losses: the checkpoint keeps what AdamW learned,
    the resumed run keeps how its own optimizer computes (a tensor learning rate or a float)."""
    data = dataset(tmp_path, seq2seq_records(9, seed=3))
    full = Trainer(prompt_model(), _config(tmp_path / "full"), data).train().log
    graphs = {"graphed": None, "eager": False}
    second = {"graphed": False, "eager": None}
    _graphs_serve_here(monkeypatch)
    out = tmp_path / "split"
    torch.manual_seed(0)
    Trainer(prompt_model(), _config(out, steps=2, save_every=2, cuda_graphs=graphs[first]), data).train()
    resumed = Trainer(prompt_model(), _config(out, cuda_graphs=second[first]), data)
    assert resumed.whole_step == (first == "eager")
    log = resumed.train(resume=True).log
    assert [r["step"] for r in log] == [3, 4]
    for a, b in zip(full[2:], log, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


@pytest.mark.parametrize("option, reason", [
    (dict(grad_accum=2), "grad_accum=2 (the whole-step graph takes one micro-batch per step)"),
    (dict(optimizer="adafactor"), "optimizer='adafactor' has no capturable form (AdamW has)"),
    (dict(precision="fp16"), "fp16's grad scaler checks the gradients for overflow on the host"),
])
def test_where_the_update_cannot_join_the_graph_the_loss_is_graphed_and_one_line_says_why(
        tmp_path, monkeypatch, capsys, option, reason):
    data = dataset(tmp_path, seq2seq_records(4))
    _graphs_serve_here(monkeypatch)
    trainer = Trainer(prompt_model(), _config(tmp_path / "out", **option), data)
    assert trainer.use_graphs and not trainer.whole_step
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"fastprompt: CUDA graphs replay each micro-batch's loss, the update runs eagerly: {reason}"]



@pytest.mark.parametrize("message, explained", [("operation not permitted when stream is capturing", True),
                                                ("CUDA out of memory", False)])
def test_a_failed_capture_is_explained_other_errors_raised_as_they_were(recorder, monkeypatch, message, explained):
    """A capture error (a host read of a GPU value) is explained with what to do; any other error reaches the
    caller unchanged. Either way warm-up leaves the prompt as it was."""
    error = RuntimeError(message)

    def record(body, pool):
        raise error

    monkeypatch.setattr(recorder, "record", record)
    model = _model("prompt_tuning")
    before = [p.detach().clone() for p in model.prompt_sources.parameters()]
    step = CudaGraphStep(model, lr=1.0)
    with pytest.raises(RuntimeError) as raised:
        step(*_inputs("prompt_tuning", *SHAPES[0], seed=0), lr=LRS[0])
    if explained:
        assert str(raised.value).startswith("CudaGraphStep: the step could not be captured as a CUDA graph (operation "
                                            "not permitted when stream is capturing); something in it reads a GPU "
                                            "value on the host. Train eagerly instead.")
        assert raised.value.__cause__ is error
    else:
        assert raised.value is error
    for got, want in zip(model.prompt_sources.parameters(), before):
        assert torch.equal(got, want)
