"""A training checkpoint comes from strangers as often as an adapter does: loading one runs no code, and a
corrupt, truncated or non-finite file is refused with a ValueError naming it, before anything is restored."""

import pickle
import re
from pathlib import Path

import pytest
import torch

import fastprompt
from fastprompt import io
from fastprompt.train.optim import make_optimizer
from tests.tiny_models import batch, tiny_model


class _Payload:
    """Unpickling this runs code: it writes `marker`. A checkpoint file holding it must be refused unrun."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _trained(tmp_path, optimizer_name="adamw"):
    model = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=3))
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer_name, lr=1e-2)
    ids, mask, labels = batch()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    optimizer.step()
    folder = tmp_path / "checkpoint"
    fastprompt.save_training_checkpoint(folder, model, optimizer, step=1)
    return model, optimizer, folder


def _fresh():
    model = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=3))
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", lr=1e-2)
    return model, optimizer


def _snapshot(model, optimizer):
    return ([p.detach().clone() for p in model.prompt_sources.parameters()], repr(optimizer.state_dict()),
            torch.get_rng_state().clone())


def _assert_unchanged(before, model, optimizer):
    params, optimizer_state, rng = before
    assert all(torch.equal(a, b) for a, b in zip(params, model.prompt_sources.parameters()))
    assert repr(optimizer.state_dict()) == optimizer_state
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("name", [io.OPTIMIZER_NAME, io.RNG_NAME])
def test_a_pickle_payload_in_a_checkpoint_never_runs(name, tmp_path):
    _, _, folder = _trained(tmp_path)
    marker = tmp_path / "payload-ran"
    # The payload alone, and the payload hidden inside an otherwise valid state.
    for state in (_Payload(marker), {"cpu": torch.get_rng_state(), "state": {}, "x": _Payload(marker)}):
        with open(folder / name, "wb") as file:
            pickle.dump(state, file, protocol=2)  # torch.save's protocol
        model, optimizer = _fresh()
        before = _snapshot(model, optimizer)
        with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*refused"):
            fastprompt.load_training_checkpoint(folder, model, optimizer)
        assert not marker.exists(), "loading the checkpoint ran the pickled payload"
        _assert_unchanged(before, model, optimizer)


def test_rng_state_is_read_even_without_an_optimizer_and_refused_unrun(tmp_path):
    _, _, folder = _trained(tmp_path)
    marker = tmp_path / "payload-ran"
    torch.save({"cpu": torch.get_rng_state(), "evil": _Payload(marker)}, folder / io.RNG_NAME)
    model, optimizer = _fresh()
    with pytest.raises(ValueError, match="rng_state"):
        fastprompt.load_training_checkpoint(folder, model)
    assert not marker.exists()


@pytest.mark.parametrize("optimizer_name", ["adamw", "adafactor"])
def test_fastprompt_own_optimizer_and_rng_states_load_with_weights_only(optimizer_name, tmp_path):
    model, optimizer, folder = _trained(tmp_path, optimizer_name)
    fresh = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=3))
    fresh_optimizer = make_optimizer([p for p in fresh.parameters() if p.requires_grad], optimizer_name, lr=1e-2)
    assert fastprompt.load_training_checkpoint(folder, fresh, fresh_optimizer)["step"] == 1
    assert repr(fresh_optimizer.state_dict()) == repr(optimizer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.prompt_sources.parameters(),
                                                 fresh.prompt_sources.parameters()))


@pytest.mark.parametrize("name", [io.OPTIMIZER_NAME, io.RNG_NAME, io.TRAINING_META_NAME, io.TRAINING_STATE_NAME])
def test_a_truncated_checkpoint_file_is_named_as_corrupt(name, tmp_path):
    _, _, folder = _trained(tmp_path)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    model, optimizer = _fresh()
    before = _snapshot(model, optimizer)
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*corrupt"):
        fastprompt.load_training_checkpoint(folder, model, optimizer)
    _assert_unchanged(before, model, optimizer)


@pytest.mark.parametrize("where", ["prompt", "optimizer"])
def test_a_training_state_with_nan_is_refused(where, tmp_path):
    model, optimizer, folder = _trained(tmp_path)
    if where == "prompt":
        with torch.no_grad():
            next(model.prompt_sources.parameters())[0, 1] = float("nan")
    else:
        next(iter(optimizer.state.values()))["exp_avg"][0, 0] = float("inf")
    fastprompt.save_training_checkpoint(folder, model, optimizer, step=2)
    fresh, fresh_optimizer = _fresh()
    before = _snapshot(fresh, fresh_optimizer)
    name = io.TRAINING_STATE_NAME if where == "prompt" else io.OPTIMIZER_NAME
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*NaN or inf"):
        fastprompt.load_training_checkpoint(folder, fresh, fresh_optimizer)
    _assert_unchanged(before, fresh, fresh_optimizer)


def test_no_torch_load_in_the_package_may_unpickle_code():
    """Every torch.load in fastprompt passes weights_only=True (read from the source, so a new one is held
    to it too)."""
    root = Path(fastprompt.__file__).parent
    calls = [(path, line) for path in root.rglob("*.py") for line in path.read_text().splitlines()
             if re.search(r"\btorch\.load\(", line)]
    assert calls, "the package reads torch files somewhere (io.py); this scan found none"
    for path, line in calls:
        assert "weights_only=True" in line, f"{path}: {line.strip()}"
    assert [str(p) for p in root.rglob("*.py") if re.search(r"^\s*(import|from) pickle", p.read_text(), re.M)] == []
