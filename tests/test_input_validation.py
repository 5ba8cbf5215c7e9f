"""Bad arguments to forward, hidden_states and generate on the default (shared-prefix) path: each a
ValueError naming the argument and what it allows, never an IndexError from deep in the backbone; and
adapter files with bad contents refused at load, naming the file."""

import json

import pytest
import torch
from safetensors.torch import save_file

import fastprompt
from fastprompt import io
from tests.tiny_models import VOCAB, tiny_model


@pytest.fixture(scope="module")
def model():
    m = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    m.add_adapter("other", fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    return m


def _ids(seed: int, shape=(2, 5)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _calls(model):
    """forward, hidden_states and generate, each taking input_ids and keyword arguments."""
    return {"forward": lambda ids, **kw: model(input_ids=ids, **kw),
            "hidden_states": lambda ids, **kw: model.hidden_states(input_ids=ids, **kw),
            "generate": lambda ids, **kw: model.generate(input_ids=ids, max_new_tokens=2, **kw)}


@pytest.mark.parametrize("call", ["forward", "hidden_states", "generate"])
@pytest.mark.parametrize("bad, message", [
    (VOCAB, r"input_ids must lie in \[0, 101\) \(the vocabulary\), got values in \[\d+, 101\]"),
    (-1, r"input_ids must lie in \[0, 101\) \(the vocabulary\), got values in \[-1, \d+\]"),
    (10**6, r"input_ids must lie in \[0, 101\)"),
])
def test_input_ids_out_of_the_vocabulary(model, call, bad, message):
    for seed in range(3):
        ids = _ids(seed)
        row, col = int(torch.randint(0, 2, ())), int(torch.randint(0, 5, ()))
        ids[row, col] = bad
        with pytest.raises(ValueError, match=message):
            _calls(model)[call](ids)


@pytest.mark.parametrize("call", ["forward", "hidden_states", "generate"])
@pytest.mark.parametrize("make, message", [
    (lambda: _ids(0).float(), r"input_ids must be an int64 \(or int32\) tensor of token ids, got torch.float32"),
    (lambda: _ids(0).bool(), r"input_ids must be an int64 \(or int32\) tensor of token ids, got torch.bool"),
    (lambda: _ids(0, (2, 3, 4)), r"input_ids must have shape \[B, T\] .*got \(2, 3, 4\)"),
    (lambda: _ids(0, (5,)), r"input_ids must have shape \[B, T\] .*got \(5,\)"),
    (lambda: _ids(0, (0, 5)), r"input_ids must have shape \[B, T\] with B >= 1 rows of T >= 1 tokens, got \(0, 5\)"),
    (lambda: _ids(0, (2, 0)), r"input_ids must have shape \[B, T\] with B >= 1 rows of T >= 1 tokens, got \(2, 0\)"),
    (lambda: _ids(0).tolist(), r"input_ids must be a torch.Tensor \[B, T\] of token ids, got list"),
])
def test_input_ids_of_the_wrong_kind(model, call, make, message):
    with pytest.raises(ValueError, match=message):
        _calls(model)[call](make())


def test_int32_input_ids_still_work(model):
    ids = _ids(4)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids.int()).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("call", ["forward", "hidden_states", "generate"])
def test_task_ids_with_adapter_names_of_plain_adapters(model, call):
    with pytest.raises(ValueError, match=r"pass task_ids or adapter_names, not both: .*adapter_names\[0\]="
                                         r"'other' is PROMPT_TUNING"):
        _calls(model)[call](_ids(1), task_ids=torch.tensor([0, 1]), adapter_names=["other", "default"])


def test_task_ids_with_adapter_names_pick_the_task_of_an_mpt_adapter():
    m = fastprompt.get_peft_model(tiny_model("llama"),
                                  fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=4, num_tasks=3))
    ids = _ids(2)
    with torch.no_grad():
        both = m(input_ids=ids, task_ids=torch.tensor([2, 1]), adapter_names=["default"] * 2).logits
        alone = m(input_ids=ids, task_ids=torch.tensor([2, 1])).logits
    assert torch.equal(both, alone)


