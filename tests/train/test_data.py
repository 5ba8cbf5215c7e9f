"""Data: JSON-lines and CSV records, tokenisation with target-only loss, padding, task routing, and errors
that name the file and line."""

import pytest
import torch

from fastprompt.train import collate, load_data, micro_batch_indices
from fastprompt.train.data import DataOrder, epoch_order
from tests.train.common import tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer(tmp_path_factory.mktemp("tok"))


def test_text_to_text_labels_cover_the_target_only(tmp_path, tok):
    data = load_data(write_jsonl(tmp_path / "d.jsonl", [{"input": "the movie", "target": "good film"}]), tok)
    (example,) = data.examples
    ids = tok("the movie good film", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert example.input_ids == ids
    assert example.labels == [-100, -100] + ids[2:]
    assert example.task is None and data.tasks == []


def test_csv_classification_with_verbalizers(tmp_path, tok):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"the film, was good",pos\nthe film was awful,neg\n')
    data = load_data(path, tok, verbalizers={"pos": "great", "neg": "bad"})
    assert [e.label for e in data.examples] == ["pos", "neg"]
    assert data.examples[0].labels[-1] == tok.convert_tokens_to_ids("great")
    assert data.choices[None] == [("pos", [tok.convert_tokens_to_ids("great")]),
                                  ("neg", [tok.convert_tokens_to_ids("bad")])]
    assert data.has_classification


def test_one_verbalizer_dict_serves_tasks_with_different_labels(tmp_path, tok):
    films = write_jsonl(tmp_path / "films.jsonl", [{"text": "the film was good", "label": "pos"},
                                                   {"text": "the film was awful", "label": "neg"}])
    news = write_jsonl(tmp_path / "news.jsonl", [{"text": "the match", "label": "sport"}])
    verbalizers = {"pos": "great", "neg": "bad", "sport": "good"}
    data = load_data([films, news], tok, verbalizers=verbalizers)
    assert [label for label, _ in data.choices["films"]] == ["pos", "neg"]
    assert [label for label, _ in data.choices["news"]] == ["sport"]
    alone = load_data(films, tok, verbalizers=verbalizers)   # one task: every verbalized label competes
    assert [label for label, _ in alone.choices[None]] == ["pos", "neg", "sport"]


def test_collate_pads_right(tmp_path, tok):
    data = load_data(write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "target": "good"},
                                                        {"input": "a movie was", "target": "bad film"}]), tok)
    batch = collate(data.examples, pad_token_id=0)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert batch["labels"][0, 3:].tolist() == [-100] * 3 and batch["input_ids"][0, 3:].tolist() == [0] * 3


def test_the_longest_example_is_read_once(tmp_path, tok):
    class CountingScans(list):
        scans = 0

        def __iter__(self):
            CountingScans.scans += 1
            return super().__iter__()

    data = load_data(write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "target": "good"},
                                                        {"input": "a movie was", "target": "bad film"}]), tok)
    data.examples = CountingScans(data.examples)
    assert (data.longest, data.longest) == (6, 6)   # "a movie was" + "bad film": 6 tokens (as collate pads)
    assert CountingScans.scans == 1


def test_several_files_name_tasks(tmp_path, tok):
    a = write_jsonl(tmp_path / "up.jsonl", [{"input": "a", "target": "good"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"input": "a", "target": "bad"}])
    c = write_jsonl(tmp_path / "c.jsonl", [{"input": "a", "target": "bad", "task": "own"}])
    data = load_data([a, f"down={b}", c], tok)
    assert [e.task for e in data.examples] == ["up", "down", "own"]
    assert data.tasks == ["down", "own", "up"]


def test_data_order_is_a_function_of_seed_and_step():
    first = [micro_batch_indices(10, 4, seed=3, index=i) for i in range(6)]
    assert first == [micro_batch_indices(10, 4, seed=3, index=i) for i in range(6)]
    assert sorted(sum(first[:3], [])) == list(range(10))        # one epoch: every example once
    assert first[:3] != first[3:6]                             # the next epoch reshuffles
    assert first != [micro_batch_indices(10, 4, seed=4, index=i) for i in range(6)]


