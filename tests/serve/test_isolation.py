"""One tenant never disturbs another: a non-finite adapter is refused at load, and one that reaches the
bank anyway (a prompt that overflows, here NaN written into its stored keys/values) ends its own requests
with an error while every healthy request batched beside it, greedy or sampled, equals its run alone."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import fastprompt
from fastprompt import io
from fastprompt.serve import Engine, InvalidRequest, Request, SamplingParams
from tests.serve.conftest import random_prompt, reference_tokens

_references: dict = {}


def _reference(references, request: Request) -> list[int]:
    """reference_tokens of a request, computed once for all the parametrizations (they share requests)."""
    p = request.params
    key = (request.adapter, tuple(request.prompt_ids), p.max_tokens, p.seed)
    if key not in _references:
        sampling = {} if p.greedy else {"do_sample": True, "temperature": p.temperature, "top_p": p.top_p,
                                        "seed": p.seed}
        _references[key] = reference_tokens(references, request.adapter, request.prompt_ids, p.max_tokens,
                                            **sampling)
    return _references[key]


def _poison(engine: Engine, name: str, value: float) -> None:
    keys, values = engine.store.bank.groups[name]
    for tensor in keys + values:
        tensor.fill_(value)
    engine.store.bank._repack()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("bucketed", [False, True], ids=["exact-steps", "bucketed-steps"])
def test_non_finite_adapter_batched_beside_healthy_ones(served, value, bucketed):
    base, tokenizer, folders, references = served
    engine = Engine(base, tokenizer, max_slots=4, max_len=40, bucketed_steps=bucketed)
    for name in ("bad", "a", "b"):  # "bad" first: bank entry 0, which bucketed pad rows read
        engine.load_adapter(name, folders["a" if name == "bad" else name])
    _poison(engine, "bad", value)
    g = torch.Generator().manual_seed(11)
    requests = []
    for i in range(15):  # more requests than slots: the bad rows' slots are reused by healthy rows
        name = ("bad", "a", "b")[i % 3]
        sampled = i % 4 == 1
        params = (SamplingParams(max_tokens=int(torch.randint(2, 12, (1,), generator=g)), temperature=0.8,
                                 top_p=0.9, seed=1000 + i, ignore_eos=True) if sampled else
                  SamplingParams(max_tokens=int(torch.randint(2, 12, (1,), generator=g)), temperature=0,
                                 ignore_eos=True))
        requests.append(Request(random_prompt(g), name, params))
    engine.generate(requests)
    healthy = 0
    for request in requests:
        if request.adapter == "bad":
            assert request.finish_reason == "error" and "non-finite logits" in request.error
            continue
        assert request.finish_reason == "length", request.adapter
        assert request.output_ids == _reference(references, request), request.adapter
        healthy += 1
    assert healthy == 10
    # the engine still serves the healthy adapters afterwards
    again = engine.generate([Request([7, 8, 9], "a", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))])
    assert again[0].output_ids == reference_tokens(references, "a", [7, 8, 9], 5)


def test_non_finite_adapter_refused_at_load(served, tmp_path):
    base, tokenizer, folders, _ = served
    engine = Engine(base, tokenizer, max_slots=2, max_len=32)
    tensors = io.read_tensors(folders["a"] / io.WEIGHTS_NAME)
    tensors["prompt_embeddings"][1, 3] = float("nan")
    (tmp_path / "nan").mkdir()
    save_file(tensors, tmp_path / "nan" / io.WEIGHTS_NAME)
    (tmp_path / "nan" / io.CONFIG_NAME).write_bytes((folders["a"] / io.CONFIG_NAME).read_bytes())
    with pytest.raises(InvalidRequest, match="adapter_path: .*holds NaN or inf values"):
        engine.load_adapter("nan", tmp_path / "nan")
    model = fastprompt.from_pretrained(base, folders["a"], adapter_name="inf")
    with torch.no_grad():
        model.prompt_sources["inf"].embedding.weight[0, 0] = float("inf")
    with pytest.raises(InvalidRequest, match=r"adapter_name: adapter 'inf' gives non-finite \(NaN or inf\) prefix"):
        engine.add_adapter("inf", model, "inf")
    assert engine.adapter_names() == []
