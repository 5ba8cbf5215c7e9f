"""Adapter files round-trip with PEFT both ways; training checkpoints resume; writes are atomic."""

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastprompt
from fastprompt import io
from tests.helpers import assert_close
from tests.peft_pairs import METHODS, P, peft, peft_and_fastprompt, task_ids_for
from tests.tiny_models import batch, tiny_model


def _logits(model, ids, mask, task_ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits


def _input_logits(peft_logits, method):
    return peft_logits if method.startswith("prefix") else peft_logits[:, P:]


@pytest.mark.parametrize("method", list(METHODS))
def test_peft_loads_what_fastprompt_saves(method, tmp_path):
    _, ours = peft_and_fastprompt("llama", method)
    ids, mask, _ = batch()
    task_ids = task_ids_for(method, len(ids))
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == (["prefix_task_cols", "prefix_task_rows", "prompt_embeddings"] if method == "mpt"
                    else ["prompt_embeddings"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert_close("logits", _logits(ours, ids, mask, task_ids), _input_logits(_logits(loaded, ids, mask, task_ids),
                                                                             method), 1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_fastprompt_loads_what_peft_saves(method, tmp_path):
    peft_model, _ = peft_and_fastprompt("gpt2", method)
    ids, mask, _ = batch(padding="left")
    task_ids = task_ids_for(method, len(ids))
    peft_model.save_pretrained(tmp_path)
    loaded = fastprompt.from_pretrained(tiny_model("gpt2"), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert_close("logits", _logits(loaded, ids, mask, task_ids),
                 _input_logits(_logits(peft_model, ids, mask, task_ids), method), 1e-5)


def test_named_adapters_go_to_subfolders_and_reload(tmp_path):
    base = tiny_model("llama")
    model = fastprompt.get_peft_model(base, fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    model.add_adapter("other", fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()
    reloaded = fastprompt.from_pretrained(tiny_model("llama"), tmp_path)
    reloaded.load_adapter(tmp_path / "other", adapter_name="other")
    ids, mask, _ = batch()
    names = ["default", "other", "other"]
    assert_close("logits", _logits_named(reloaded, ids, mask, names), _logits_named(model, ids, mask, names), 1e-6)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["inference_mode"] is True


def _logits_named(model, ids, mask, names):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, adapter_names=names).logits


def test_trainable_load_keeps_training(tmp_path):
    base = tiny_model("llama")
    fastprompt.get_peft_model(base, fastprompt.PromptTuningConfig(num_virtual_tokens=4)).save_pretrained(tmp_path)
    model = fastprompt.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_sources.default.embedding.weight"]


@pytest.mark.parametrize("method", ["p_tuning_lstm", "prefix_projection", "mpt"])
def test_training_checkpoint_resumes_exactly(method, tmp_path):
    _, model = peft_and_fastprompt("llama", method)
    ids, mask, labels = batch()
    task_ids = task_ids_for(method, len(ids))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    step()
    fastprompt.save_training_checkpoint(tmp_path, model, optimizer, step=1)
    continued = [step() for _ in range(2)]
    _, resumed = peft_and_fastprompt("llama", method)
    with torch.no_grad():  # different prompt parameters until the checkpoint is loaded
        for param in resumed.prompt_sources.parameters():
            param.add_(1.0)
    resumed_optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    meta = fastprompt.load_training_checkpoint(tmp_path, resumed, resumed_optimizer)
    assert meta["step"] == 1
    model, optimizer = resumed, resumed_optimizer
    assert [step() for _ in range(2)] == continued
    # The training checkpoint keeps the encoder / projection MLP, which the PEFT file folds away.
    state = load_file(tmp_path / io.TRAINING_STATE_NAME)
    if method == "p_tuning_lstm":
        assert any(k.startswith("default.lstm_head.") for k in state)
    if method == "prefix_projection":
        assert any(k.startswith("default.transform.") for k in state)


def test_failed_write_leaves_no_file(tmp_path):
    target = tmp_path / "adapter_model.safetensors"

    def boom(path):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.atomic_write(target, boom)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_previous_adapter(tmp_path, monkeypatch):
    model = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        model.prompt_sources["default"].embedding.weight.add_(1.0)
    monkeypatch.setattr(io, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_save_into_the_working_folder_and_through_a_symlink(tmp_path, monkeypatch):
    model = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    model.save_pretrained(".")
    model.save_pretrained(".")
    assert os.getcwd() == str(tmp_path / "run") and Path("adapter_config.json").is_file()
    (tmp_path / "link").symlink_to(tmp_path / "run")
    with torch.no_grad():
        model.prompt_sources["default"].embedding.weight.add_(1.0)
    model.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(saved, model.prompt_sources["default"].embedding.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "run"]


def test_adapter_config_holds_peft_fields_only_and_peft_loads_it_silently(tmp_path):
    """fastprompt's own fields (class_label_words) live in fastprompt_config.json: PEFT 0.21 warned
    `Unexpected keyword arguments ['class_label_words']` when they were in adapter_config.json."""
    from tests.tiny_models import save_tiny_tokenizer

    save_tiny_tokenizer(tmp_path / "tok")
    config = fastprompt.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="CLASS_LABELS",
                                           class_label_words=["positive", "negative"],
                                           tokenizer_name_or_path=str(tmp_path / "tok"))
    ours = fastprompt.get_peft_model(tiny_model("llama"), config)
    ours.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / io.CONFIG_NAME).read_text())
    peft_fields = set(peft.PromptTuningConfig.__dataclass_fields__)
    assert set(saved) <= peft_fields, set(saved) - peft_fields
    assert json.loads((tmp_path / "adapter" / io.EXTRAS_NAME).read_text()) == {
        "class_label_words": ["positive", "negative"]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)], [str(w.message) for w in caught]
    assert torch.equal(theirs.get_prompt_embedding_to_save("default"), ours.get_prompt_embedding_to_save("default"))
    loaded = fastprompt.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
    assert loaded.peft_config["default"].class_label_words == ["positive", "negative"]
    assert torch.equal(loaded.get_prompt_embedding_to_save("default"), ours.get_prompt_embedding_to_save("default"))


def test_an_adapter_without_fastprompt_fields_has_no_extras_file(tmp_path):
    fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=4)).save_pretrained(
        tmp_path)
    assert not (tmp_path / io.EXTRAS_NAME).exists()


@pytest.mark.parametrize("extras, message", [
    ('{"class_label_words": "positive"}', "class_label_words must be a list of strings"),
    ('{"encoder_residual": "yes"}', "encoder_residual must be true or false"),
    ('{"run_me": ["x"]}', "unknown field 'run_me'"),
    ('{"class_label_words": ["a"', "is corrupt"),
])
def test_a_bad_extras_file_is_named(tmp_path, extras, message):
    fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=4)).save_pretrained(
        tmp_path)
    (tmp_path / io.EXTRAS_NAME).write_text(extras)
    with pytest.raises(ValueError, match=f"fastprompt_config.json.*{message}"):
        fastprompt.from_pretrained(tiny_model("llama"), tmp_path)
