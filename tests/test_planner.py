"""The forward plan (fastprompt/planner.py): made once per shape, read by every layer, equal to what the
public ops would decide, and the only place a causal forward's prefix-attention calls are decided."""

from __future__ import annotations

import pytest
import torch

import fastprompt
import fastprompt.backbones.attention as attention
import fastprompt.planner as planner
from fastprompt import ops
from fastprompt.ops.prefix_attention import attention_route
from tests.helpers import assert_close
from tests.tiny_models import batch, tiny_model

CONFIGS = {
    "prompt_tuning": lambda: fastprompt.PromptTuningConfig(num_virtual_tokens=5),
    "mpt": lambda: fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=5, num_tasks=3, num_ranks=2),
    "prefix": lambda: fastprompt.PrefixTuningConfig(num_virtual_tokens=5),
}
TASKS = {"mpt": torch.tensor([2, 0, 2, 1])}


def _model(method: str, path: str = "auto"):
    torch.manual_seed(0)
    return fastprompt.get_peft_model(tiny_model("llama"), CONFIGS[method](), path=path, backend="torch")


def _split_form(monkeypatch):
    monkeypatch.setattr(planner, "packed_attention_form", lambda *args: "split")


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_one_plan_per_shape(method, monkeypatch):
    """Repeated forwards of one shape make its plan once; a new T or padding makes one more each."""
    model = _model(method, path="shared_prefix")
    made = []
    make = model.planner._make
    monkeypatch.setattr(model.planner, "_make", lambda *args: made.append(args) or make(*args))
    ids, mask, labels = batch(batch_size=4, length=9, padding="right")
    ones = torch.ones_like(mask)
    for _ in range(3):
        model(input_ids=ids, attention_mask=ones, labels=labels, task_ids=TASKS.get(method))
    assert len(made) == 1
    model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=TASKS.get(method))      # padded keys
    model(input_ids=ids[:, :7], labels=labels[:, :7], task_ids=TASKS.get(method))              # another T
    assert len(made) == 3 and len(model.planner.plans) == 3


@pytest.mark.parametrize("method", ["prompt_tuning", "mpt", "prefix"])
def test_layers_call_the_unchecked_entry_on_the_planned_route(method, monkeypatch):
    """In a planned forward no layer calls the public (checking) op: each call is the unchecked entry, on
    the route the plan holds. 2 layers: the split form calls it twice a layer, prefix tuning once."""
    _split_form(monkeypatch)

    def public(*args, **kwargs):
        raise AssertionError("a planned forward called the public prefix_attention")

    routes = []
    unchecked = attention.prefix_attention_unchecked

    def recorded(*args, route, **kwargs):
        routes.append(route)
        return unchecked(*args, route=route, **kwargs)

    monkeypatch.setattr(attention, "prefix_attention", public)
    monkeypatch.setattr(attention, "prefix_attention_unchecked", recorded)
    model = _model(method, path="shared_prefix")
    ids, mask, labels = batch(batch_size=4, length=9, padding="right")
    model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=TASKS.get(method)).loss.backward()
    assert routes == ["sdpa"] * (2 if method == "prefix" else 4)


@pytest.mark.parametrize("method", ["prompt_tuning", "mpt"])
def test_split_form_equals_concat(method, monkeypatch):
    """The planned split form (unchecked calls) gives concat's loss and prompt gradients."""
    _split_form(monkeypatch)
    model = _model(method)
    ids, mask, labels = batch(batch_size=4, length=9, padding="right")
    results = {}
    for path in ("concat", "shared_prefix"):
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=TASKS.get(method), path=path).loss
        loss.backward()
        results[path] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert_close("loss", results["shared_prefix"][0], results["concat"][0], 1e-5)
    for name, grad in results["concat"][1].items():
        assert_close(f"grad {name}", results["shared_prefix"][1][name], grad, 1e-4)


def test_concat_checks_token_ids_once(monkeypatch):
    """The concat path reads the ids' range once (the forward's input check), not again at the op."""
    import sys

    import fastprompt.inputs as inputs
    import fastprompt.ops._checks as checks

    prompt_embed = sys.modules["fastprompt.ops.prompt_embed"]  # the package binds the name to the op

    reads = []
    check = checks.check_index_values

    def recorded(name, *args):
        reads.append(name)
        return check(name, *args)

    monkeypatch.setattr(inputs, "check_index_values", recorded)
    monkeypatch.setattr(prompt_embed, "check_index_values", recorded)
    model = _model("prompt_tuning", path="concat")
    ids, _, labels = batch(batch_size=3, length=9)
    model(input_ids=ids, labels=labels)
    assert reads == ["input_ids"]
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 101\)"):
        model(input_ids=ids + 101, labels=labels)


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_route_is_the_public_ops(backend, cuda):
    """`prefix_attention_route`, which the plan and the public op both take: torch is SDPA, Triton off
    CUDA is the kernel, Triton on CUDA the measured rule (`attention_route`)."""
    shapes = [dict(T=T, S=T, P=P, grouped=grouped, causal=True, has_padding_mask=padded, has_bias=False)
              for T in (8, 512, 4096) for P in (0, 100) for grouped in (False, True) for padded in (False, True)]
    for shape in shapes:
        route = ops.prefix_attention_route(backend, cuda, **shape)
        expected = "sdpa" if backend == "torch" else ("kernel" if not cuda else attention_route(**shape))
        assert route == expected, shape


@pytest.mark.parametrize("route", ["sdpa", "kernel"])
def test_unchecked_entry_equals_the_op(route):
    """The unchecked entry on either route gives the public op's output (random inputs, padding, GQA,
    two bank rows)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 5, 8, generator=gen)
    k, v = torch.randn(2, 3, 2, 5, 8, generator=gen)
    prefix_k, prefix_v = torch.randn(2, 2, 2, 3, 8, generator=gen)
    rows = torch.tensor([1, 0, 1])
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, :2] = False
    expected = ops.prefix_attention(q, k, v, prefix_k, prefix_v, rows, key_padding_mask=mask, backend="torch")
    actual = ops.prefix_attention_unchecked(q, k, v, prefix_k, prefix_v, rows, route=route, key_padding_mask=mask)
    assert_close("out", actual, expected, 1e-5)
