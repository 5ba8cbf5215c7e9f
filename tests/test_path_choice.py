"""path="auto": the cost model's choice between the shared-prefix and concat paths at representative shapes,
and a forward on "auto" equal to one on the path it chose (the two paths' equality with each other and with
PEFT is tested in test_mixed_batches.py and test_peft_equivalence.py)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastprompt
from fastprompt.backbones import get_backbone
from fastprompt.methods import PrefixTuningConfig, PromptTuningConfig
from fastprompt.path_choice import PATH_COST_CONSTANTS, packed_attention_form, packed_form_costs, path_costs
from tests.tiny_models import tiny_model


def _choice(backbone, device_type, B, T, P, n):
    costs = path_costs(backbone, B, T, P, n, device_type)
    return min(costs, key=costs.get)


@pytest.fixture(scope="module")
def llama_1b():
    """The Llama-3.2-1B shape (bench/models.py) on the meta device: geometry only, no weights."""
    config = LlamaConfig(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True)
    with torch.device("meta"):
        return get_backbone(LlamaForCausalLM(config))


@pytest.mark.parametrize("B, T, P, n, expected", [
    # measured on an H200 (bench/results/training-nvidia-h200-2026-12-04.json): concat 0.70x, 0.71x and
    # 0.66x the shared-prefix step, whose host time outweighs the 7 (or 4) prompt copies it saves
    (8, 128, 100, 1, "concat"),
    (8, 512, 100, 1, "concat"),
    (8, 512, 100, 4, "concat"),          # MPT, 4 tasks in 8 rows
    (64, 128, 100, 1, "shared_prefix"),  # 63 prompt copies saved: 6,300 tokens a layer outweigh the host time
    (8, 512, 20, 1, "concat"),
    (8, 512, 100, 8, "concat"),          # every row its own prompt: equal arithmetic, the packing's host cost
    (1, 512, 100, 1, "concat"),          # one row: nothing to share
    (2, 2048, 8, 1, "concat"),
])
def test_cuda_choice_at_the_llama_1b_shape(llama_1b, B, T, P, n, expected):
    assert _choice(llama_1b, "cuda", B, T, P, n) == expected


@pytest.fixture(scope="module")
def tiny_llama():
    return get_backbone(tiny_model("llama"))


@pytest.mark.parametrize("B, T, P, n, expected", [
    (4, 16, 100, 1, "shared_prefix"),   # bench --quick's prompt tuning P=100: measured 0.70-0.84x concat's step
    (4, 16, 5, 1, "concat"),            # measured 1.23-1.36x concat's step on the shared prefix
    (4, 16, 100, 4, "concat"),          # bench --quick's MPT: 4 tasks in 4 rows
    (1, 16, 100, 1, "concat"),
    (16, 16, 100, 1, "shared_prefix"),
])
def test_cpu_choice_at_tiny_shapes(tiny_llama, B, T, P, n, expected):
    assert _choice(tiny_llama, "cpu", B, T, P, n) == expected


@pytest.mark.parametrize("B, T, P, n, expected", [
    # bench --quick's shapes on a CPU: one masked SDPA call a layer beat the split form's two (prompt tuning
    # P=20: 0.94x -> 1.12x PEFT's tokens/s; P=100: 1.62x -> 1.81x) where the dense pairs cost little ...
    (4, 16, 20, 1, "masked"),
    (4, 16, 100, 1, "masked"),
    # ... and lost where they are many: MPT, 4 prompts of 100 in 4 rows, 464^2 pairs (1.02x -> 0.80x)
    (4, 16, 100, 4, "split"),
    (8, 512, 100, 1, "split"),
])
def test_cpu_packed_form_at_tiny_shapes(tiny_llama, B, T, P, n, expected):
    assert packed_attention_form(tiny_llama, B, T, P, n, "cpu") == expected


def test_cuda_has_only_the_split_form(llama_1b):
    """The masked form is unmeasured on a GPU (its dense mask keeps SDPA off flash): never chosen there."""
    assert set(packed_form_costs(llama_1b, 8, 128, 100, 1, "cuda")) == {"split"}
    assert packed_attention_form(llama_1b, 4, 16, 20, 1, "cuda") == "split"


def test_costs_follow_the_arithmetic(llama_1b):
    """Equal arithmetic at n = B (the shared prefix pays only its host time); less of it per shared prompt."""
    equal = path_costs(llama_1b, 8, 128, 100, 8, "cuda")
    layers = llama_1b.num_layers
    extra = PATH_COST_CONSTANTS["cuda"].extra_host_s_per_layer * layers
    assert equal["shared_prefix"] - equal["concat"] == pytest.approx(extra)
    fewer = [path_costs(llama_1b, 8, 128, 100, n, "cuda")["shared_prefix"] for n in (8, 4, 2, 1)]
    assert fewer == sorted(fewer, reverse=True)


@pytest.mark.parametrize("P, expected", [(100, "shared_prefix"), (5, "concat")])
def test_auto_forward_takes_the_chosen_path_and_equals_it(P, expected, monkeypatch):
    torch.manual_seed(0)
    model = fastprompt.get_peft_model(tiny_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                              num_virtual_tokens=P))
    ids = torch.randint(0, 100, (4, 16))
    taken = []
    for name in ("_packed_hidden", "_concat_hidden"):
        original = getattr(model, name)
        monkeypatch.setattr(model, name, lambda *a, _o=original, _n=name, **k: (taken.append(_n), _o(*a, **k))[1])
    auto = model(input_ids=ids, labels=ids).loss
    assert taken == ["_packed_hidden" if expected == "shared_prefix" else "_concat_hidden"]
    torch.testing.assert_close(auto, model(input_ids=ids, labels=ids, path=expected).loss, rtol=0, atol=0)


def test_prefix_tuning_reads_the_bank_on_every_path():
    model = fastprompt.get_peft_model(tiny_model("llama"), PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                              num_virtual_tokens=5))
    routing = model.plan(1)
    paths = {model.planner.plan(routing, 16, p, False, None).path for p in ("auto", "concat", "shared_prefix")}
    assert paths == {"shared_prefix"}
