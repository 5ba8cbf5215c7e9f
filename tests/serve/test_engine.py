"""The serving engine: mixed batches equal single runs and PromptModel.generate, slots are reused, adapters
load and unload live, sampling is per request; the bucketed, graph-safe decode step equals the plain one and
has no host read or offset-dependent shape."""

from __future__ import annotations

import importlib
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastprompt

from fastprompt.backbones import AttentionContext, KVCache
from fastprompt.serve import Engine, InvalidRequest, QueueFull, Request, SamplingParams
from fastprompt.serve.kv_cache import batch_buckets, key_window
from tests.helpers import RTOL, assert_close
from tests.serve.conftest import random_prompt, reference_tokens
from tests.tiny_models import tiny_model

prefix_attention_module = importlib.import_module("fastprompt.ops.prefix_attention")  # the package exports
# a function of the same name

GREEDY = dict(temperature=0.0, ignore_eos=True)


def make_engine(served, names=("a", "b", "pre", "mpt", "pt"), **kwargs):
    base, tokenizer, folders, _ = served
    engine = Engine(base, tokenizer, **{"max_slots": 4, "max_len": 40, **kwargs})
    for name in names:
        engine.load_adapter(name, folders[name])
    return engine


def record_prefills(engine) -> list[list[int]]:
    """The prompt lengths of each batched prefill the engine runs from now on."""
    batches, prefill = [], engine._prefill
    engine._prefill = lambda batch: (batches.append([len(r.prompt_ids) for r, _ in batch]), prefill(batch))
    return batches


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
    at different steps, more requests than slots, prefills of one and two requests: each output equals
    PromptModel.generate on it alone."""
    references = served[3]
    engine = make_engine(served, cache_len=cache_len, max_prefills_per_step=2)
    rebases = []
    rebase = engine._rebase
    engine._rebase = lambda new_L: (rebases.append((engine.L, new_L)), rebase(new_L))
    batches = record_prefills(engine)
    requests = engine.generate(mixed_requests(seed=3, count=14 if cache_len is None else 24))
    assert {len(b) for b in batches} == {1, 2}, batches
    if cache_len:  # the rows' block moved both ways: right for a long newcomer, left at the cache's end
        assert any(new > old > 0 for old, new in rebases) and any(new < old for old, new in rebases), rebases
    for r in requests:
        assert r.finish_reason == "length"
        expected = reference_tokens(references, r.adapter, r.prompt_ids, r.params.max_tokens, r.task)
        assert r.output_ids == expected, (r.adapter, r.task, r.prompt_ids)


def test_prefill_batches_respect_slots_and_budgets(served):
    """Free slots, max_prefills_per_step and max_prefill_tokens (padded tokens, one request always fits)
    bound each batched prefill; the outputs stay those of each request alone."""
    references = served[3]
    g = torch.Generator().manual_seed(23)
    prompts = [random_prompt(g, 2, 12) for _ in range(9)]
    for kwargs, expected in [({}, [5, 4]), ({"max_prefills_per_step": 2}, None),
                             ({"max_prefill_tokens": 24}, None), ({"max_prefill_tokens": 1}, [1] * 9)]:
        engine = make_engine(served, max_slots=5, **kwargs)
        batches = record_prefills(engine)
        requests = [Request(p, ("a", "pre", "pt")[i % 3], SamplingParams(max_tokens=4, **GREEDY))
                    for i, p in enumerate(prompts)]
        engine.generate(requests)
        sizes = [len(b) for b in batches]
        assert sum(sizes) == 9 and max(sizes) <= kwargs.get("max_prefills_per_step", 5), (kwargs, batches)
        assert all(len(b) == 1 or len(b) * max(b) <= kwargs.get("max_prefill_tokens", 8192) for b in batches)
        if expected is not None:
            assert sizes == expected, (kwargs, batches)
        else:
            assert any(len(b) > 1 for b in batches) and len(batches) > 2, (kwargs, batches)
        for r in requests:
            assert r.output_ids == reference_tokens(references, r.adapter, r.prompt_ids, 4), (kwargs, r.prompt_ids)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_prefill_equals_each_prompt_alone(family):
    """One prefill of prompts of lengths 1..7 (left-padded, learned or rotary positions): every row's
    greedy tokens equal PromptModel.generate on its prompt alone."""
    base = tiny_model(family, seed=4)
    model = fastprompt.get_peft_model(base, fastprompt.PromptTuningConfig(num_virtual_tokens=3))
    with torch.no_grad():
        model.prompt_sources["default"].embedding.weight.normal_(0, 1.0)
    engine = Engine(model, max_slots=7, max_len=16)
    engine.add_adapter("default", model)
    batches = record_prefills(engine)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (4, 1, 7, 2, 6, 3, 5)]
    requests = engine.generate([Request(p, "default", SamplingParams(max_tokens=5, **GREEDY)) for p in prompts])
    assert [len(b) for b in batches] == [7]
    for r in requests:
        alone = model.generate(input_ids=torch.tensor([r.prompt_ids]), max_new_tokens=5, eos_token_id=[])
        assert r.output_ids == alone[0, len(r.prompt_ids):].tolist(), r.prompt_ids


def test_mixed_batch_equals_each_request_alone_in_the_engine(served):
    engine = make_engine(served)
    batch = engine.generate(mixed_requests(seed=5, count=8))
    for r in batch:
        alone = engine.generate([Request(r.prompt_ids, r.adapter, r.params, r.task)])[0]
        assert alone.output_ids == r.output_ids


@pytest.mark.parametrize("bucketed", [False, True], ids=["exact", "bucketed"])
def test_adapters_of_different_prompt_lengths_share_a_batch(served, tmp_path, bucketed):
    """Prompt tuning with P=3, prefix tuning with P=8 and the 5-token adapters in one bank of width 8: each
    row sees only its adapter's positions (the padding hidden by the bias) and numbers its tokens from its
    own P; every output equals PromptModel.generate with that adapter alone."""
    base, _, folders, references = served
    references = dict(references)
    for i, (name, config) in enumerate([("short", fastprompt.PromptTuningConfig(num_virtual_tokens=3)),
                                        ("long", fastprompt.PrefixTuningConfig(num_virtual_tokens=8))]):
        model = fastprompt.get_peft_model(base, config, adapter_name="default")
        torch.manual_seed(200 + i)
        with torch.no_grad():
            for param in model.prompt_sources.parameters():
                param.normal_(0, 1.0)
        model.save_pretrained(tmp_path / name)
        folders = {**folders, name: tmp_path / name}
        references[name] = fastprompt.from_pretrained(base, tmp_path / name, adapter_name=name)
    names = ("short", "a", "long", "mpt")
    engine = make_engine((base, served[1], folders, references), names=names, bucketed_steps=bucketed)
    assert engine.store.bank.num_virtual_tokens == 8 and engine.store.bank.prefix_bias is not None
    requests = engine.generate(mixed_requests(seed=29, count=10, names=names))
    for r in requests:
        expected = reference_tokens(references, r.adapter, r.prompt_ids, r.params.max_tokens, r.task)
        assert r.output_ids == expected, (r.adapter, r.task, r.prompt_ids)
    engine.unload_adapter("long")
    assert engine.store.bank.num_virtual_tokens == 5 and engine.store.bank.prefix_bias is not None
    engine.unload_adapter("short")
    assert engine.store.bank.prefix_bias is None  # one length again: no bias at all


def test_a_loaded_adapter_is_its_prompt_source_alone(served, monkeypatch):
    """Loading a folder builds no PromptModel around the shared base model (which would patch it again) and
    touches no module of it: the store runs the adapter's prompt source once through the engine's backbone."""
    base, tokenizer, folders, references = served
    engine = Engine(base, tokenizer, max_slots=2, max_len=24)
    forwards = {name: module.__dict__.get("forward") for name, module in base.named_modules()}

    def refused(*args, **kwargs):
        raise AssertionError("the store built a PromptModel to load an adapter")
    monkeypatch.setattr(fastprompt.PromptModel, "__init__", refused)
    for name in ("a", "pre", "mpt", "pt"):
        engine.load_adapter(name, folders[name])
    assert {name: module.__dict__.get("forward") for name, module in base.named_modules()} == forwards
    rows = [Request([4, 5, 6], name, SamplingParams(max_tokens=3, **GREEDY), task)
            for name, task in (("a", 0), ("pre", 0), ("pt", 0), ("mpt", 1))]
    for request, out in zip(rows, engine.generate(rows)):
        assert out.output_ids == reference_tokens(references, request.adapter, [4, 5, 6], 3, task=request.task)


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


def test_a_tiny_temperature_samples_the_top_token_and_disturbs_nobody(served):
    """Temperatures down to fp32's underflow (and past it) are near-greedy, never NaN in the softmax."""
    references = served[3]
    engine = make_engine(served, names=("a",))
    prompts = [[5, 9, 14], [7, 3]]
    requests = engine.generate([Request(p, "a", SamplingParams(max_tokens=6, temperature=t, seed=1, ignore_eos=True))
                                for p, t in zip(prompts, (1e-45, 1e-300))])
    for r in requests:
        assert r.finish_reason == "length" and r.output_ids == reference_tokens(references, "a", r.prompt_ids, 6)


