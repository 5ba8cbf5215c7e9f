"""Prompt initialisations: PEFT's (RANDOM, SAMPLE_VOCAB, TEXT, MPT's source inits) and class labels."""

import warnings

import pytest
import torch

import fastprompt
from tests.helpers import assert_close
from tests.peft_pairs import peft
from tests.tiny_models import WORDS, save_tiny_tokenizer, tiny_model


@pytest.fixture
def tokenizer_dir(tmp_path):
    save_tiny_tokenizer(tmp_path / "tok")
    return str(tmp_path / "tok")


def _prompt(model):
    return model.prompt_sources["default"].embedding.weight.detach()


def _table(model):
    return model.backbone.word_embeddings.weight.detach()


def test_text_init_equals_peft(tokenizer_dir):
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT",
                  prompt_tuning_init_text="this movie was good", tokenizer_name_or_path=tokenizer_dir)
    base = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft.get_peft_model(base, peft.PromptTuningConfig(**kwargs)).prompt_encoder["default"]
    ours = fastprompt.get_peft_model(base, fastprompt.PromptTuningConfig(**kwargs))
    assert_close("prompt", _prompt(ours), expected.embedding.weight.detach(), 0.0)
    # The 4 text tokens repeat to fill 7 virtual tokens.
    ids = [WORDS.index(w) + 3 for w in "this movie was good".split()]
    assert torch.equal(_prompt(ours), _table(ours)[(ids * 2)[:7]])


def test_sample_vocab_init_takes_rows_of_the_table():
    model = fastprompt.get_peft_model(tiny_model("gpt2"),
                                      fastprompt.PromptTuningConfig(num_virtual_tokens=6,
                                                                    prompt_tuning_init="SAMPLE_VOCAB"))
    table = _table(model)
    for row in _prompt(model):
        assert (table == row).all(-1).any()


def test_class_label_init(tokenizer_dir):
    config = fastprompt.PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="CLASS_LABELS",
                                           class_label_words=["positive", "negative"],
                                           tokenizer_name_or_path=tokenizer_dir)
    model = fastprompt.get_peft_model(tiny_model("llama"), config)
    table = _table(model)
    assert torch.equal(_prompt(model)[0], table[WORDS.index("positive") + 3])
    assert torch.equal(_prompt(model)[1], table[WORDS.index("negative") + 3])
    for row in _prompt(model)[2:]:
        assert (table == row).all(-1).any()


def test_random_init_and_prefix_zero_init():
    model = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    assert torch.isfinite(_prompt(model)).all() and _prompt(model).std() > 0.1
    prefix = fastprompt.get_peft_model(tiny_model("llama"),
                                       fastprompt.PrefixTuningConfig(num_virtual_tokens=4, init_weights="zero"))
    assert not prefix.prompt_sources["default"].embedding.weight.any()
    projected = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PrefixTuningConfig(
        num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=8, init_weights="zero"))
    assert not projected.prompt_sources["default"].flat().any()


def test_missing_tokenizer_folder(tmp_path):
    config = fastprompt.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT",
                                           prompt_tuning_init_text="good", tokenizer_name_or_path=str(tmp_path))
    with pytest.raises(ValueError, match="no tokenizer could be loaded from that local folder"):
        fastprompt.get_peft_model(tiny_model("llama"), config)


@pytest.fixture
def mpt_source(tmp_path):
    torch.manual_seed(3)
    source = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.MultitaskPromptTuningConfig(
        num_virtual_tokens=4, num_tasks=3, num_ranks=2))
    with torch.no_grad():
        for p in source.prompt_sources.parameters():
            p.normal_()
    source.save_pretrained(tmp_path / "source")
    return source.prompt_sources["default"], str(tmp_path / "source" / "adapter_model.safetensors")


@pytest.mark.parametrize("init", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
def test_mpt_source_inits_equal_peft(init, mpt_source):
    source, path = mpt_source
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=1, num_ranks=2, prompt_tuning_init=init,
                  prompt_tuning_init_state_dict_path=path, prompt_tuning_init_task=2)
    base = tiny_model("llama")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft.get_peft_model(base, peft.MultitaskPromptTuningConfig(**kwargs)).prompt_encoder["default"]
    torch.manual_seed(0)
    ours = fastprompt.get_peft_model(base, fastprompt.MultitaskPromptTuningConfig(**kwargs)).prompt_sources["default"]
    assert torch.equal(ours.embedding.weight, source.embedding.weight)
    for name in ("embedding.weight", "prefix_task_cols", "prefix_task_rows"):
        assert_close(name, dict(ours.named_parameters())[name], dict(expected.named_parameters())[name], 1e-6)
    if init == "EXACT_SOURCE_TASK":
        assert torch.equal(ours.prefix_task_cols[0], source.prefix_task_cols[2])


def test_mpt_average_init_for_several_target_tasks(mpt_source):
    source, path = mpt_source
    model = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.MultitaskPromptTuningConfig(
        num_virtual_tokens=4, num_tasks=2, num_ranks=2, prompt_tuning_init="AVERAGE_SOURCE_TASKS",
        prompt_tuning_init_state_dict_path=path))
    cols = model.prompt_sources["default"].prefix_task_cols
    assert_close("cols", cols[1], source.prefix_task_cols.mean(0), 1e-6)
    assert torch.equal(cols[0], cols[1])


def test_mpt_text_init_equals_peft(tokenizer_dir):
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=5, num_tasks=2, prompt_tuning_init="TEXT",
                  prompt_tuning_init_text="great film", tokenizer_name_or_path=tokenizer_dir)
    base = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft.get_peft_model(base, peft.MultitaskPromptTuningConfig(**kwargs)).prompt_encoder["default"]
    ours = fastprompt.get_peft_model(base, fastprompt.MultitaskPromptTuningConfig(**kwargs))
    assert_close("shared prompt", _prompt(ours), expected.embedding.weight.detach(), 0.0)
