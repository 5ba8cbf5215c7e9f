"""SPoT: similarities against hand computations, ranking and top-k initialisation, CSV/PNG/ranking files."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.methods.spot import rank_sources, similarity_matrix, task_embedding, transfer_prompt
from fastprompt.train.spot import compare, load_prompts, spot_target_model, write_report
from tests.helpers import assert_close
from tests.tiny_models import tiny_model


def _prompts(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) + 0.3 for shape in shapes]


def _average_cosine(a, b):
    return F.cosine_similarity(a.mean(0), b.mean(0), dim=0).item()


def _per_token_cosine(a, b):
    pairs = [F.cosine_similarity(x, y, dim=0).item() for x in a for y in b]
    return sum(pairs) / len(pairs)


@pytest.mark.parametrize("metric, reference", [("average", _average_cosine), ("per-token", _per_token_cosine)])
def test_similarity_matrix_matches_hand_computation(metric, reference):
    rows = _prompts(0, [(5, 9), (7, 9)])                  # prompts of different lengths
    cols = _prompts(1, [(3, 9), (5, 9), (6, 9)])
    matrix = similarity_matrix(rows, cols, metric)
    expected = torch.tensor([[reference(a, b) for b in cols] for a in rows])
    assert matrix.shape == (2, 3)
    assert_close(f"{metric} similarity", matrix, expected, 1e-5)
    assert float(similarity_matrix([rows[0]], [rows[0] * 2.5], metric)[0, 0]) == pytest.approx(
        1.0 if metric == "average" else _per_token_cosine(rows[0], rows[0]), rel=1e-5)


def test_unknown_metric_and_mismatched_embedding_sizes_raise_value_errors():
    with pytest.raises(ValueError, match="metric must be one of"):
        task_embedding(torch.randn(3, 4), "max")
    with pytest.raises(ValueError, match="share the embedding size"):
        similarity_matrix([torch.randn(3, 4)], [torch.randn(3, 5)])


def test_ranking_and_top_k_initialisation():
    sources = dict(zip(["a", "b", "c"], _prompts(2, [(4, 6)] * 3)))
    ranking = rank_sources({"a": 0.1, "b": 0.9, "c": 0.4})
    assert ranking == [("b", 0.9), ("c", 0.4), ("a", 0.1)]
    order = [name for name, _ in ranking]
    assert torch.equal(transfer_prompt(sources, order, top_k=1), sources["b"])
    assert_close("top-2 mean", transfer_prompt(sources, order, top_k=2), (sources["b"] + sources["c"]) / 2, 1e-6)
    with pytest.raises(ValueError, match="top_k must be"):
        transfer_prompt(sources, order, top_k=4)


def test_report_files_and_self_exclusion(tmp_path):
    prompts = dict(zip(["news", "sst", "qa"], _prompts(3, [(4, 8), (4, 8), (6, 8)])))
    report = compare(prompts, prompts, "per-token")
    written = write_report(report, tmp_path)
    with open(written["csv"], newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["target", "news", "sst", "qa"] and [r[0] for r in rows[1:]] == ["news", "sst", "qa"]
    assert_close("csv", torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]]), report.matrix, 1e-6)
    ranking = json.loads(written["ranking"].read_text())
    assert ranking["metric"] == "per-token" and [s for s, _ in ranking["rankings"]["sst"]] == [
        s for s, _ in report.ranking("sst")]
    assert "sst" not in [s for s, _ in report.ranking("sst")] and len(report.ranking("sst")) == 2
    assert written["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))   # atomic writes leave no temporary files


def test_target_model_starts_from_the_transferred_prompt(tmp_path):
    base = tiny_model("llama")
    runs = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=4), "a")
    runs.add_adapter("b", fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    runs.save_pretrained(tmp_path / "sources")
    (tmp_path / "sources" / "fastprompt_data.json").write_text(json.dumps({"tasks": ["a", "b"]}))
    sources = load_prompts(tmp_path / "sources")
    assert sorted(sources) == ["a", "b"]
    assert torch.equal(sources["b"], runs.prompt_sources["b"].embedding.weight.detach())
    start = transfer_prompt(sources, ["b", "a"], top_k=2)
    model = spot_target_model(base, start, tasks=["t"])
    assert model.adapter_names == ["t"]
    assert_close("start", model.prompt_sources["t"].embedding.weight, start, 1e-7)
    assert model.prompt_sources["t"].embedding.weight.requires_grad