def test_learned_positions_bound_prompt_and_max_tokens():
    """GPT-2 has n_positions learned positions: a request that would need more is refused naming the field
    (engine) or the argument (generate), before it can reach the embedding."""
    base = tiny_model("gpt2")
    model = fastprompt.get_peft_model(base, fastprompt.PromptTuningConfig(num_virtual_tokens=5))
    limit = base.config.n_positions
    engine = Engine(model, max_slots=2, max_len=limit + 8)
    engine.add_adapter("a", model)
    fits = Request([4] * 10, "a", SamplingParams(max_tokens=limit - 5 - 10 + 1, **GREEDY))
    assert len(engine.generate([fits])[0].output_ids) == limit - 14
    with pytest.raises(InvalidRequest, match=f"at most {limit - 14}") as error:
        engine.submit(Request([4] * 10, "a", SamplingParams(max_tokens=limit - 13, **GREEDY)))
    assert error.value.field == "max_tokens"
    with pytest.raises(InvalidRequest, match="prompt") as error:
        engine.submit(Request([4] * (limit - 4), "a", SamplingParams(max_tokens=1, **GREEDY)))
    assert error.value.field == "prompt"
    model.generate(input_ids=torch.full((1, 10), 4), max_new_tokens=limit - 14, eos_token_id=[])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(input_ids=torch.full((1, 10), 4), max_new_tokens=limit - 13)


