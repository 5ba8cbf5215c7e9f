"""Benchmark: what the frozen-backbone backward keeps, in a prompt-tuning training step, vs PEFT.

Providers, same random-weight model, batch and prompt: "peft" (PEFT prompt tuning, SDPA attention, HF's
loss on full logits), "fastprompt-hf-ops" (fastprompt's shared-prefix path and fused LM-head loss, but HF's
own norm/activation modules: fused_ops=False), "fastprompt" (the default: every part on) and
"fastprompt+ckpt" (plus per-layer activation checkpointing). Each row: step milliseconds (median, p20, p80
of whole forward+backward steps), peak device memory above the model (CUDA), and the activation bytes
autograd saved for the backward (any device: the CPU's measure of memory; a checkpointed layer counts its
kept input). Ratios are to PEFT. A provider whose first loss or prompt gradient disagrees with PEFT's is
refused. Writes bench/results/frozen_backward-<device>.json.

    python bench/bench_frozen_backward.py            # Llama-3.2-1B shape, vocab 128256, seq 1024, bf16 (GPU)
    python bench/bench_frozen_backward.py --cpu      # a small Llama on the CPU, fp32 (committed CPU result)
    python bench/bench_frozen_backward.py --quick    # tiny smoke run on the CPU
"""

from __future__ import annotations

import argparse
import gc
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (  # noqa: E402
    WrongOutput, add_ratios, check_or_refuse, peak_memory_mb, print_table, time_steps_ms, write_results)
from fastprompt.audit import saved_bytes  # noqa: E402

SHAPES = {  # LlamaConfig fields, batch, sequence length, virtual tokens, dtype
    "gpu": dict(config=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                            num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
                batch=4, seq=1024, virtual=100, dtype="bfloat16"),
    "cpu": dict(config=dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True),
                batch=4, seq=256, virtual=20, dtype="float32"),
    "quick": dict(config=dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
                  batch=2, seq=32, virtual=5, dtype="float32"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROVIDERS = {"peft": None, "fastprompt-hf-ops": dict(fused_ops=False), "fastprompt": {},
             "fastprompt+ckpt": dict(gradient_checkpointing=True)}


def build_model(shape: dict, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape["config"], attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device, DTYPES[shape["dtype"]]).eval()


def wrap(provider: str, base, virtual: int, prompt: torch.Tensor):
    """(model, prompt parameter) for a provider, the prompt set to `prompt` ([P, d] fp32)."""
    if PROVIDERS[provider] is None:
        import peft

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                     num_virtual_tokens=virtual))
        param = model.prompt_encoder["default"].embedding.weight
    else:
        import fastprompt

        model = fastprompt.get_peft_model(base, fastprompt.PromptTuningConfig(num_virtual_tokens=virtual),
                                          **PROVIDERS[provider])
        param = model.prompt_sources["default"].embedding.weight
    with torch.no_grad():
        param.copy_(prompt)
    return model, param


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--cpu", action="store_true", help="a small Llama on the CPU, fp32")
    size.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (smoke test)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    name = "quick" if args.quick else "cpu" if args.cpu else "gpu"
    device = torch.device("cuda" if name == "gpu" else "cpu")
    if name == "gpu" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --cpu or --quick")
    shape = SHAPES[name]
    base = build_model(shape, device)
    V, B, T, P = shape["config"]["vocab_size"], shape["batch"], shape["seq"], shape["virtual"]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=gen).to(device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    labels = ids.clone()
    prompt = torch.randn(P, shape["config"]["hidden_size"], generator=gen).to(device) * 0.5
    autocast = torch.autocast(device.type, DTYPES[shape["dtype"]], enabled=shape["dtype"] != "float32")
    rtol = 1e-4 if shape["dtype"] == "float32" else 2e-2

    rows, reference = [], None
    for provider in PROVIDERS:
        model, param = wrap(provider, base, P, prompt)
        row = {"op": "prompt_tuning_step", "provider": provider, "shape": f"B{B}-T{T}-P{P}-V{V}",
               "dtype": shape["dtype"]}

        def step():
            param.grad = None
            with autocast:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            return loss.detach()

        try:
            loss = step()
            if reference is None:
                reference = (loss, param.grad.clone())
            else:
                check_or_refuse(f"{provider} loss", loss[None], reference[0][None], rtol)
                check_or_refuse(f"{provider} prompt gradient", param.grad, reference[1], rtol)
            row.update(time_steps_ms(step, device, warmup=args.warmup, reps=args.reps))
            row["peak_mb"] = peak_memory_mb(step, device)
            report = saved_bytes(step, exclude=list(model.parameters()))
            row["saved_mb"] = report.activation_bytes / 2**20
        except WrongOutput as err:
            print(f"REFUSED {err}")
            row["refused"] = str(err)
        except torch.OutOfMemoryError as err:
            row["error"] = f"out of memory: {err}"
        rows.append(row)
        if hasattr(model, "unpatch"):
            model.unpatch()
        del model, param
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_ratios(rows, group_by=("op", "shape", "dtype"), baseline="peft", metrics=("ms", "peak_mb", "saved_mb"))
    print_table(rows, ["provider", "shape", "dtype", "ms", "ms_vs_peft", "peak_mb", "peak_mb_vs_peft", "saved_mb",
                       "saved_mb_vs_peft"])
    print(f"wrote {write_results('frozen_backward' + ('-quick' if args.quick else ''), rows, device)}")


if __name__ == "__main__":
    main()
