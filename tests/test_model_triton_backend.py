"""The decoder integration through the Triton kernels, on the CPU: a PromptModel training step with
backend="triton" (every kernel in Triton's interpreter: prefix attention, the fused norms and activations,
the fused loss, MPT's prompts) against the same model with backend="torch".

Tiny Llama and GPT-2, left padding; prompt tuning on the shared-prefix path, prefix tuning, and MPT with
mixed task rows. Loss, logits and every prompt-parameter gradient are held to the ARCHITECTURE.md fp32 tolerance.
tests/gpu/test_model_native.py runs the same step natively on a GPU, against PEFT too; this file keeps the
integration tested where CI runs, without a GPU. Also: the decode cache starts finite.
"""

from __future__ import annotations

import pytest
import torch

import fastprompt.kernels.prefix_attention as prefix_attention_kernels
from fastprompt.backbones import KVCache
from fastprompt.ops import prefix_attention, reference
from tests.gpu.test_model_native import _ours, _prompt_state
from tests.helpers import DEVICE, RTOL, assert_close
from tests.tiny_models import batch

B, T = 3, 9
MPT_TASKS = [2, 0, 2]  # two tasks in one batch, one of them on two rows
CASES = [
    pytest.param("llama", "prompt_tuning", id="llama-prompt_tuning"),
    pytest.param("llama", "prefix", id="llama-prefix"),
    pytest.param("llama", "mpt", id="llama-mpt-mixed"),
    pytest.param("gpt2", "prompt_tuning", id="gpt2-prompt_tuning"),
    pytest.param("gpt2", "prefix", id="gpt2-prefix"),
]


def _step(family: str, method: str, state: dict[str, torch.Tensor], backend: str):
    """(loss, logits [B, T, V], {name: gradient}) of one fp32 training step on a left-padded batch."""
    model, source = _ours(family, method, state, torch.float32, backend)
    ids, mask, labels = (t.to(DEVICE) for t in batch(B, T, padding="left", seed=3))
    task_ids = torch.tensor(MPT_TASKS, device=DEVICE) if method == "mpt" else None
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids, path="shared_prefix",
                return_logits=True)
    out.loss.backward()
    grads = {name: p.grad for name, p in source.named_parameters()}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("family, method", CASES)
def test_triton_backend_matches_torch(family, method, monkeypatch):
    kernel_calls = []
    kernel = prefix_attention_kernels.prefix_attention_fwd

    def counted(*args, **kwargs):
        kernel_calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    # the custom op reads the launcher from its module at call time, so the spy sees every kernel call
    monkeypatch.setattr(prefix_attention_kernels, "prefix_attention_fwd", counted)
    state = _prompt_state(family, method, torch.float32)
    want_loss, want_logits, want_grads = _step(family, method, state, "torch")
    assert not kernel_calls, "backend='torch' must not reach the Triton kernel"
    loss, logits, grads = _step(family, method, state, "triton")
    assert kernel_calls, "backend='triton' never ran the prefix-attention kernel"

    rtol = RTOL[torch.float32]
    assert_close("loss", loss, want_loss, rtol)
    assert_close("logits", logits, want_logits, rtol)
    assert sorted(grads) == sorted(state), "every prompt parameter must be compared"
    for name, grad in grads.items():
        assert grad is not None and want_grads[name] is not None, f"{name} got no gradient"
        assert torch.count_nonzero(want_grads[name]) > 0, f"{name}: the reference gradient is all zero"
        assert_close(f"d {name}", grad, want_grads[name], rtol)


def test_allocated_cache_is_zero_and_a_decode_through_it_is_finite(monkeypatch):
    """A decode step in `write_at` mode reads the whole cache, unwritten columns too (masked): they must
    hold zeros, not stale memory, and the output must equal attention over the written columns alone."""
    Bc, Hq, Hkv, D, max_len, P, written = 3, 4, 2, 16, 13, 5, 6
    empty = torch.empty
    # Stale memory is NaN here (fla's NaN-filled allocations), so a cache left uninitialised fails every
    # time rather than when the allocator happens to hand back a NaN.
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan")))
    cache = KVCache.allocate(2, Bc, Hkv, max_len, D, torch.float32, DEVICE)
    monkeypatch.undo()
    for t in cache.keys + cache.values:
        assert torch.equal(t, torch.zeros_like(t)), "KVCache.allocate must start from zeros"

    gen = torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    cache.write(1, rand(Bc, Hkv, written - 1, D), rand(Bc, Hkv, written - 1, D))   # prefill
    cache.length = written - 1
    cache.write_at = torch.tensor(written - 1, device=DEVICE)
    keys, values = cache.write(1, rand(Bc, Hkv, 1, D), rand(Bc, Hkv, 1, D))           # one decode step
    assert keys.shape[2] == max_len
    mask = (torch.arange(max_len, device=DEVICE) < written)[None].repeat(Bc, 1)
    mask[1, :2] = False  # a left-padded row
    q, prefix_k, prefix_v = rand(Bc, Hq, 1, D), rand(2, Hkv, P, D), rand(2, Hkv, P, D)
    task_ids = torch.tensor([1, 0, 1], device=DEVICE)
    out = prefix_attention(q, keys, values, prefix_k, prefix_v, task_ids, key_padding_mask=mask, backend="triton")
    assert torch.isfinite(out).all()
    want = reference.prefix_attention(q, keys[:, :, :written], values[:, :, :written], prefix_k, prefix_v,
                                      task_ids, key_padding_mask=mask[:, :written])
    assert_close("decode through the cache", out, want, RTOL[torch.float32])
