"""Every user error raises a ValueError that names the argument and the expected value."""

import json

import pytest
import torch

import fastprompt
from tests.tiny_models import batch, tiny_model


@pytest.fixture
def model():
    m = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    m.add_adapter("other", fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    return m


def test_task_id_out_of_range(model):
    ids, mask, _ = batch()
    with pytest.raises(ValueError, match=r"task_ids\[1\]=5 is out of range: 2 adapters"):
        model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 5, 1]))


def test_mpt_task_id_out_of_range_and_missing():
    m = fastprompt.get_peft_model(tiny_model("llama"),
                                  fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=4, num_tasks=2))
    ids, mask, _ = batch()
    with pytest.raises(ValueError, match=r"task_ids\[2\]=2 is out of range for adapter 'default' with num_tasks=2"):
        m(input_ids=ids, task_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="task_ids is required for multitask prompt tuning"):
        m(input_ids=ids)
    with pytest.raises(ValueError, match=r"task_ids must be an int64 tensor of shape \[3\]"):
        m(input_ids=ids, task_ids=torch.tensor([0.0, 1.0, 1.0]))


def test_unknown_adapter_name(model):
    ids, _, _ = batch()
    with pytest.raises(ValueError, match=r"adapter_names\[2\]='missing' is not a loaded adapter; loaded: "
                                         r"\['default', 'other'\]"):
        model(input_ids=ids, adapter_names=["default", "other", "missing"])
    with pytest.raises(ValueError, match="adapter_names must be a list of 3 adapter names"):
        model(input_ids=ids, adapter_names=["default"])
    with pytest.raises(ValueError, match="adapter_name='nope' is not a loaded adapter"):
        model.set_adapter("nope")


def test_adapters_of_different_methods_or_lengths(model):
    ids, _, _ = batch()
    model.add_adapter("longer", fastprompt.PromptTuningConfig(num_virtual_tokens=6))
    model.add_adapter("prefix", fastprompt.PrefixTuningConfig(num_virtual_tokens=4))
    with pytest.raises(ValueError, match="must share method and num_virtual_tokens.*'longer' is PROMPT_TUNING "
                                         "with 6"):
        model(input_ids=ids, adapter_names=["default", "longer", "default"])
    with pytest.raises(ValueError, match="'prefix' is PREFIX_TUNING"):
        model(input_ids=ids, adapter_names=["default", "prefix", "default"])


def test_unsupported_model_family():
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(ValueError, match=r"model family 'opt' is not supported; supported model_type values: "
                                         r"\['bart', 'bert', 'gpt2', 'llama', 'mistral', 'mt5', 'qwen2', 'qwen3', "
                                         r"'roberta', 't5'\]"):
        fastprompt.get_peft_model(opt, fastprompt.PromptTuningConfig(num_virtual_tokens=4))


@pytest.mark.parametrize("field,value,expected", [
    ("token_dim", 64, r"config.token_dim=64 does not match the model \(token_dim=48 for llama\)"),
    ("num_layers", 3, r"config.num_layers=3 does not match the model \(num_layers=2"),
])
def test_config_dimensions_must_match_model(field, value, expected):
    config = fastprompt.PromptTuningConfig(num_virtual_tokens=4, **{field: value})
    with pytest.raises(ValueError, match=expected):
        fastprompt.get_peft_model(tiny_model("llama"), config)


def test_prefix_token_dim_must_be_kv_width():
    # llama tiny: 2 kv heads x head_dim 12 = 24, not the hidden size 48
    with pytest.raises(ValueError, match=r"config.token_dim=48 does not match the model \(token_dim=24"):
        fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PrefixTuningConfig(num_virtual_tokens=4,
                                                                                     token_dim=48))


def test_bad_config_values():
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int"):
        fastprompt.PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="prompt_tuning_init must be one of"):
        fastprompt.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="ZEROS")
    with pytest.raises(ValueError, match="needs tokenizer_name_or_path"):
        fastprompt.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    with pytest.raises(ValueError, match="encoder_reparameterization_type must be 'MLP' or 'LSTM'"):
        fastprompt.PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match="peft_type must be one of"):
        fastprompt.get_peft_model(tiny_model("llama"), {"peft_type": "LORA"})


@pytest.mark.parametrize("config_class, field", [
    (fastprompt.PromptTuningConfig, "num_virtual_tokens"), (fastprompt.PrefixTuningConfig, "num_virtual_tokens"),
    (fastprompt.MultitaskPromptTuningConfig, "num_ranks"), (fastprompt.MultitaskPromptTuningConfig, "num_tasks")])
def test_a_bool_is_not_a_count(config_class, field):
    """True is an int in Python; num_virtual_tokens=True must not mean P=1."""
    with pytest.raises(ValueError, match=f"{field} must be a positive int, got True"):
        config_class(**{"num_virtual_tokens": 4, field: True})


@pytest.mark.parametrize("method", ["prompt", "mpt"])
def test_an_adapter_config_larger_than_its_file_is_refused_before_allocating(method, tmp_path):
    """A 431-byte config asking for num_virtual_tokens=50_000_000 beside a 4-token file: refused from the
    shapes alone (50M x 48 floats would be 9.6 GB), the model left without the adapter."""
    config = (fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=4, num_tasks=2) if method == "mpt"
              else fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    fastprompt.get_peft_model(tiny_model("llama"), config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "num_virtual_tokens": 50_000_000}))
    with pytest.raises(ValueError, match=r"num_virtual_tokens=50000000\) needs 'prompt_embeddings' of shape "
                                         r"\(50000000, 48\), the weights file holds \(4, 48\)"):
        fastprompt.from_pretrained(tiny_model("llama"), tmp_path)
    model = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    with pytest.raises(ValueError, match="num_virtual_tokens=50000000"):
        model.load_adapter(tmp_path, adapter_name="huge")
    assert list(model.prompt_sources) == ["default"]


def test_batch_shape_mismatch(model):
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B=3, T=9\], got \(3, 8\)"):
        model(input_ids=ids, attention_mask=mask[:, :8])
    with pytest.raises(ValueError, match=r"labels must have shape \[B=3, T=9\]"):
        model(input_ids=ids, labels=labels[:2])


def test_missing_and_corrupt_checkpoints(model, tmp_path):
    with pytest.raises(ValueError, match="adapter folder .*nowhere' does not exist"):
        fastprompt.from_pretrained(tiny_model("llama"), tmp_path / "nowhere")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match="adapter_model.safetensors' is corrupt or unreadable"):
        model.load_adapter(tmp_path, adapter_name="broken")
    weights.unlink()
    with pytest.raises(ValueError, match="adapter_model.safetensors' does not exist"):
        model.load_adapter(tmp_path, adapter_name="broken")
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json' is not valid JSON"):
        model.load_adapter(tmp_path, adapter_name="broken")
    assert model.adapter_names == ["default", "other"]  # nothing half-loaded


def test_checkpoint_of_another_shape_is_refused(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["num_virtual_tokens"] = 7
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"needs 'prompt_embeddings' of shape \(7, 48\), the weights file holds \(4, 48\)"):
        model.load_adapter(tmp_path, adapter_name="seven")
    assert "seven" not in model.adapter_names
    with pytest.raises(ValueError, match="adapter_name='other' is already loaded"):
        model.load_adapter(tmp_path, adapter_name="other")


def test_generate_arguments(model):
    ids, mask, _ = batch()
    with pytest.raises(ValueError, match="top_p must lie in"):
        model.generate(ids, attention_mask=mask, top_p=0.0, do_sample=True)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(ids, temperature=0.0, do_sample=True)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        model.generate(ids, max_new_tokens=-1)
