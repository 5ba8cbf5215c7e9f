"""Runtime properties beyond PEFT parity: no PEFT needed at run time, half-precision backbones."""

import subprocess
import sys

import pytest
import torch

import fastprompt
from tests.helpers import assert_close
from tests.tiny_models import batch, tiny_model


def test_works_without_peft_installed():
    script = (
        "import sys; sys.modules['peft'] = None\n"  # any `import peft` now raises ImportError
        "import torch, fastprompt\n"
        "from tests.tiny_models import tiny_model, batch\n"
        "m = fastprompt.get_peft_model(tiny_model('llama'), fastprompt.PromptTuningConfig(num_virtual_tokens=3))\n"
        "ids, mask, labels = batch()\n"
        "m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()\n"
        "print(m.generate(ids, attention_mask=mask, max_new_tokens=2).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([3, 11])" in result.stdout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix", "mpt"])
def test_half_precision_backbone_is_as_accurate_as_peft(method, dtype):
    """A whole half-precision backbone drifts from fp32 (bf16 gradients: 3-8% on this tiny, sharp model,
    for PEFT as for fastprompt), so logits, loss and prompt gradients are held to PEFT's own error in
    the same dtype: no more than 1.25 times it (plus 1e-3 for values PEFT gets almost exactly)."""
    from tests.peft_pairs import peft_and_fastprompt, prompt_grads, task_ids_for

    peft_model, model = peft_and_fastprompt("llama", method)
    ids, mask, labels = batch()
    task_ids = task_ids_for(method, len(ids))

    def run(m, sources):
        extra = {"return_logits": True} if m is model else {}
        out = m(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids, **extra)
        out.loss.backward()
        # PEFT's logits include the virtual tokens': compare the input tokens' only.
        results = {"loss": out.loss.detach(), "logits": out.logits.detach()[:, -ids.shape[1]:],
                   **prompt_grads(sources)}
        m.zero_grad()
        return results

    exact = run(model, model.prompt_sources["default"])
    model.base_model.to(dtype)
    ours = run(model, model.prompt_sources["default"])
    theirs = run(peft_model, peft_model.prompt_encoder["default"])
    assert ours["logits"].dtype == dtype
    assert all(p.dtype == torch.float32 for p in model.prompt_sources.parameters())  # prompts train in fp32
    for name, value in exact.items():
        error, peft_error = _relative_error(ours[name], value), _relative_error(theirs[name], value)
        assert error <= 1.25 * peft_error + 1e-3, f"{name}: relative error {error:.3e}, PEFT's {peft_error:.3e}"


def _relative_error(actual, expected):
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def test_inputs_embeds_equal_input_ids():
    model = fastprompt.get_peft_model(tiny_model("qwen2"), fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    ids, mask, labels = batch()
    embeds = model.backbone.word_embeddings(ids)
    for path in ("shared_prefix", "concat"):
        a = model(input_ids=ids, attention_mask=mask, labels=labels, path=path, return_logits=True)
        b = model(inputs_embeds=embeds, attention_mask=mask, labels=labels, path=path, return_logits=True)
        assert_close(f"{path} logits", b.logits, a.logits, 1e-6)
        assert_close(f"{path} loss", b.loss, a.loss, 1e-6)


def test_num_items_in_batch_gives_the_summed_loss_over_it():
    """transformers.Trainer passes the token count of all accumulated micro-batches."""
    model = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    ids, mask, labels = batch()
    mean = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    n_targets = int((labels != -100).sum())  # with the virtual token predicting each row's first token
    summed = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=2 * n_targets).loss
    assert_close("loss", summed * 2, mean, 1e-6)


def test_autocast_trains_in_half_precision():
    model = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PrefixTuningConfig(num_virtual_tokens=4))
    ids, mask, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grad = model.prompt_sources["default"].embedding.weight.grad
    assert torch.isfinite(out.loss) and grad is not None and grad.abs().sum() > 0


def test_model_backend_reaches_the_mpt_prompt_op(monkeypatch):
    """PromptModel(backend="torch") keeps every op on the reference, MPT's prompt product included, even
    where the environment asks for Triton."""
    import fastprompt.kernels.prompt_embed as triton_launchers

    def refuse(*args, **kwargs):
        raise AssertionError("a Triton launcher ran under PromptModel(backend='torch')")

    for name in ("prompt_embed_fwd", "mpt_prompt_embed_fwd", "mpt_prompts_fwd"):
        monkeypatch.setattr(triton_launchers, name, refuse)
    monkeypatch.setenv("FASTPROMPT_BACKEND", "triton")
    config = fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=4, num_tasks=3, num_ranks=2)
    model = fastprompt.get_peft_model(tiny_model("llama"), config, backend="torch")
    ids, mask, labels = batch(3, 7)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=torch.tensor([2, 0, 2])).loss
    loss.backward()
    assert torch.isfinite(loss) and model.prompt_sources["default"].prefix_task_cols.grad is not None
