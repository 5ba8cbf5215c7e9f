"""Benchmark: what the frozen-backbone backward keeps, in a prompt-tuning training step, vs PEFT.

Providers, same random-weight model, batch and prompt: "peft" (PEFT prompt tuning, SDPA attention, HF's
loss on full logits), "fastprompt-hf-ops" (fastprompt's shared-prefix path and fused LM-head loss, but HF's
own norm/activation modules: fused_ops=False), "fastprompt" (the default: every part on) and
"fastprompt+ckpt" (plus per-layer activation checkpointing). Each row: step milliseconds (median, p20, p80
of whole forward+backward steps), peak device memory above the model (CUDA), and the activation bytes
autograd saved for the backward (any device: the CPU's measure of memory; a checkpointed layer counts its
kept input). Ratios are to PEFT. A provider whose first loss or prompt gradient disagrees with the reference
is refused: in fp32 the reference is PEFT's step (relative error 1e-4); in bf16 it is PEFT's step on the same
weights upcast to fp32, and each provider may be off by PEFT's own bf16 error x1.25 + 1e-3 (at least 2e-2),
as in `bench/training.py`: two bf16 runs of a 16-layer model drift apart by themselves. Writes
bench/results/frozen_backward-<device>.json.

    python bench/bench_frozen_backward.py            # Llama-3.2-1B shape, vocab 128256, seq 1024, bf16 (GPU)
    python bench/bench_frozen_backward.py --cpu      # a small Llama on the CPU, fp32 (committed CPU result)
    python bench/bench_frozen_backward.py --quick    # tiny smoke run on the CPU
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (  # noqa: E402
    WrongOutput, add_ratios, check_or_refuse, peak_memory_mb, print_table, relative_error, time_steps_ms,
    write_results)
from bench.training import tolerance  # noqa: E402
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


def fp32_reference(base, virtual: int, prompt: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, prompt gradient) of PEFT's step on a copy of `base` upcast to fp32 (the same rounded weights),
    without autocast: what half-precision providers are held to."""
    model, param = wrap("peft", copy.deepcopy(base).float(), virtual, prompt)
    loss = model(**batch).loss
    loss.backward()
    reference = loss.detach().float(), param.grad.float()
    del model, param
    gc.collect()
    if prompt.device.type == "cuda":
        torch.cuda.empty_cache()
    return reference


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
    dtype = DTYPES[shape["dtype"]]
    autocast = torch.autocast(device.type, dtype, enabled=dtype != torch.float32)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    reference = None if dtype == torch.float32 else fp32_reference(base, P, prompt, batch)
    bars = {}  # half precision: PEFT's own errors against the fp32 reference, by quantity

    rows = []
    for provider in PROVIDERS:
        model, param = wrap(provider, base, P, prompt)
        row = {"op": "prompt_tuning_step", "provider": provider, "shape": f"B{B}-T{T}-P{P}-V{V}",
               "dtype": shape["dtype"]}

        def step(model=model, param=param):
            param.grad = None
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            return loss.detach()

        try:
            loss = step()
            if reference is None:                      # fp32: PEFT (the first provider) is the reference
                reference = (loss.float(), param.grad.float().clone())
            else:
                if provider == "peft":
                    bars = {"loss": relative_error(loss[None], reference[0][None]),
                            "grad": relative_error(param.grad, reference[1])}
                check_or_refuse(f"{provider} loss", loss[None], reference[0][None], tolerance(dtype, bars.get("loss")))
                check_or_refuse(f"{provider} prompt gradient", param.grad, reference[1],
                                tolerance(dtype, bars.get("grad")))
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
