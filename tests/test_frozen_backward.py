"""Frozen-backbone backward: fused norms/activations, activation checkpointing and the fused LM-head loss
change what a step keeps, never what it computes (issue: "compute only what the prompt's gradient needs")."""

from __future__ import annotations

import copy

import pytest
import torch

import fastprompt
from fastprompt.audit import graph_violations, saved_bytes
from tests.helpers import assert_close
from tests.peft_pairs import peft_and_fastprompt
from tests.tiny_models import batch, tiny_model

CONFIGS = {
    "prompt_tuning": lambda: fastprompt.PromptTuningConfig(num_virtual_tokens=5),
    "prefix_tuning": lambda: fastprompt.PrefixTuningConfig(num_virtual_tokens=5),
    "mpt": lambda: fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=5, num_tasks=3, num_ranks=2),
}


def _pair(family, method, **options):
    """(plain, patched): the same base weights and prompt, without and with the frozen-backward options."""
    plain = fastprompt.get_peft_model(tiny_model(family), CONFIGS[method](), fused_ops=False)
    patched = fastprompt.get_peft_model(tiny_model(family), CONFIGS[method](), **options)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in plain.prompt_sources.parameters():
            p.normal_(0.0, 0.5)
    patched.prompt_sources.load_state_dict(plain.prompt_sources.state_dict())
    return plain, patched


def _step(model, ids, mask, labels, task_ids, path):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids, path=path)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.prompt_sources.named_parameters()}


# prefix tuning has one path, the bank
METHOD_PATHS = [("prompt_tuning", "shared_prefix"), ("prompt_tuning", "concat"), ("mpt", "shared_prefix"),
                ("mpt", "concat"), ("prefix_tuning", "shared_prefix")]


