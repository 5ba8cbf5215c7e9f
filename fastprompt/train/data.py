"""Training data: JSON-lines or CSV records, tokenised with the model's tokenizer, right-padded batches.

Two record kinds (one JSON object per line, or one CSV row with a header):
- text-to-text: ``{"input": "...", "target": "..."}``: the loss covers the target tokens only.
- classification: ``{"text": "...", "label": "positive"}``: the target is the label's verbalizer
  (``verbalizers={"positive": "great", ...}``; without one the label itself is the word). Evaluation
  scores every label's verbalizer by its log-likelihood after the text (accuracy is the metric).

An optional ``task`` field names the row's task for multi-task runs; so does the file when several are
given (``"task=path"``, or the file's stem). The trainer routes each row to the adapter named after its task,
or, for MPT, to its task id (the task's index in sorted order).

A malformed record raises ``ValueError`` starting with ``"<file>:<line>: "``.
"""

from __future__ import annotations

import csv
import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

TEXT_TO_TEXT = "text-to-text"
CLASSIFICATION = "classification"


@dataclass
class Example:
    """One tokenised record. ``labels`` are -100 on the input tokens."""

    input_ids: list[int]
    labels: list[int]
    task: str | None
    kind: str
    source: str                              # "file:line", for error messages
    prompt_len: int                          # tokens before the target
    label: str | None = None                 # classification: the label value (as a string)


@dataclass
class PromptDataset:
    """Tokenised examples plus what evaluation needs: each task's label choices and their token ids."""

    examples: list[Example]
    choices: dict = field(default_factory=dict)    # task -> [(label, token ids)], classification only

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    @property
    def tasks(self) -> list[str]:
        """Sorted names of the tasks present (empty for a single-task dataset)."""
        return sorted({e.task for e in self.examples if e.task is not None})

    @property
    def has_classification(self) -> bool:
        return any(e.kind == CLASSIFICATION for e in self.examples)

    @functools.cached_property
    def longest(self) -> int:
        """Tokens in the longest example (0 when empty), read once: the CUDA-graph buckets' bound at every training
        step, where a scan of every row is host time a graphed step waits on."""
        return max((len(e.input_ids) for e in self.examples), default=0)


