"""FLOP counts against torch's own counter and a hand count; peaks and MFU."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import flops
from bench.models import build_model, model_shape


def _rotary_flops(model, T):
    """What torch's counter counts for the model's rotary embedding alone over positions 0..T-1."""
    positions = torch.arange(T)[None]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.model.rotary_emb(torch.zeros(1, T, 1), positions)
    return counter.get_total_flops()


def test_forward_flops_equal_torch_flop_counter_on_both_families():
    """Eager attention multiplies the full T x T score matrix (the causal mask is applied after), so
    the pairs to compare with are B·T·T; embeddings, norms and activations are no matmuls for either.
    Llama's rotary embedding, which the model count leaves out, spends what the installed transformers
    makes it spend: one tiny matmul (inverse frequencies x positions: 2·(D/2)·T) in 5.17, a broadcast
    product (no matmul) in 5.25; measured on the rotary module alone, it must be one of the two."""
    for name in ("tiny-llama", "tiny-gpt2"):
        model = build_model(name, torch.float32, torch.device("cpu"))
        model.set_attn_implementation("eager")
        B, T = 3, 7
        ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(input_ids=ids)
        shape = model_shape(model)
        rotary = 0
        if shape["family"] == "llama":
            rotary = _rotary_flops(model, T)
            assert rotary in (0, 2 * (shape["head_dim"] // 2) * T), rotary
        expected = flops.forward_flops(shape, tokens=B * T, attended_pairs=B * T * T, logit_tokens=B * T)
        assert counter.get_total_flops() == expected + rotary, name


def test_train_step_flops_by_hand():
    shape = dict(layers=1, hidden=4, heads=2, kv_heads=1, head_dim=2, intermediate=8, gated_mlp=True, vocab=10)
    # Layer weights: q 4·4 + k, v 2·4·2 + o 4·4 + MLP 3·4·8 = 144.
    # Rows (batch 1, 2 tokens, prefix 1): matmuls 2·144·2 + LM head 2·4·10·2 = 736;
    #   pairs 2·1 + (1 + 2) = 5, attention 4·(2·2)·5 = 80.
    # Prompt pass (1 entry of 1 token): matmuls 2·144·1 = 288 (no LM head); 1 pair: attention 16.
    # Forward + input gradients: 2 x matmuls + 3 x attention = 2·1024 + 3·96.
    assert flops.layer_matmul_params(shape) == 144
    assert flops.train_step_flops(shape, batch=1, seq_len=2, num_virtual=1, prompt_entries=1) == 2336
    # Prefix tuning and LoRA run no prompt pass.
    assert flops.train_step_flops(shape, batch=1, seq_len=2, num_virtual=1, prompt_entries=0) == 2 * 736 + 3 * 80


def test_peaks_by_device_name_and_mfu():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4e12
    assert flops.peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756.5e12
    assert flops.peak_flops("NVIDIA H200 NVL", torch.float32) == 60.0e12
    assert flops.peak_flops("NVIDIA A100-SXM4-80GB", torch.float16) == 312.0e12
    assert flops.peak_flops("cpu-x86_64", torch.float32) is None
    assert flops.mfu(3e12, 1500.0, 4e12) == 0.5
    assert flops.mfu(3e12, 1500.0, None) is None


def test_measured_peak_is_two_n_cubed_over_the_timed_matmul(monkeypatch):
    """The measured peak times a random n x n matmul in the given dtype and counts 2·n³ FLOPs."""
    seen = []

    def fake_time_ms(fn, device, **kwargs):
        product = fn()
        seen.append((product.shape, product.dtype, product.device, bool((product != 0).all())))
        return {"ms": 4.0, "ms_p20": 4.0, "ms_p80": 4.0}

    monkeypatch.setattr(flops, "time_ms", fake_time_ms)
    cpu = torch.device("cpu")
    assert flops.measured_peak_flops(cpu, torch.float64, n=37) == 2 * 37**3 / 4e-3
    assert seen == [(torch.Size([37, 37]), torch.float64, cpu, True)]
    flops.measured_peak_flops(cpu, torch.float32)
    assert seen[-1][0] == torch.Size([flops.PEAK_MATMUL_N["cpu"]] * 2)


def test_measured_peak_on_this_cpu_is_a_plausible_rate():
    """Timed for real at a small size: above 0.1 GFLOP/s (any CPU of this century), below 100 TFLOP/s."""
    peak = flops.measured_peak_flops(torch.device("cpu"), torch.float32, n=129)
    assert 1e8 < peak < 1e14
    with pytest.raises(ValueError, match="n must be >= 1"):
        flops.measured_peak_flops(torch.device("cpu"), torch.float32, n=0)
