"""The serving engine: mixed batches equal single runs and PromptModel.generate, slots are reused, adapters
load and unload live, sampling is per request."""

from __future__ import annotations

import threading

import pytest
import torch

from fastprompt.serve import Engine, InvalidRequest, QueueFull, Request, SamplingParams
from tests.serve.conftest import random_prompt, reference_tokens

GREEDY = dict(temperature=0.0, ignore_eos=True)


def make_engine(served, names=("a", "b", "pre", "mpt", "pt"), **kwargs):
    base, tokenizer, folders, _ = served
    engine = Engine(base, tokenizer, **{"max_slots": 4, "max_len": 40, **kwargs})
    for name in names:
        engine.load_adapter(name, folders[name])
    return engine


def mixed_requests(seed: int, count: int, names=("a", "b", "pre", "mpt", "pt"), max_tokens=(1, 14)):
    g = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(count):
        name = names[i % len(names)]
        task = int(torch.randint(0, 2, (1,), generator=g)) if name == "mpt" else 0
        n = int(torch.randint(*max_tokens, (1,), generator=g))
        requests.append(Request(random_prompt(g), name, SamplingParams(max_tokens=n, **GREEDY), task))
    return requests


@pytest.mark.parametrize("cache_len", [None, 40], ids=["roomy-cache", "tight-cache-rebases"])
def test_mixed_batch_equals_generate_alone(served, cache_len):
    """Every method in one batch (prompt tuning, prefix tuning, MPT tasks, P-tuning), rows joining and leaving
    at different steps, more requests than slots: each output equals PromptModel.generate on it alone."""
    references = served[3]
    engine = make_engine(served, cache_len=cache_len)
    rebases = []
    rebase = engine._rebase
    engine._rebase = lambda new_L: (rebases.append((engine.L, new_L)), rebase(new_L))
    requests = engine.generate(mixed_requests(seed=3, count=14 if cache_len is None else 24))
    if cache_len:  # the rows' block moved both ways: right for a long newcomer, left at the cache's end
        assert any(new > old > 0 for old, new in rebases) and any(new < old for old, new in rebases), rebases
    for r in requests:
        assert r.finish_reason == "length"
        expected = reference_tokens(references, r.adapter, r.prompt_ids, r.params.max_tokens, r.task)
        assert r.output_ids == expected, (r.adapter, r.task, r.prompt_ids)


def test_mixed_batch_equals_each_request_alone_in_the_engine(served):
    engine = make_engine(served)
    batch = engine.generate(mixed_requests(seed=5, count=8))
    for r in batch:
        alone = engine.generate([Request(r.prompt_ids, r.adapter, r.params, r.task)])[0]
        assert alone.output_ids == r.output_ids


def test_slots_are_reused_and_freed_at_once(served):
    engine = make_engine(served, names=("a",), max_slots=2)
    requests = [Request([5, 6, 7], "a", SamplingParams(max_tokens=n, **GREEDY)) for n in (2, 9, 3, 4, 6)]
    engine.submit_many(requests)
    peak = 0
    while not all(r.done.is_set() for r in requests):
        engine.step()
        peak = max(peak, engine.num_running)
        assert engine.num_running <= 2
    assert peak == 2 and engine.num_running == 0 and engine.L == 0
    assert [len(r.output_ids) for r in requests] == [2, 9, 3, 4, 6]
    assert len({tuple(r.output_ids[:2]) for r in requests}) == 1  # same prompt, same greedy start


def test_adapters_load_and_unload_while_serving(served):
    base, tokenizer, folders, references = served
    engine = make_engine(served, names=("a",), max_slots=3).start()
    try:
        long_a = engine.submit(Request([4, 5, 6], "a", SamplingParams(max_tokens=30, **GREEDY)))
        engine.load_adapter("pre", folders["pre"])
        engine.load_adapter("b", folders["b"])
        with pytest.raises(InvalidRequest, match="already loaded"):
            engine.load_adapter("b", folders["b"])
        r_b = engine.submit(Request([9, 8, 7, 6], "b", SamplingParams(max_tokens=6, **GREEDY)))
        r_pre = engine.submit(Request([9, 8], "pre", SamplingParams(max_tokens=6, **GREEDY)))
        assert r_b.wait(30) and r_pre.wait(30)
        engine.unload_adapter("pre")  # the bank shrinks; rows of "a" re-index to their new entries
        doomed = engine.submit(Request([3, 3], "b", SamplingParams(max_tokens=35, **GREEDY)))
        engine.unload_adapter("b")
        assert doomed.wait(30) and doomed.finish_reason in ("abort", "error")
        with pytest.raises(InvalidRequest, match="model"):
            engine.submit(Request([3], "b", SamplingParams(max_tokens=2)))
        assert long_a.wait(60)
    finally:
        engine.stop()
    assert engine.adapter_names() == ["a"]
    assert long_a.output_ids == reference_tokens(references, "a", [4, 5, 6], 30)
    assert r_b.output_ids == reference_tokens(references, "b", [9, 8, 7, 6], 6)
    assert r_pre.output_ids == reference_tokens(references, "pre", [9, 8], 6)