def read_records(path) -> list[tuple[int, dict]]:
    """(line number, record) pairs of a JSON-lines file (``.jsonl``/``.json``/other) or a CSV/TSV file
    with a header row. Blank JSON lines are skipped. Raises ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    records = []
    suffix = path.suffix.lower()
    with path.open(newline="" if suffix in (".csv", ".tsv") else None, encoding="utf-8") as handle:
        if suffix in (".csv", ".tsv"):
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            if reader.fieldnames is None:
                raise ValueError(f"{path}:1: empty CSV file (a header row is required)")
            start = 2
            for row in reader:
                if None in row:
                    raise ValueError(f"{path}:{start}: more fields than the header has ({reader.fieldnames})")
                missing = [k for k, v in row.items() if v is None]
                if missing:
                    raise ValueError(f"{path}:{start}: missing value(s) for {missing}")
                records.append((start, {k: v for k, v in row.items() if v != ""}))
                start = reader.line_num + 1
        else:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON: {error.msg} (column {error.colno})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: a record must be a JSON object, got "
                                     f"{type(record).__name__}")
                records.append((number, record))
    return records


def _label_key(value) -> str:
    return str(value)


def split_task_path(item) -> tuple[str | None, Path]:
    """(task or None, path) of a `load_data` item: a path, ``"task=path"`` or a ``(task, path)`` pair."""
    if isinstance(item, tuple):
        return item[0], Path(item[1])
    text = str(item)
    if "=" in text and not Path(text).exists():
        task, _, path = text.partition("=")
        return task, Path(path)
    return None, Path(text)


def load_data(paths, tokenizer, *, verbalizers: dict | None = None, separator: str = " ",
              max_length: int | None = None, add_eos: bool = True) -> PromptDataset:
    """Read and tokenise one or several files into a PromptDataset.

    paths: a path, or a list of paths, ``"task=path"`` strings or ``(task, path)`` pairs. With several files
        and no task given, a file's records without a ``task`` field take the file's stem as task.
    tokenizer: a Hugging Face tokenizer (``AutoTokenizer.from_pretrained(model_dir)``).
    verbalizers: label -> verbalizer text for classification records (keys compared as strings). With one
        task every verbalized label is a candidate at evaluation; with several, a task's candidates are the
        verbalized labels its records use (one dict may serve tasks with different label sets). Without it
        each task's candidates are its labels seen.
    separator: put between the input (or text) and the target (or verbalizer).
    max_length: truncate each row's input from the left so input + target fit.
    add_eos: end text-to-text targets with the tokenizer's EOS token (never verbalizers).
    """
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    verbalizers = None if verbalizers is None else {_label_key(k): v for k, v in verbalizers.items()}
    several = len(items) > 1
    raw = []   # (source, record, file task)
    for item in items:
        task, path = split_task_path(item)
        if task is None and several:
            task = path.stem
        raw.extend((f"{path}:{number}", record, task) for number, record in read_records(path))
    examples, labels_seen = [], {}
    encode = _Encoder(tokenizer)
    for source, record, file_task in raw:
        example = _tokenise(source, record, file_task, encode, verbalizers, separator, max_length, add_eos)
        examples.append(example)
        if example.kind == CLASSIFICATION:
            labels_seen.setdefault(example.task, set()).add(example.label)
    named = [e for e in examples if e.task is not None]
    if named and len(named) != len(examples):
        first = next(e for e in examples if e.task is None)
        raise ValueError(f"{first.source}: record has no 'task' while others do (name every row's task, or "
                         f"give the file as task=path)")
    choices = {}
    for task, seen in labels_seen.items():
        if verbalizers is None:
            order = sorted(seen)
        else:
            order = [label for label in verbalizers if len(labels_seen) == 1 or label in seen]
        choices[task] = [(label, encode.target(separator + (verbalizers or {}).get(label, label))) for label in order]
    return PromptDataset(examples, choices)


class _Encoder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def prompt(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def target(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _text_field(source, record, name) -> str:
    if name not in record or record[name] is None:
        raise ValueError(f"{source}: missing field {name!r} (record has {sorted(record)})")
    value = record[name]
    if not isinstance(value, str):
        raise ValueError(f"{source}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _tokenise(source, record, file_task, encode, verbalizers, separator, max_length, add_eos) -> Example:
    task = record.get("task", file_task)
    if task is not None and (not isinstance(task, str) or not task):
        raise ValueError(f"{source}: field 'task' must be a non-empty string, got {task!r}")
    if "input" in record or "target" in record:
        kind, label = TEXT_TO_TEXT, None
        prompt_text = _text_field(source, record, "input")
        target_text = separator + _text_field(source, record, "target")
    elif "text" in record or "label" in record:
        kind = CLASSIFICATION
        prompt_text = _text_field(source, record, "text")
        if "label" not in record or record["label"] is None or isinstance(record["label"], (dict, list)):
            raise ValueError(f"{source}: classification record needs a scalar 'label' (record has "
                             f"{sorted(record)})")
        label = _label_key(record["label"])
        if verbalizers is not None and label not in verbalizers:
            raise ValueError(f"{source}: label {label!r} has no verbalizer (known labels: {sorted(verbalizers)})")
        target_text = separator + (verbalizers[label] if verbalizers is not None else label)
    else:
        raise ValueError(f"{source}: record must have 'input' and 'target' (text-to-text) or 'text' and "
                         f"'label' (classification); it has {sorted(record)}")
    prompt = encode.prompt(prompt_text)
    target = encode.target(target_text)
    if not target:
        raise ValueError(f"{source}: the target {target_text.strip()!r} tokenises to no tokens")
    if kind == TEXT_TO_TEXT and add_eos and encode.tokenizer.eos_token_id is not None:
        target = target + [encode.tokenizer.eos_token_id]
    if kind == CLASSIFICATION and not prompt:
        raise ValueError(f"{source}: 'text' tokenises to no tokens (classification scores the label after it)")
    if max_length is not None:
        if len(target) >= max_length:
            raise ValueError(f"{source}: target is {len(target)} tokens, max_length is {max_length}")
        prompt = prompt[max(0, len(prompt) - (max_length - len(target))):]
    return Example(prompt + target, [-100] * len(prompt) + target, task, kind, source, len(prompt), label)


def hold_out(data: PromptDataset, count: int, seed: int = 0) -> tuple[PromptDataset, PromptDataset]:
    """(the rest, `count` held-out examples) of `data`, drawn at random by `seed`; both keep `data.choices`.
    `fastprompt train` evaluates on such a split when no --eval-data is given."""
    if not 0 < count < len(data):
        raise ValueError(f"count must be in [1, {len(data) - 1}] for {len(data)} examples, got {count!r}")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    parts = ([e for i, e in enumerate(data.examples) if i not in held],
             [e for i, e in enumerate(data.examples) if i in held])
    return PromptDataset(parts[0], data.choices), PromptDataset(parts[1], data.choices)


def collate(examples: list[Example], pad_token_id: int = 0, *, rows: int | None = None,
            length: int | None = None) -> dict:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on input and padding) [B, T], and
    ``tasks`` (the rows' task names; the trainer turns them into adapter_names or task_ids), and ``rows``
    (how many of the B rows are examples: the rest are filler).

    B = len(examples) and T = the longest example, or at least `rows` and `length` where given (a CUDA-graph
    run pads every batch to a few fixed shapes, `bucket_length`). Filler rows repeat the first example with
    every label -100 (a row of real tokens: no fully masked attention row) and so add nothing to the loss."""
    T = max(max(len(e.input_ids) for e in examples), length or 0)
    B = max(len(examples), rows or 0)
    ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for row in range(B):
        e = examples[row] if row < len(examples) else examples[0]
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        if row < len(examples):
            labels[row, :n] = torch.tensor(e.labels)
    tasks = [e.task for e in examples] + [examples[0].task] * (B - len(examples))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "tasks": tasks, "rows": len(examples)}