def test_a_stratified_order_puts_each_stratum_in_every_batch_at_its_share():
    strata = ["a"] * 23 + ["b"] * 61 + ["c"] * 13 + [("task", None)] * 4   # odd, unequal strata; any hashable
    n, batch = len(strata), 8
    order = epoch_order(n, seed=5, epoch=1, strata=strata)
    assert sorted(order) == list(range(n))                                 # every example once
    assert order == epoch_order(n, seed=5, epoch=1, strata=strata)          # a function of (seed, epoch, strata)
    assert order not in (epoch_order(n, seed=5, epoch=2, strata=strata), epoch_order(n, seed=6, epoch=1, strata=strata))
    for stratum in set(strata):
        share = strata.count(stratum) / n
        for start in range(n - batch + 1):                                  # every window, so every batch
            held = sum(strata[i] == stratum for i in order[start:start + batch])
            assert abs(held - batch * share) < 2, (stratum, start, held)
    plain = epoch_order(n, seed=5, epoch=1)                                 # a plain shuffle strays further
    strays = [abs(sum(strata[i] == "b" for i in plain[s:s + batch]) - batch * 61 / n) for s in range(n - batch + 1)]
    assert max(strays) >= 2
    per_epoch = -(-n // batch)
    assert micro_batch_indices(n, batch, seed=5, index=per_epoch + 2, strata=strata) == order[16:24]   # epoch 1's 3rd


@pytest.mark.parametrize("strata", [None, ["a", "b", "b"] * 7 + ["a"]], ids=["shuffled", "stratified"])
def test_a_run_s_data_order_reads_the_same_batches_as_one_call_each(strata):
    data_order = DataOrder(22, seed=4, strata=strata)   # computes each epoch's order once, as the trainer steps
    steps = [data_order.indices(5, index) for index in range(17)]   # three epochs of 5 batches, and two more
    assert steps == [micro_batch_indices(22, 5, seed=4, index=index, strata=strata) for index in range(17)]
    assert data_order.indices(5, 2) == steps[2]                       # back to an earlier epoch (a resume)


def test_strata_must_name_every_example():
    with pytest.raises(ValueError, match=r"one stratum per example \(10\), got 9"):
        epoch_order(10, seed=0, epoch=0, strata=["a"] * 9)


MALFORMED = [
    pytest.param("d.jsonl", '{"input": "a", "target": "good"}\n\n{"input": "a", "target": \n', 3, "not valid JSON",
                 id="bad-json"),
    pytest.param("d.jsonl", '{"input": "a", "target": "good"}\n["a", "b"]\n', 2, "JSON object", id="not-object"),
    pytest.param("d.jsonl", '{"input": "a", "target": "good"}\n{"input": "a"}\n', 2, "missing field 'target'",
                 id="missing-target"),
    pytest.param("d.jsonl", '{"input": "a", "target": 3}\n', 1, "must be a string", id="target-not-string"),
    pytest.param("d.jsonl", '{"prompt": "a", "completion": "b"}\n', 1, "'input' and 'target'", id="unknown-kind"),
    pytest.param("d.jsonl", '{"text": "a movie", "label": "pos"}\n{"text": "a movie", "label": "meh"}\n', 2,
                 "no verbalizer", id="unknown-label"),
    pytest.param("d.jsonl", '{"input": "a", "target": "good", "task": "x"}\n{"input": "a", "target": "good"}\n',
                 2, "no 'task'", id="task-missing"),
    pytest.param("d.jsonl", '{"input": "a", "target": "  "}\n', 1, "no tokens", id="empty-target"),
    pytest.param("d.csv", "input,target\na,good\nb,bad,extra\n", 3, "more fields", id="csv-extra-field"),
    pytest.param("d.csv", 'input,target\n"a\nmovie",good\nb\n', 4, "missing value", id="csv-missing-field"),
]


@pytest.mark.parametrize("name, text, line, message", MALFORMED)
def test_malformed_record_names_file_and_line(tmp_path, tok, name, text, line, message):
    path = tmp_path / name
    path.write_text(text)
    verbalizers = {"pos": "good"} if "label" in text else None
    with pytest.raises(ValueError, match=message) as info:
        load_data(path, tok, verbalizers=verbalizers)
    assert str(info.value).startswith(f"{path}:{line}: "), str(info.value)


def test_missing_file_is_named(tmp_path, tok):
    with pytest.raises(ValueError, match="nope.jsonl"):
        load_data(tmp_path / "nope.jsonl", tok)


def test_truncation_keeps_the_target(tmp_path, tok):
    data = load_data(write_jsonl(tmp_path / "d.jsonl", [{"input": "a b c d e f", "target": "good"}]), tok,
                     max_length=4)
    assert len(data.examples[0].input_ids) == 4 and data.examples[0].labels[-2:] == data.examples[0].input_ids[-2:]
    assert torch.tensor(data.examples[0].labels[:2]).eq(-100).all()