@pytest.mark.parametrize("seed", [2**64, 2**70, -2**63 - 1, 1.5, "3", True])
def test_seed_out_of_range(model, seed):
    with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*64\)"):
        model.generate(input_ids=_ids(3), max_new_tokens=2, do_sample=True, seed=seed)


def test_extreme_seeds_in_range_work(model):
    for seed in (2**64 - 1, -2**63):
        a = model.generate(input_ids=_ids(3), max_new_tokens=3, do_sample=True, seed=seed)
        b = model.generate(input_ids=_ids(3), max_new_tokens=3, do_sample=True, seed=seed)
        assert torch.equal(a, b)


@pytest.mark.parametrize("pad", [VOCAB, -1, 10**9, 2.0])
def test_pad_token_id_out_of_the_vocabulary(model, pad):
    with pytest.raises(ValueError, match=r"pad_token_id must be a token id in \[0, 101\)"):
        model.generate(input_ids=_ids(5), max_new_tokens=2, pad_token_id=pad, eos_token_id=3)


# adapter files ------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    fastprompt.get_peft_model(tiny_model("llama"),
                              fastprompt.PromptTuningConfig(num_virtual_tokens=4)).save_pretrained(tmp_path)
    return tmp_path


def _load(folder):
    return fastprompt.from_pretrained(tiny_model("llama"), folder)


def test_non_utf8_config_names_the_file(saved):
    (saved / io.CONFIG_NAME).write_bytes(b'{"peft_type": "PROMPT_TUNING\xff\xfe"}')
    with pytest.raises(ValueError, match=r"adapter_config.json' is not UTF-8 text"):
        _load(saved)


@pytest.mark.parametrize("garbage", [b"\x80\x04garbage", b"not a pickle at all", b"", b"\x80\x02]q\x00."])
def test_garbage_bin_names_the_file(saved, garbage):
    (saved / io.WEIGHTS_NAME).unlink()
    (saved / io.LEGACY_WEIGHTS_NAME).write_bytes(garbage)
    with pytest.raises(ValueError, match=r"adapter_model.bin' (is corrupt or unreadable|does not hold a dict)"):
        _load(saved)


@pytest.mark.parametrize("field, value, message", [
    ("peft_type", ["PROMPT_TUNING"], r"peft_type must be a string, got \['PROMPT_TUNING'\]"),
    ("peft_type", {"a": 1}, r"peft_type must be a string, got \{'a': 1\}"),
    ("token_dim", "64", r"token_dim must be an integer, got '64'"),
    ("num_virtual_tokens", 4.0, r"num_virtual_tokens must be an integer, got 4.0"),
    ("num_virtual_tokens", True, r"num_virtual_tokens must be an integer, got True"),
    ("inference_mode", "yes", r"inference_mode must be true or false, got 'yes'"),
])
def test_config_fields_of_the_wrong_type(saved, field, value, message):
    config = json.loads((saved / io.CONFIG_NAME).read_text())
    config[field] = value
    (saved / io.CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="adapter_config.json': " + message):
        _load(saved)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_prompt_refused(saved, value):
    tensors = io.read_tensors(saved / io.WEIGHTS_NAME)
    flat = tensors["prompt_embeddings"].view(-1)
    flat[int(torch.randint(0, flat.numel(), ()))] = value
    save_file(tensors, saved / io.WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors': tensor 'prompt_embeddings' holds NaN or inf"):
        _load(saved)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_prompt_refused(saved, dtype):
    tensors = io.read_tensors(saved / io.WEIGHTS_NAME)
    save_file({"prompt_embeddings": tensors["prompt_embeddings"].to(dtype)}, saved / io.WEIGHTS_NAME)
    with pytest.raises(ValueError, match=rf"tensor 'prompt_embeddings' must be floating point, got {dtype}"):
        _load(saved)