def bucket_length(length: int, longest: int) -> int:
    """The padded length of a batch whose longest example has `length` tokens, in a run whose longest has
    `longest`: the next of 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x them: at most 50% padding,
    two shapes per doubling), never past `longest`."""
    bucket = 16
    while bucket < length:
        bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket * 4 // 3
    return min(bucket, max(longest, length))


def epoch_order(n: int, seed: int, epoch: int, strata: list | None = None) -> list[int]:
    """The order of the examples in one epoch: a deterministic function of (seed, epoch, strata) alone, so a run
    resumed at any step sees the same batches as an uninterrupted one.

    strata: each example's stratum (the trainer's: its (task, label)), or None for a plain shuffle. With strata
    the order is stratified (stratified mini-batch sampling, Zhao & Zhang 2014): each stratum's examples, shuffled,
    sit at evenly spaced points of the epoch from a random offset, so every run of consecutive examples, and so
    every batch, holds each stratum in its share of the data to within two examples, where a plain shuffle's
    batches draw their label mix at random."""
    rng = random.Random(seed * 1_000_003 + epoch)
    if strata is None:
        order = list(range(n))
        rng.shuffle(order)
        return order
    if len(strata) != n:
        raise ValueError(f"strata must give one stratum per example ({n}), got {len(strata)}")
    members: dict = {}
    for index, stratum in enumerate(strata):
        members.setdefault(stratum, []).append(index)
    placed = []
    for indices in members.values():
        rng.shuffle(indices)
        offset = rng.random()
        placed += [((rank + offset) / len(indices), index) for rank, index in enumerate(indices)]
    return [index for _, index in sorted(placed)]


class DataOrder:
    """Which examples each micro-batch of a run reads: epochs of ceil(n / batch_size) batches in `epoch_order`'s
    order (`strata` as it takes them, when shuffled; unshuffled: 0..n-1), the last batch of an epoch possibly
    smaller. Each epoch's order is computed once, not at every step: shuffling n rows costs the host 20 ms at
    n = 100,000, which a GPU step waits for."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, strata: list | None = None):
        if n == 0:
            raise ValueError("the training data has no records")
        self.n, self.seed, self.shuffle, self.strata = n, seed, shuffle, strata
        self._epoch, self._order = None, []

    def indices(self, batch_size: int, index: int) -> list[int]:
        """Example indices of the ``index``-th micro-batch of `batch_size` examples."""
        epoch, position = divmod(index, -(-self.n // batch_size))
        if epoch != self._epoch:
            self._order = epoch_order(self.n, self.seed, epoch, self.strata) if self.shuffle else list(range(self.n))
            self._epoch = epoch
        return self._order[position * batch_size:(position + 1) * batch_size]


def micro_batch_indices(n: int, batch_size: int, seed: int, index: int, shuffle: bool = True,
                        strata: list | None = None) -> list[int]:
    """Example indices of the ``index``-th micro-batch of a run: `DataOrder`'s, for one call."""
    return DataOrder(n, seed, shuffle, strata).indices(batch_size, index)