@pytest.mark.parametrize("method, path", METHOD_PATHS)
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_fused_ops_and_checkpointing_change_nothing_computed(family, method, path):
    plain, patched = _pair(family, method, gradient_checkpointing=True)
    patched.train()  # checkpointing is active in training mode as in inference mode; dropout is 0 here
    ids, mask, labels = batch(batch_size=3, length=9, padding="left")
    task_ids = torch.tensor([2, 0, 2]) if method == "mpt" else None
    loss_a, grads_a = _step(plain, ids, mask, labels, task_ids, path)
    loss_b, grads_b = _step(patched, ids, mask, labels, task_ids, path)
    assert_close("loss", loss_b, loss_a, 1e-5)
    assert grads_a and sorted(grads_a) == sorted(grads_b)
    for name, grad in grads_a.items():
        assert_close(f"grad {name}", grads_b[name], grad, 1e-4)
    assert not any(p.grad is not None for p in patched.base_model.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_patches_undo_and_survive_deepcopy(family):
    base = tiny_model(family)
    model = fastprompt.get_peft_model(base, CONFIGS["prompt_tuning"](), gradient_checkpointing=True)
    patched = [m for m in base.modules() if "forward" in m.__dict__]
    assert len(patched) > model.backbone.num_layers  # norms/activations and every layer
    twin = copy.deepcopy(model)  # bound-method patches follow the copy, not the original modules
    ids, mask, labels = batch()
    assert_close("loss of a deep copy", twin(ids, attention_mask=mask, labels=labels).loss,
                 model(ids, attention_mask=mask, labels=labels).loss, 1e-6)
    twin_modules = dict(twin.base_model.named_modules())
    for name, module in base.named_modules():
        if "forward" in module.__dict__:
            assert module.forward.__self__ is module
            assert twin_modules[name].forward.__self__ is twin_modules[name]
    model.unpatch()
    assert not [m for m in base.modules() if "forward" in m.__dict__]
    assert not model.is_gradient_checkpointing


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_patched_ops_follow_the_models_backend(family, monkeypatch):
    """backend="torch" keeps the patched norms and activations off the kernels too (not only attention and
    the prompt ops); backend="triton" sends them there (the interpreter, on CPU)."""
    from fastprompt.kernels import norms as norm_kernels

    calls = []
    for name in ("norm_fwd", "act_fwd"):
        real = getattr(norm_kernels, name)
        monkeypatch.setattr(norm_kernels, name,
                            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    ids, mask, labels = batch()
    for backend, expected in (("torch", set()), ("triton", {"norm_fwd", "act_fwd"})):
        calls.clear()
        model = fastprompt.get_peft_model(tiny_model(family), CONFIGS["prompt_tuning"](), backend=backend)
        model(ids, attention_mask=mask, labels=labels)
        assert set(calls) == expected, backend


def test_use_reentrant_is_refused():
    model = fastprompt.get_peft_model(tiny_model("llama"), CONFIGS["prompt_tuning"]())
    with pytest.raises(ValueError, match="use_reentrant"):
        model.gradient_checkpointing_enable({"use_reentrant": True})
    model.gradient_checkpointing_enable({"use_reentrant": False})
    assert model.is_gradient_checkpointing


def test_training_forward_holds_no_logits():
    model = fastprompt.get_peft_model(tiny_model("llama"), CONFIGS["prompt_tuning"]())
    ids, mask, labels = batch()
    assert model(ids, attention_mask=mask, labels=labels).logits is None
    with torch.no_grad():
        assert model(ids, attention_mask=mask, labels=labels).logits.shape == (*ids.shape, model.backbone.vocab_size)
    assert model(ids, attention_mask=mask).logits is not None
    assert model(ids, attention_mask=mask, labels=labels, return_logits=True).logits is not None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_with_everything_on_matches_peft(family):
    """Liger-style convergence: a few AdamW steps through PEFT, and through fastprompt with fused ops,
    checkpointing and the fused loss, end with the same loss and prompt."""
    peft_model, ours = peft_and_fastprompt(family, "prompt_tuning")
    ours.gradient_checkpointing_enable()
    ids, mask, labels = batch(batch_size=4, length=11, padding="right")
    theirs_params = list(peft_model.prompt_encoder["default"].parameters())
    ours_params = list(ours.prompt_sources["default"].parameters())
    optimizers = [torch.optim.AdamW(theirs_params, lr=1e-2), torch.optim.AdamW(ours_params, lr=1e-2)]
    for _ in range(5):
        losses = []
        for model, optimizer in zip((peft_model, ours), optimizers):
            optimizer.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        assert_close("loss", losses[1], losses[0], 1e-5)
    assert_close("prompt", ours_params[0], theirs_params[0], 1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_audit_saved_bytes_per_layer_before_and_after(family):
    """The kernels' norms and activations keep only their inputs (Triton, here through the interpreter);
    the PyTorch path's patches (torch's own functions, for host time) keep no more than the HF modules."""
    ids, mask, labels = batch(batch_size=3, length=9)
    reports = {}
    for name, options in (("HF modules", dict(fused_ops=False)), ("PyTorch path", dict(backend="torch")),
                          ("fused ops", dict(backend="triton")),
                          ("fused + checkpointing", dict(backend="triton", gradient_checkpointing=True))):
        model = fastprompt.get_peft_model(tiny_model(family), CONFIGS["prompt_tuning"](), **options)
        out = model(ids, attention_mask=mask, labels=labels)
        frozen = list(model.base_model.parameters())
        assert graph_violations(out.loss, frozen) == []
        report = saved_bytes(lambda: model(ids, attention_mask=mask, labels=labels).loss.backward(),
                             exclude=model.parameters(), layers=model.backbone.layers)
        vocab = model.backbone.vocab_size
        assert not [s for _, s, _ in report.largest if s[-1] == vocab], "logits were kept for the backward"
        reports[name] = report
    layers = range(model.backbone.num_layers)
    print(f"\n[{family}] saved activation bytes per layer:")
    for name, report in reports.items():
        print(f"  {name:>22}: {[report.by_layer.get(i, 0) for i in layers]}  total {report.activation_bytes}")
    for i in layers:
        assert reports["PyTorch path"].by_layer[i] <= reports["HF modules"].by_layer[i]
        assert reports["fused ops"].by_layer[i] < reports["HF modules"].by_layer[i]
        assert reports["fused + checkpointing"].by_layer[i] < reports["fused ops"].by_layer[i]


def test_graph_violations_names_a_frozen_weight_with_a_gradient():
    x = torch.randn(5, 7, requires_grad=True)
    weight = torch.randn(3, 7, requires_grad=True)  # "frozen" by the caller's account, but not really
    loss = torch.nn.functional.linear(x, weight).square().sum()
    assert any("receives a gradient" in v for v in graph_violations(loss, [weight]))
    assert graph_violations(loss, []) == []
