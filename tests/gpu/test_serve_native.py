"""The serving engine on CUDA: a mixed-adapter batch (prompt tuning, prefix tuning, MPT tasks, P-tuning)
decoded with cuda_graphs=True gives the same greedy tokens as cuda_graphs=False, and in fp32 the same
tokens as PromptModel.generate on the CPU for each request alone (the tiny models' spread logits leave no
near-ties to break differently)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import DEVICE
from tests.serve.conftest import reference_tokens, served  # noqa: F401  (served: the fixture)
from tests.serve.test_engine import make_engine, mixed_requests

pytestmark = pytest.mark.gpu


def _generate(served_on_device, **engine_kwargs):
    engine = make_engine(served_on_device, max_slots=6, max_len=48, **engine_kwargs)
    return [(r.adapter, r.task, r.prompt_ids, r.finish_reason, r.output_ids)
            for r in engine.generate(mixed_requests(seed=21, count=17, max_tokens=(4, 20)))]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_cuda_graphs_equal_eager_decode(served, dtype):  # noqa: F811
    base, tokenizer, folders, references = served
    on_device = (copy.deepcopy(base).to(DEVICE, dtype), tokenizer, folders, references)
    eager = _generate(on_device, cuda_graphs=False)
    graphs = _generate(on_device, cuda_graphs=True)
    assert all(finish == "length" for *_, finish, _ in eager), eager
    assert graphs == eager
    if dtype == torch.float32:
        for adapter, task, prompt, _, tokens in eager:
            assert tokens == reference_tokens(references, adapter, prompt, len(tokens), task), (adapter, prompt)
