"""MPT's distillation losses against hand computations: KL with temperature, hidden-state squared error."""

import math

import pytest
import torch

from fastprompt.train.losses import distillation_kl, hidden_mse
from tests.helpers import assert_close


def _softmax(row, temperature):
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.7])
def test_kl_matches_the_definition(temperature):
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(7, 11, generator=g) * 3, torch.randn(7, 11, generator=g) * 3
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p_t, p_s = _softmax(t_row, temperature), _softmax(s_row, temperature)
        expected += sum(t * (math.log(t) - math.log(s)) for t, s in zip(p_t, p_s))
    expected *= temperature ** 2
    assert float(distillation_kl(student, teacher, temperature)) == pytest.approx(expected, rel=1e-5)


def test_kl_gradient_is_tau_times_the_probability_gap():
    # d/dz_s [τ² KL(p_t ‖ p_s)] = τ (softmax(z_s / τ) − softmax(z_t / τ)), row by row.
    g = torch.Generator().manual_seed(4)
    student = (torch.randn(5, 9, generator=g) * 2).requires_grad_()
    teacher = torch.randn(5, 9, generator=g) * 2
    tau = 1.7
    distillation_kl(student, teacher, tau).backward()
    expected = tau * (torch.softmax(student.detach() / tau, -1) - torch.softmax(teacher / tau, -1))
    assert_close("d kl / d student", student.grad, expected, 1e-5)


def test_kl_is_zero_for_identical_logits_and_half_precision_is_upcast():
    logits = torch.randn(3, 13)
    assert float(distillation_kl(logits, logits.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)
    full = distillation_kl(logits, logits.flip(0), 1.5)
    half = distillation_kl(logits.bfloat16(), logits.flip(0).bfloat16(), 1.5)
    assert half.dtype == torch.float32 and float(half) == pytest.approx(float(full), rel=2e-2)


def test_hidden_squared_error_matches_a_loop_over_real_tokens():
    g = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(3, 6, 5, generator=g), torch.randn(3, 6, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    expected = sum((student[b, t, k] - teacher[b, t, k]).item() ** 2
                   for b in range(3) for t in range(6) if mask[b, t] for k in range(5))
    assert float(hidden_mse(student, teacher, mask)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda: distillation_kl(torch.randn(2, 3), torch.randn(2, 3), 0.0), "temperature must be > 0"),
    (lambda: distillation_kl(torch.randn(2, 3), torch.randn(2, 4)), r"both be \[N, V\]"),
    (lambda: hidden_mse(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 4)), r"mask must be \[B, T\]"),
])
def test_zero_temperature_and_mismatched_shapes_raise_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
