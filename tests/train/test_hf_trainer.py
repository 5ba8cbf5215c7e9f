"""A PromptModel inside `transformers.Trainer`: only the prompt trains; save_pretrained writes PEFT's files."""

import json

import torch
from transformers import Trainer, TrainingArguments

from tests.tiny_models import batch
from tests.train.common import prompt_model

class _Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.ids, self.mask, self.labels = batch(4, 9)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        i %= 4
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _train(model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=0.1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, logging_steps=1)
    before = {n: p.clone() for n, p in model.named_parameters()}
    Trainer(model=model, args=args, train_dataset=_Rows()).train()
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    assert changed == ["prompt_sources.default.embedding.weight"]
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_transformers_trainer_trains_only_the_prompt(tmp_path):
    _train(prompt_model(), tmp_path)