def test_seeded_sampling_is_per_request_and_matches_generate(served):
    references = served[3]
    engine = make_engine(served, names=("a", "b"))
    params = dict(temperature=0.8, top_k=20, top_p=0.9, seed=7, ignore_eos=True, max_tokens=8)
    noise = mixed_requests(seed=9, count=4, names=("a", "b"))
    sampled = Request([10, 11, 12], "b", SamplingParams(**params))
    engine.generate(noise + [sampled])
    alone = engine.generate([Request([10, 11, 12], "b", SamplingParams(**params))])[0]
    assert sampled.output_ids == alone.output_ids
    expected = reference_tokens(references, "b", [10, 11, 12], 8, do_sample=True, temperature=0.8, top_k=20,
                                top_p=0.9, seed=7)
    assert sampled.output_ids == expected


class BracketTokenizer:
    """Decodes token t as "[t]", so stop strings can be cut anywhere inside or across tokens."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"[{i}]" for i in ids)


def test_stop_strings_stop_ids_and_eos(served):
    base, _, folders, _ = served
    engine = Engine(base, BracketTokenizer(), max_slots=2, max_len=40)
    engine.load_adapter("a", folders["a"])

    def run(**params):
        deltas = []
        request = Request([5, 6, 7], "a", SamplingParams(**{"max_tokens": 12, **GREEDY, **params}),
                          on_update=lambda _, u: deltas.append(u.text))
        engine.generate([request])
        assert "".join(deltas) == request.text  # streamed pieces add up to the final text
        return request

    free = run()
    ids = free.output_ids
    assert free.text == "".join(f"[{i}]" for i in ids)
    k = ids.index(ids[3])
    by_string = run(stop=[f"[{ids[3]}]", "never"])
    assert by_string.finish_reason == "stop" and by_string.text == "".join(f"[{i}]" for i in ids[:k])
    spanning = f"{ids[1]}][{ids[2]}"  # a stop string across two tokens
    across = run(stop=[spanning])
    assert across.finish_reason == "stop" and across.text == free.text[:free.text.index(spanning)]
    assert len(across.output_ids) <= 3
    j = ids.index(ids[2])
    by_id = run(stop_token_ids=[ids[2]])
    assert by_id.finish_reason == "stop" and by_id.output_ids == ids[:j + 1]
    assert by_id.text == "".join(f"[{i}]" for i in ids[:j])  # the stop token is not in the text
    eos = Engine(base, BracketTokenizer(), max_slots=2, max_len=40, eos_token_id=ids[4])
    eos.load_adapter("a", folders["a"])
    ended = eos.generate([Request([5, 6, 7], "a", SamplingParams(max_tokens=12, temperature=0.0))])[0]
    assert ended.finish_reason == "stop" and ended.output_ids == ids[:ids.index(ids[4]) + 1]


def test_bad_requests_raise_naming_the_field_and_queue_is_bounded(served):
    engine = make_engine(served, names=("a", "mpt"), max_queue=2)
    cases = [
        (Request([3, 4], "nope"), "model"),
        (Request([3] * 40, "a"), "prompt"),
        (Request([], "a"), "prompt"),
        (Request([3, 500], "a"), "prompt"),
        (Request([3] * 30, "a", SamplingParams(max_tokens=20)), "max_tokens"),
        (Request([3], "a", SamplingParams(temperature=-1)), "temperature"),
        (Request([3], "a", SamplingParams(top_p=0)), "top_p"),
        (Request([3], "a", SamplingParams(top_k=-5)), "top_k"),
        (Request([3], "a", SamplingParams(stop=[""])), "stop"),
        (Request([3], "mpt", task=2), "task_id"),
    ]
    for request, field in cases:
        with pytest.raises(InvalidRequest) as info:
            engine.submit(request)
        assert info.value.field == field
    engine.submit(Request([3], "a"))
    engine.submit(Request([3], "a"))
    with pytest.raises(QueueFull):
        engine.submit(Request([3], "a"))


def test_cancel_frees_the_row(served):
    engine = make_engine(served, names=("a",), max_slots=1)
    first = engine.submit(Request([3, 4], "a", SamplingParams(max_tokens=30, **GREEDY)))
    second = engine.submit(Request([3, 4], "a", SamplingParams(max_tokens=3, **GREEDY)))
    engine.step()
    engine.step()
    first.cancel()
    while not second.done.is_set():
        engine.step()
    assert first.finish_reason == "abort" and len(first.output_ids) < 30
    assert second.finish_reason == "length" and engine.num_running == 0


def test_per_request_timeout(served):
    engine = make_engine(served, names=("a",), max_slots=1)
    slow = engine.submit(Request([3, 4], "a", SamplingParams(max_tokens=30, **GREEDY), timeout_s=0.05))
    waiting = engine.submit(Request([3, 4], "a", SamplingParams(max_tokens=2, **GREEDY), timeout_s=0.05))
    engine.step()
    threading.Event().wait(0.1)
    engine.step()
    assert slow.finish_reason == "timeout" and waiting.finish_reason == "timeout"
    assert engine.num_running == 0 and engine.queue_depth == 0
