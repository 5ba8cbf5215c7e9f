"""Methods are registered source classes: the runtime asks a source what it does (`kind`, `routes_by_task`,
`num_entries`), never which method it is, so a new soft-prompt method is one class and its registration."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fastprompt
from fastprompt.methods import PromptTuning, source_class
from fastprompt.methods.base import CONFIGS, SOURCES, register
from tests.tiny_models import tiny_model


def test_every_config_type_has_its_source_and_capabilities():
    assert set(SOURCES) == set(CONFIGS)
    assert {t: (SOURCES[t].kind, SOURCES[t].routes_by_task, SOURCES[t].prompts_the_decoder) for t in SOURCES} == {
        "PROMPT_TUNING": ("tokens", False, False), "P_TUNING": ("tokens", False, False),
        "PREFIX_TUNING": ("kv", False, False), "MULTITASK_PROMPT_TUNING": ("tokens", True, True)}
    for peft_type, source in SOURCES.items():  # each config class lives in its source's module
        assert CONFIGS[peft_type].__module__ == source.__module__, peft_type
    with pytest.raises(ValueError, match="unsupported peft_type 'LORA'; fastprompt has"):
        source_class("LORA")
    with pytest.raises(ValueError, match="'PROMPT_TUNING' already has a source: PromptTuning"):
        register("PROMPT_TUNING", fastprompt.PromptTuningConfig)(PromptTuning)


@dataclass
class DoubledPromptConfig(fastprompt.PromptTuningConfig):
    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "DOUBLED_PROMPT_TUNING"


@pytest.fixture
def doubled_prompt():
    """A made-up method, written as a user would add one: its config and its source class, registered in one
    line."""
    @register("DOUBLED_PROMPT_TUNING", DoubledPromptConfig)
    class DoubledPrompt(PromptTuning):
        def prompts(self, entries, backend=None):
            return 2 * super().prompts(entries, backend)
    yield DoubledPrompt
    del SOURCES["DOUBLED_PROMPT_TUNING"], CONFIGS["DOUBLED_PROMPT_TUNING"]


@pytest.mark.parametrize("path", ["concat", "shared_prefix"])
def test_a_registered_method_runs_every_path_and_loads_back(doubled_prompt, path, tmp_path):
    base = tiny_model("llama")
    model = fastprompt.get_peft_model(base, DoubledPromptConfig(num_virtual_tokens=4), path=path)
    assert isinstance(model.prompt_sources["default"], doubled_prompt)
    plain = fastprompt.get_peft_model(base, fastprompt.PromptTuningConfig(num_virtual_tokens=4), path=path)
    with torch.no_grad():
        plain.prompt_sources["default"].embedding.weight.copy_(2 * model.prompt_sources["default"].embedding.weight)
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    model.save_pretrained(tmp_path)
    loaded = fastprompt.from_pretrained(base, tmp_path, path=path)
    assert isinstance(loaded.peft_config["default"], DoubledPromptConfig)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_the_readme_example_registers_its_method():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("A new soft-prompt method is one file"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "README method example", "exec"), namespace)
    try:
        base = tiny_model("llama")
        model = fastprompt.get_peft_model(base, namespace["DoubledPromptConfig"](num_virtual_tokens=3))
        assert type(model.prompt_sources["default"]) is namespace["DoubledPrompt"]
        assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.isfinite().all()
    finally:
        del SOURCES["DOUBLED_PROMPT_TUNING"], CONFIGS["DOUBLED_PROMPT_TUNING"]
