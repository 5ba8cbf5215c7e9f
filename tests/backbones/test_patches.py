"""The frozen-op patches of a backbone (backbones/patches.py) on the PyTorch path: each patched module
computes what the HF module computes, gives the input its gradient and the frozen weights none, and undoing
the patches restores the modules."""

import pytest
import torch

from fastprompt.backbones import get_backbone, patches
from tests.helpers import RTOL, assert_close
from tests.tiny_models import tiny_model


def _forward_backward(module, x):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype))
    return y.detach(), x.grad


def _input_width(module, backbone) -> int:
    """The hidden size, or the MLP's inner width for an activation module (GPT-2's, which has no weights)."""
    if any(True for _ in module.parameters()):
        return backbone.hidden_size
    return backbone.config.n_inner or 4 * backbone.hidden_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_patched_modules_equal_hf_modules(family, dtype):
    model = tiny_model(family).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    backbone = get_backbone(model)
    modules = [module for module, _ in backbone.frozen_op_replacements()]
    assert modules
    inputs, expected = {}, {}
    for module in modules:
        inputs[module] = torch.randn(3, 7, _input_width(module, backbone),
                                     generator=torch.Generator().manual_seed(2)).to(dtype)
        expected[module] = _forward_backward(module, inputs[module])
    with patches.patch_frozen_ops(backbone, backend="torch") as handle:
        assert len(handle) == len(modules)
        for module in modules:
            got_y, got_dx = _forward_backward(module, inputs[module])
            want_y, want_dx = expected[module]
            name = type(module).__name__
            if dtype == torch.float32 and "RMSNorm" in name:
                # F.rms_norm is LlamaRMSNorm's arithmetic operation by operation
                assert torch.equal(got_y, want_y), name
            assert_close(f"{name} out", got_y, want_y, RTOL[dtype])
            assert_close(f"{name} d input", got_dx, want_dx, RTOL[dtype])
    assert not any(p.grad is not None for p in model.parameters()), "a frozen weight got a gradient"
    assert all("forward" not in m.__dict__ for m in modules), "undo left a patched forward"
