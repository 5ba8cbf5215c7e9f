"""The kernel micro-benchmarks' baselines and case lists: bench_prompt_embed's PEFT baseline is what PEFT's
own model feeds its backbone, and bench_prefix_attention decodes 64 tasks and one task at the same shape."""

import argparse
import json

import pytest
import torch

from bench import bench_prefix_attention, bench_prompt_embed
from bench.models import build_model

peft = pytest.importorskip("peft")

CPU = torch.device("cpu")


def _args(**values):
    defaults = dict(batch=5, tokens=7, virtual=3, dim=64, vocab=503, tasks=3, rank=2, param_dtype="fp32")
    return argparse.Namespace(**{**defaults, **values})


def _peft_inputs_embeds(model, input_ids, task_ids):
    """The inputs_embeds PEFT's prompt-learning model hands its backbone for these rows."""
    captured = {}

    def hook(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.get_base_model().model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), task_ids=task_ids)
    finally:
        handle.remove()
    return captured["embeds"]


@pytest.mark.parametrize("mpt", [False, True], ids=["prompt_tuning", "mpt"])
def test_the_peft_baseline_equals_what_peft_feeds_its_backbone(mpt):
    args = _args()
    base = build_model("tiny-llama", torch.float32, CPU)
    inputs, params, _ = bench_prompt_embed.make_case(args, CPU, torch.float32, mpt)
    inputs["weight"] = base.get_input_embeddings().weight.detach()
    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=args.virtual)
    if mpt:
        config = peft.MultitaskPromptTuningConfig(num_tasks=args.tasks, num_ranks=args.rank, **common)
        state = dict(zip(("embedding.weight", "prefix_task_cols", "prefix_task_rows"), params))
    else:
        config = peft.PromptTuningConfig(**common)
        state = {"embedding.weight": params[0]}
    model = peft.get_peft_model(base, config)
    model.prompt_encoder["default"].load_state_dict({k: v.detach() for k, v in state.items()})
    expected = _peft_inputs_embeds(model, inputs["input_ids"], inputs["task_ids"] if mpt else None)

    out = bench_prompt_embed.peft_provider(mpt)(inputs, params)()
    assert out.shape == (args.batch, args.virtual + args.tokens, args.dim)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)   # the leaves fastprompt reads
    torch.testing.assert_close(bench_prompt_embed.fastprompt_provider("torch", mpt)(inputs, params)(), out)


def test_quick_prompt_embed_times_peft_and_fastprompt_on_both_methods(tmp_path):
    assert bench_prompt_embed.main(["--quick", "--dtype", "fp32", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.iterdir()

    rows = json.loads(path.read_text())
    timed = {(r["op"], r["provider"], r["mode"]) for r in rows}
    assert timed == {(op, p, m) for op in ("prompt_embed", "mpt_prompt_embed") for p in ("peft", "fastprompt-torch")
                     for m in ("fwd", "fwd+bwd")}
    assert all(r["speedup_vs_peft"] > 0 and r["dtype"] == "float32" for r in rows)
    assert {r["tasks"] for r in rows if r["op"] == "prompt_embed"} == {1}


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_decode_cases_pair_one_task_per_row_with_one_task_at_the_same_shape(quick):
    cases = bench_prefix_attention.decode_cases(quick)
    batch = 4 if quick else 64
    shapes = {}
    for case in cases:
        assert case["kind"] == "decode" and case["B"] == batch and case["T"] == 1
        key = tuple(case[k] for k in ("B", "Hq", "Hkv", "T", "S", "P", "D"))
        shapes.setdefault(key, {})[case["n_tasks"]] = case["lengths"]
    assert shapes and all(sorted(by_tasks) == [1, batch] for by_tasks in shapes.values())
    for by_tasks in shapes.values():
        assert torch.equal(by_tasks[1], by_tasks[batch])
