"""Rows of one batch use different adapters (or MPT tasks); each row equals a run of that row alone,
and the shared-prefix path, in either form of its packed attention, equals the concatenation path in loss
and every prompt gradient."""

import pytest
import torch

import fastprompt
from tests.helpers import assert_close
from tests.tiny_models import batch, tiny_model

CONFIGS = {
    "prompt_tuning": lambda: fastprompt.PromptTuningConfig(num_virtual_tokens=4),
    "prefix": lambda: fastprompt.PrefixTuningConfig(num_virtual_tokens=4),
    "p_tuning": lambda: fastprompt.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16),
}


def _bank(family, method, n_adapters=3):
    torch.manual_seed(0)
    model = fastprompt.get_peft_model(tiny_model(family), CONFIGS[method](), adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", CONFIGS[method]())
    return model


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_adapter_rows_equal_single_runs(family, method):
    model = _bank(family, method)
    ids, mask, _ = batch(batch_size=4, padding="left")
    names = ["a2", "a0", "a2", "a1"]
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        by_index = model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([2, 0, 2, 1])).logits
        for row, name in enumerate(names):
            model.set_adapter(name)
            alone = model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits
            assert_close(f"row {row} ({name})", mixed[row:row + 1], alone, 1e-5)
    assert torch.equal(mixed, by_index)


def test_mixed_mpt_tasks_equal_single_runs():
    torch.manual_seed(0)
    model = fastprompt.get_peft_model(tiny_model("qwen3"),
                                      fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=4, num_tasks=3,
                                                                             num_ranks=2))
    with torch.no_grad():
        for p in model.prompt_sources.parameters():
            p.normal_()
    ids, mask, _ = batch(batch_size=4)
    tasks = torch.tensor([1, 1, 0, 2])
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, task_ids=tasks).logits
        for row in range(4):
            alone = model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], task_ids=tasks[row:row + 1])
            assert_close(f"row {row}", mixed[row:row + 1], alone.logits, 1e-5)


def test_mixed_generate_equals_single_generate():
    model = _bank("llama", "prompt_tuning")
    ids, mask, _ = batch(batch_size=4, padding="left")
    names = ["a1", "a0", "a2", "a1"]
    mixed = model.generate(ids, attention_mask=mask, adapter_names=names, max_new_tokens=5)
    for row, name in enumerate(names):
        alone = model.generate(ids[row:row + 1], attention_mask=mask[row:row + 1], adapter_names=[name],
                               max_new_tokens=5)
        assert torch.equal(mixed[row, :alone.shape[1]], alone[0])


@pytest.mark.parametrize("config", [
    fastprompt.PromptTuningConfig(num_virtual_tokens=5),
    fastprompt.PromptEncoderConfig(num_virtual_tokens=5, encoder_reparameterization_type="LSTM",
                                   encoder_hidden_size=8),
    fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=5, num_tasks=2, num_ranks=3),
], ids=["prompt_tuning", "p_tuning_lstm", "mpt"])
@pytest.mark.parametrize("family", ["mistral", "gpt2"])
@pytest.mark.parametrize("form", ["split", "masked"])
def test_shared_prefix_equals_concat(family, config, form, monkeypatch):
    """Right padding, rows of two MPT tasks; the packed pass in the form under test (on the CPU the cost
    model would pick the masked one at these sizes; the split one is the GPU's)."""
    import fastprompt.model as prompt_model
    import fastprompt.planner as planner

    monkeypatch.setattr(planner, "packed_attention_form", lambda *args: form)
    masks, build = [], prompt_model.packed_attention_mask

    def recorded(*args):
        masks.append(build(*args))
        return masks[-1]

    monkeypatch.setattr(prompt_model, "packed_attention_mask", recorded)
    torch.manual_seed(0)
    model = fastprompt.get_peft_model(tiny_model(family), config)
    with torch.no_grad():
        for p in model.prompt_sources.parameters():
            p.normal_(0, 0.5)
    ids, mask, labels = batch(batch_size=4, padding="right")
    task_ids = torch.tensor([1, 0, 1, 1]) if config.peft_type == "MULTITASK_PROMPT_TUNING" else None
    results = {}
    for path in ("concat", "shared_prefix"):
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids, path=path,
                    return_logits=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[path] = (out.loss.detach(), out.logits.detach(), grads)
    assert len(masks) == (1 if form == "masked" else 0)      # the form under test ran (its mask built once)
    assert_close("loss", results["shared_prefix"][0], results["concat"][0], 1e-5)
    assert_close("logits", results["shared_prefix"][1], results["concat"][1], 1e-5)
    for name, grad in results["concat"][2].items():
        assert_close(f"grad {name}", results["shared_prefix"][2][name], grad, 1e-4)


@pytest.mark.parametrize("path", ["concat", "shared_prefix"])
def test_all_ones_attention_mask_is_no_mask(path):
    """A mask that hides nothing is dropped on the CPU (attention takes its unmasked causal route): the same
    loss as no mask at all, bit for bit; one padded token changes it."""
    model = _bank("llama", "prompt_tuning", n_adapters=1)
    ids, _, labels = batch(batch_size=3, length=9)
    ones = torch.ones_like(ids)
    plain = model(input_ids=ids, labels=labels, path=path).loss
    assert torch.equal(model(input_ids=ids, attention_mask=ones, labels=labels, path=path).loss, plain)
    padded = ones.clone()
    padded[0, 0] = 0
    assert not torch.equal(model(input_ids=ids, attention_mask=padded, labels=labels, path=path).loss, plain)
