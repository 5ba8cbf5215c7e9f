"""The serving engine on CUDA: a mixed-adapter batch (prompt tuning, prefix tuning, MPT tasks, P-tuning)
decoded through captured CUDA graphs gives the same greedy tokens as eager decode (cuda_graphs=False), also
after an adapter is unloaded (which drops the graphs), and in fp32 the same tokens as PromptModel.generate on
the CPU for each request alone (the tiny models' spread logits leave no near-ties to break differently)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import DEVICE
from tests.serve.conftest import reference_tokens, served  # noqa: F401  (served: the fixture)
from tests.serve.test_engine import make_engine, mixed_requests

pytestmark = pytest.mark.gpu


def _outputs(requests):
    return [(r.adapter, r.task, r.prompt_ids, r.finish_reason, r.output_ids) for r in requests]


def _generate(served_on_device, **engine_kwargs):
    """Two rounds on one engine (max_len 48: key windows 16 to 96; 6 slots: batch buckets 1, 2, 4, 6), the
    second after unloading "pre". Returns (engine, outputs of round 1, graphs after round 1, outputs of
    round 2)."""
    engine = make_engine(served_on_device, max_slots=6, max_len=48, **engine_kwargs)
    first = _outputs(engine.generate(mixed_requests(seed=21, count=17, max_tokens=(4, 20))))
    graphs = dict(engine._graphs.graphs) if engine._graphs is not None else {}
    engine.unload_adapter("pre")
    second = _outputs(engine.generate(mixed_requests(seed=22, count=9, names=("a", "b", "mpt", "pt"),
                                                     max_tokens=(30, 40))))
    return engine, first, graphs, second


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_cuda_graphs_equal_eager_decode(served, dtype):  # noqa: F811
    base, tokenizer, folders, references = served
    on_device = (copy.deepcopy(base).to(DEVICE, dtype), tokenizer, folders, references)
    eager_engine, eager, _, eager_second = _generate(on_device, cuda_graphs=False)
    engine, graphed, graphs, graphed_second = _generate(on_device, cuda_graphs=True)
    assert eager_engine.num_decode_graphs == 0
    # several batch buckets and key windows were captured, and every round-1 graph was dropped at the unload
    assert len({nb for nb, _ in graphs}) >= 3 and len({window for _, window in graphs}) >= 3, sorted(graphs)
    assert engine.num_decode_graphs > 0
    assert not any(engine._graphs.graphs.get(key) is entry for key, entry in graphs.items())
    assert all(finish == "length" for *_, finish, _ in eager + eager_second), eager
    assert graphed == eager
    assert graphed_second == eager_second
    if dtype == torch.float32:
        for adapter, task, prompt, _, tokens in eager + eager_second:
            assert tokens == reference_tokens(references, adapter, prompt, len(tokens), task), (adapter, prompt)
