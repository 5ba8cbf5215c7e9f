"""Backward audit: a prompt-tuning step on a frozen backbone computes no weight gradient, and what it keeps
for the backward is reported (fastprompt.audit.saved_bytes gives the lead before/after numbers)."""

from __future__ import annotations

import pytest
import torch

import fastprompt
from fastprompt.audit import saved_bytes
from tests.tiny_models import batch, tiny_model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prompt_tuning_step_computes_no_weight_grad(family):
    base = tiny_model(family)
    model = fastprompt.get_peft_model(base, fastprompt.PromptTuningConfig(num_virtual_tokens=5))
    ids, mask, labels = batch(batch_size=3, length=9)
    frozen = [(n, p) for n, p in base.named_parameters()]
    assert frozen and not any(p.requires_grad for _, p in frozen)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable

    report = saved_bytes(lambda: model(ids, attention_mask=mask, labels=labels).loss.backward(),
                         exclude=model.parameters())
    print(f"\n[{family}] prompt-tuning step: {report}\n  largest saved activations: {report.largest}")

    with_grad = [n for n, p in frozen if p.grad is not None]
    assert not with_grad, f"frozen parameters got a gradient: {with_grad}"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert report.n_tensors > 0 and report.activation_bytes > 0


def test_saved_bytes_counts_unique_storages():
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 16)
    report = saved_bytes(lambda: (x @ w).sum().backward(), exclude=[w])
    # matmul saves w (for d x); w is excluded, so only x's storage (if saved) counts as activation
    assert report.excluded_bytes == w.numel() * 4
    assert report.bytes == report.activation_bytes + report.excluded_bytes
    assert report.result is None
