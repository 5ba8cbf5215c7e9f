"""A PromptModel training step on CUDA: the Triton paths against the same model with the kernels off and
against PEFT (loss and every prompt gradient), on tiny Llama and GPT-2 in fp32 and bf16.

Each model is built on its own copy of the backbone (fastprompt patches the backbone's norm modules, which
would otherwise leak its kernels into PEFT's forward). "torch" runs fastprompt with backend="torch", which
the patched norms and activations follow too.

Tolerances. fp32: those of tests/test_peft_equivalence.py (loss 1e-5, gradients 1e-4), for Triton vs PEFT
and Triton vs torch. bf16: two bf16 runs of a whole backbone differ from each other by the rounding of each
(no fixed bar fits every model), so every bf16 run is compared with one fp32 reference (PEFT on the same
weights and prompt, upcast) and fastprompt may be at most as wrong as PEFT is in bf16: 1.25 x PEFT's own
relative error + 1e-3, and never held tighter than the ARCHITECTURE.md tolerance 2e-2. That is the rule
bench/training.py refuses a provider by.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fastprompt
from tests.helpers import DEVICE, RTOL, assert_close
from tests.peft_pairs import METHODS
from tests.tiny_models import batch, tiny_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.gpu

B, T = 5, 61
MPT_TASKS = torch.tensor([2, 0, 1, 2, 0])
CASES = [  # (method, path)
    ("prompt_tuning", "shared_prefix"), ("prompt_tuning", "concat"), ("prefix", "shared_prefix"),
    ("p_tuning_mlp", "shared_prefix"), ("mpt", "shared_prefix"), ("mpt", "concat"),
]


def _prompt_state(family: str, method: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random prompt parameters (PEFT's names, shaped for `family`: prefix tuning's depend on its layers
    and heads), the same for every model of a case; fp32 values that `dtype` holds exactly, so models
    keeping their prompt in fp32 or in `dtype` start from one prompt."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = peft.get_peft_model(tiny_model(family), METHODS[method]()).prompt_encoder["default"]
    torch.manual_seed(11)
    return {name: (torch.randn_like(t) * 0.5).to(dtype).float() for name, t in encoder.state_dict().items()}


def _peft(family, method, state, dtype):
    """PEFT on its own backbone in `dtype`, its prompt parameters set from `state`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_model(family).to(dtype), METHODS[method]())
    encoder = model.prompt_encoder["default"]
    encoder.load_state_dict(state)
    return model.to(DEVICE), encoder


def _ours(family, method, state, dtype, backend):
    model = fastprompt.get_peft_model(tiny_model(family).to(dtype), METHODS[method](), backend=backend)
    source = model.prompt_sources["default"]
    source.load_state_dict(state)
    return model.to(DEVICE), source


def _step(model, params_owner, path=None):
    """Loss (fp32 scalar) and the prompt gradients (fp32, by PEFT's parameter names) of one training step."""
    ids, mask, labels = (t.to(DEVICE) for t in batch(B, T, padding="left", seed=3))
    task_ids = MPT_TASKS.to(DEVICE) if model.peft_config["default"].peft_type == "MULTITASK_PROMPT_TUNING" \
        else None
    kwargs = {} if path is None else {"path": path}
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.detach().float() for n, p in params_owner.named_parameters() if p.grad is not None}
    assert grads, "no prompt parameter got a gradient"
    return loss.detach().float(), grads


def _fastprompt_step(family, method, path, state, dtype, backend):
    return _step(*_ours(family, method, state, dtype, backend), path)


def _rel(actual, expected) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("method, path", CASES, ids=[f"{m}-{p}" for m, p in CASES])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_step_fp32(family, method, path):
    state = _prompt_state(family, method, torch.float32)
    peft_loss, peft_grads = _step(*_peft(family, method, state, torch.float32))
    runs = {backend: _fastprompt_step(family, method, path, state, torch.float32, backend)
            for backend in ("triton", "torch")}
    for backend, (loss, grads) in runs.items():
        assert sorted(grads) == sorted(peft_grads), backend
        assert_close(f"{backend} loss vs PEFT", loss, peft_loss, 1e-5)
        for name, grad in peft_grads.items():
            assert_close(f"{backend} grad {name} vs PEFT", grads[name], grad, 1e-4)
    triton_loss, triton_grads = runs["triton"]
    assert_close("triton loss vs torch", triton_loss, runs["torch"][0], 1e-5)
    for name, grad in runs["torch"][1].items():
        assert_close(f"triton grad {name} vs torch", triton_grads[name], grad, 1e-4)


@pytest.mark.parametrize("method, path", CASES, ids=[f"{m}-{p}" for m, p in CASES])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_step_bf16(family, method, path):
    dtype = torch.bfloat16
    state = _prompt_state(family, method, dtype)
    # The fp32 reference computes on the bf16 model's weights, upcast (the rounding is not an error).
    reference, encoder = _peft(family, method, state, dtype)
    ref_loss, ref_grads = _step(reference.float(), encoder)
    peft_loss, peft_grads = _step(*_peft(family, method, state, dtype))
    loss_tol = max(RTOL[dtype], 1.25 * _rel(peft_loss, ref_loss) + 1e-3)
    grad_tol = max(RTOL[dtype], 1.25 * max(_rel(peft_grads[n], g) for n, g in ref_grads.items()) + 1e-3)
    for backend in ("triton", "torch"):
        loss, grads = _fastprompt_step(family, method, path, state, dtype, backend)
        assert sorted(grads) == sorted(ref_grads), backend
        assert_close(f"{backend} bf16 loss vs fp32", loss, ref_loss, loss_tol)
        for name, grad in ref_grads.items():
            assert_close(f"{backend} bf16 grad {name} vs fp32", grads[name], grad, grad_tol)
