"""Shared fixtures for the serving tests: a tiny Llama, its tokenizer, and adapters of every method saved in
PEFT's layout (all with 5 virtual tokens, so they share one bank)."""

from __future__ import annotations

import pytest
import torch

import fastprompt
from tests.tiny_models import save_tiny_tokenizer, tiny_model

P = 5
CONFIGS = {
    "a": lambda: fastprompt.PromptTuningConfig(num_virtual_tokens=P),
    "b": lambda: fastprompt.PromptTuningConfig(num_virtual_tokens=P),
    "pre": lambda: fastprompt.PrefixTuningConfig(num_virtual_tokens=P),
    "mpt": lambda: fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=P, num_tasks=2, num_ranks=2),
    "pt": lambda: fastprompt.PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=16),
}


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """(base model, tokenizer, {name: adapter folder}, {name: PromptModel holding that adapter alone})."""
    root = tmp_path_factory.mktemp("serve")
    tokenizer = save_tiny_tokenizer(root / "tokenizer")
    base = tiny_model("llama")
    folders, references = {}, {}
    for i, (name, make) in enumerate(CONFIGS.items()):
        model = fastprompt.get_peft_model(base, make(), adapter_name="default")
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for param in model.prompt_sources.parameters():
                param.normal_(0, 1.0)
        model.save_pretrained(root / name)
        folders[name] = root / name
        references[name] = fastprompt.from_pretrained(base, root / name, adapter_name=name)
    return base, tokenizer, folders, references


def random_prompt(generator: torch.Generator, low: int = 1, high: int = 12) -> list[int]:
    length = int(torch.randint(low, high, (1,), generator=generator))
    return torch.randint(3, 101, (length,), generator=generator).tolist()


def reference_tokens(references, name: str, prompt: list[int], max_tokens: int, task: int = 0,
                     eos: bool = False, **sampling) -> list[int]:
    """What PromptModel.generate gives for this prompt alone (greedy unless sampling says otherwise)."""
    model = references[name]
    mpt = model.peft_config[name].peft_type == "MULTITASK_PROMPT_TUNING"
    out = model.generate(input_ids=torch.tensor([prompt]), adapter_names=[name], max_new_tokens=max_tokens,
                         task_ids=torch.tensor([task]) if mpt else None, eos_token_id=None if eos else [],
                         **sampling)
    return out[0, len(prompt):].tolist()
