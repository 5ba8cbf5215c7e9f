"""`fastprompt demo --tiny`: the runtime end to end on a tiny built-in model, offline, in seconds on a CPU.

Two soft prompts are tuned on a frozen, randomly initialised Llama-shaped model to make it continue
any input with one of two fixed token patterns; one mixed batch then serves both adapters at once.
"""

from __future__ import annotations

import tempfile

import torch

import fastprompt

PATTERNS = {"count_up": [10, 11, 12, 13, 14, 15], "count_down": [40, 39, 38, 37, 36, 35]}


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=None,
                         initializer_range=0.3)
    return LlamaForCausalLM(config).eval()


def _task_batch(pattern: list[int], batch: int, generator: torch.Generator):
    prompt = torch.randint(41, 64, (batch, 4), generator=generator)
    target = torch.tensor(pattern).expand(batch, -1)
    ids = torch.cat([prompt, target], dim=1)
    labels = torch.cat([torch.full_like(prompt, -100), target], dim=1)
    return ids, labels


def _accuracy(model, adapter: str, pattern: list[int], generator: torch.Generator) -> float:
    ids, _ = _task_batch(pattern, 16, generator)
    out = model.generate(ids[:, :4], adapter_names=[adapter] * 16, max_new_tokens=len(pattern))
    return (out[:, 4:] == torch.tensor(pattern)).float().mean().item()


def run(steps: int = 100, seed: int = 0, out=None) -> dict:
    """Tune one prompt per pattern; returns accuracies before and after and the reload check. out: a folder
    to keep the two adapters in (``out/count_up``, ``out/count_down``); default a temporary one."""
    base = tiny_llama(seed)
    model = fastprompt.get_peft_model(base, fastprompt.PromptTuningConfig(num_virtual_tokens=8), "count_up")
    model.add_adapter("count_down", fastprompt.PromptTuningConfig(num_virtual_tokens=8))
    model.print_trainable_parameters()
    generator = torch.Generator().manual_seed(seed)
    before = {name: _accuracy(model, name, p, generator) for name, p in PATTERNS.items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.3)
    for step in range(steps):
        # Every step trains both adapters in one mixed batch: rows pick their adapter by name.
        parts = [(_task_batch(p, 8, generator), name) for name, p in PATTERNS.items()]
        ids = torch.cat([b[0] for b, _ in parts])
        labels = torch.cat([b[1] for b, _ in parts])
        names = [name for _, name in parts for _ in range(8)]
        loss = model(input_ids=ids, labels=labels, adapter_names=names).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    after = {name: _accuracy(model, name, p, generator) for name, p in PATTERNS.items()}
    prompt = torch.tensor([[50, 51, 52, 53]] * 2)
    mixed = model.generate(prompt, adapter_names=["count_up", "count_down"], max_new_tokens=6)
    with tempfile.TemporaryDirectory() as scratch:
        folder = out or scratch
        model.save_pretrained(folder)
        reloaded = fastprompt.from_pretrained(tiny_llama(seed), f"{folder}/count_up", adapter_name="count_up")
        reloaded.load_adapter(f"{folder}/count_down", adapter_name="count_down")
        same = torch.equal(reloaded.generate(prompt, adapter_names=["count_up", "count_down"], max_new_tokens=6),
                           mixed)
    return {"before": before, "after": after, "mixed_batch": mixed[:, 4:].tolist(), "reload_identical": same}


def main(steps: int = 100, out=None) -> int:
    """Run the tiny demo (adapters kept in `out` when given) and print what it shows; 0 when the reloaded
    adapters reproduce the output."""
    result = run(steps=steps, out=out)
    for name in PATTERNS:
        print(f"{name:>10}: token accuracy {result['before'][name]:.0%} before tuning -> "
              f"{result['after'][name]:.0%} after")
    print(f"one mixed batch, rows [count_up, count_down]: {result['mixed_batch']}")
    print(f"saved in PEFT's format and reloaded: {'identical output' if result['reload_identical'] else 'MISMATCH'}")
    if out:
        print(f"adapters saved in {out} (PEFT's format)")
    return 0 if result["reload_identical"] else 1