def test_stop_strings_without_a_tokenizer_are_refused(served):
    engine = Engine(served[0], max_slots=2, max_len=20)
    engine.load_adapter("a", served[2]["a"])
    with pytest.raises(InvalidRequest, match="tokenizer") as error:
        engine.submit(Request([5, 6], "a", SamplingParams(max_tokens=3, stop=["x"])))
    assert error.value.field == "stop"


def test_a_failed_prefill_ends_its_requests_only(served):
    """An error in a prefill finishes the requests admitted with it; the running rows decode on."""
    references = served[3]
    engine = make_engine(served, names=("a", "pre"))
    running = engine.submit(Request([5, 9, 14], "pre", SamplingParams(max_tokens=8, **GREEDY)))
    engine.step()
    hidden_states = engine.backbone.hidden_states

    def failing(**kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            raise RuntimeError("planted prefill failure")
        return hidden_states(**kwargs)

    engine.backbone.hidden_states = failing
    newcomers = engine.submit_many([Request([3, 4], "a", SamplingParams(max_tokens=4, **GREEDY)) for _ in range(2)])
    while not running.done.is_set():
        engine.step()
    assert all(r.finish_reason == "error" and "planted" in r.error for r in newcomers)
    assert running.finish_reason == "length" and running.output_ids == reference_tokens(references, "pre",
                                                                                          [5, 9, 14], 8)
    assert engine.num_running == 0 and engine.L == 0


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


def test_batch_buckets_and_key_windows():
    assert batch_buckets(1) == [1] and batch_buckets(4) == [1, 2, 4] and batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(33) == [1, 2, 4, 8, 16, 32, 33]
    assert [key_window(L, 80) for L in (0, 15, 16, 31, 32, 63, 64, 79)] == [16, 16, 32, 32, 64, 64, 80, 80]
    assert key_window(5, 9) == 9  # never past the cache


def plain_decode_logits(engine) -> torch.Tensor:
    """The decode step without buckets, as the engine ran it before: the n active rows, keys [0, L + 1),
    the cache written at the Python-int offset L (into a copy, leaving the engine's cache alone)."""
    n, L, P = len(engine.rows), engine.L, engine.store.bank.num_virtual_tokens
    lengths = torch.tensor([r.length for r in engine.rows])
    bank_rows = torch.tensor([r.entry for r in engine.rows])
    mask = torch.arange(L + 1)[None] >= (L - lengths)[:, None]
    cache = KVCache([k[:n].clone() for k in engine.keys], [v[:n].clone() for v in engine.values], length=L)
    ctx = AttentionContext("prefix", engine.store.bank.keys, engine.store.bank.values, bank_rows, key_padding_mask=mask,
                           cache=cache, backend=engine.backend)
    input_ids = torch.tensor([[r.last_token] for r in engine.rows])
    hidden = engine.backbone.hidden_states(input_ids=input_ids, position_ids=lengths[:, None] + P, ctx=ctx)
    return engine.backbone.lm_head(hidden[:, -1])


def test_bucketed_decode_step_equals_plain_decode(served):
    """Every decode step of a long mixed run (3 of 4 slots padded to 4, key windows 16, 32 and the whole
    40-position cache, rebases at its end) gives the logits of the plain step on the active rows."""
    engine = make_engine(served, cache_len=40, bucketed_steps=True)
    step, seen = engine._decode_step, []

    def checked_step(nb, window, inputs):
        expected = plain_decode_logits(engine)
        logits = step(nb, window, inputs)
        n = len(engine.rows)
        assert logits.shape[0] == nb >= n and window > engine.L
        assert_close(f"logits n={n} nb={nb} window={window} L={engine.L}", logits[:n], expected,
                     RTOL[torch.float32])
        seen.append((n, nb, window, engine.L))
        return logits

    engine._decode_step = checked_step
    requests = engine.generate(mixed_requests(seed=13, count=15, max_tokens=(8, 25)))
    assert all(r.finish_reason == "length" for r in requests)
    assert any(nb > n for n, nb, _, _ in seen), seen
    assert {window for *_, window, _ in seen} == {16, 32, 40}, seen
    assert any(L1 < L0 for (*_, L0), (*_, L1) in zip(seen, seen[1:]) if L1 > 0), "no rebase happened"


def test_eager_decode_runs_exact_shapes_and_equals_bucketed(served):
    """Without CUDA graphs a step runs the live rows over the keys written so far (no pad rows, no unread
    window), and greedy outputs equal the bucketed step's."""
    engine = make_engine(served)
    assert not engine.bucketed_steps
    step, seen = engine._decode_step, []

    def recorded_step(nb, window, inputs):
        seen.append((nb, len(engine.rows), window, engine.L))
        return step(nb, window, inputs)

    engine._decode_step = recorded_step
    exact = engine.generate(mixed_requests(seed=19, count=9))
    assert seen and all(nb == n and window == L + 1 for nb, n, window, L in seen), seen
    bucketed = make_engine(served, bucketed_steps=True).generate(mixed_requests(seed=19, count=9))
    assert [r.output_ids for r in exact] == [r.output_ids for r in bucketed]


class StepTrace(TorchDispatchMode):
    """Records each aten op of a forward with its output shapes (and the address an index_copy_ writes
    to); fails on a read of a tensor's value on the host."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("the decode step read a tensor value on the host (.item(), int(), bool())")
        out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                       if isinstance(t, torch.Tensor))
        address = args[0].data_ptr() if func is torch.ops.aten.index_copy_.default else None
        self.ops.append((str(func), shapes, address))
        return out


def test_decode_step_has_no_host_read_and_fixed_shapes_within_a_bucket(served, monkeypatch):
    """What a CUDA graph needs: within one (batch bucket, key window) every step runs the same ops on
    the same shapes and writes the cache at the same addresses, whatever L and the rows are, and never
    reads a value back on the host. (The op's task-id range check reads ids on the host only for CPU
    tensors, skipped on CUDA; it is skipped here so the trace shows what a CUDA step does.)"""
    monkeypatch.setattr(prefix_attention_module, "check_index_values", lambda *args: None)
    # batch buckets 1, 2, 4, 5; rows join one a step, so bucket 4 runs 3 and 4 rows
    engine = make_engine(served, names=("a", "mpt"), max_slots=5, max_prefills_per_step=1, bucketed_steps=True)
    step, traces = engine._decode_step, {}

    def traced_step(nb, window, inputs):
        trace = StepTrace()
        with trace:
            logits = step(nb, window, inputs)
        traces.setdefault((nb, window), []).append((engine.L, len(engine.rows), trace.ops))
        return logits

    engine._decode_step = traced_step
    engine.generate(mixed_requests(seed=17, count=7, names=("a", "mpt"), max_tokens=(6, 20)))
    for key, runs in traces.items():
        first = runs[0][2]
        assert first and all(ops == first for _, _, ops in runs), key
    varied = [runs for runs in traces.values() if len({L for L, _, _ in runs}) >= 3]
    assert varied and any(len({n for _, n, _ in runs}) >= 2 for runs in traces.values()), traces.keys()


def test_kv_cache_write_at_takes_one_position():
    keys = [torch.randn(2, 1, 8, 4)]
    cache = KVCache(keys, [torch.randn(2, 1, 8, 4)], write_at=torch.tensor(3))
    new_k, new_v = torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4)
    read_k, read_v = cache.write(0, new_k, new_v)
    assert read_k.shape == (2, 1, 8, 4) and torch.equal(read_k[:, :, 3:4], new_k)
    assert torch.equal(read_v[:, :, 3:4], new_v)
    with pytest.raises(ValueError, match="one position"):
        cache.write(0, torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4))
