"""Shared pieces of the trainer tests: a tiny tokenizer, small data files, fresh tiny prompt models."""

from __future__ import annotations

import json
import random

import fastprompt
from fastprompt.train import load_data
from tests.tiny_models import WORDS, save_tiny_tokenizer, tiny_model

CONTENT = [w for w in WORDS if w not in ("positive", "negative")]


def tokenizer(folder):
    return save_tiny_tokenizer(folder)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def seq2seq_records(n: int, seed: int = 0, tasks=None) -> list[dict]:
    """Inputs of 2-5 words, targets of 1-4 words (varied, so token weighting matters)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        record = {"input": " ".join(rng.choices(CONTENT, k=rng.randint(2, 5))),
                  "target": " ".join(rng.choices(CONTENT, k=rng.randint(1, 4)))}
        if tasks:
            record["task"] = tasks[i % len(tasks)]
        records.append(record)
    return records


def classification_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = ["good", "great"] if label == "positive" else ["bad", "awful"]
        records.append({"text": f"the movie was {rng.choice(words)}", "label": label})
    return records


def dataset(tmp_path, records, name="data.jsonl", **kwargs):
    tok = tokenizer(tmp_path / "tok")
    return load_data(write_jsonl(tmp_path / name, records), tok, **kwargs)


def prompt_model(config=None, names=("default",), family="llama"):
    config = config or fastprompt.PromptTuningConfig(num_virtual_tokens=3)
    model = fastprompt.get_peft_model(tiny_model(family), config, names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    return model


def assert_reads_as_text(base, model, start, text: list[int]) -> None:
    """`start(model, text)` makes the untuned `model` read as `text`: its logits on random input equal the plain
    backbone's on text + input (the input's positions). The adapter's table is NaN first, so every row that
    `start` leaves unwritten fails."""
    import torch

    from tests.helpers import assert_close
    from tests.tiny_models import VOCAB

    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = base(input_ids=torch.cat([torch.tensor([text]).expand(3, -1), ids], 1)).logits[:, len(text):]
    model.prompt_sources[model.active_adapter].embedding.weight.data.fill_(float("nan"))
    start(model, text)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert_close("logits", got, want, 1e-4)
