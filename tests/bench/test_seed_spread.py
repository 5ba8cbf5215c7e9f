"""bench/seed_spread.py: a recipe's spread over seeds split into its held-out rows' noise and the seeds' own."""

import json

import pytest
import torch

from bench import seed_spread


def test_seeds_answering_alike_have_no_spread():
    right = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0]]).repeat(5, 1)
    assert seed_spread.split_spread(right, shuffles=50) == {"observed": 0.0, "noise": 0.0, "own": 0.0, "p": 1.0}


def test_seeds_of_equal_worth_spread_as_the_rows_noise_predicts():
    generator = torch.Generator().manual_seed(7)   # not split_spread's own shuffling seed, 0
    difficulty = torch.rand(400, generator=generator)   # each row's chance of a right answer, shared by the seeds
    right = (torch.rand(5, 400, generator=generator) < difficulty).float()
    split = seed_spread.split_spread(right, shuffles=500)
    # a seed's accuracy varies by sqrt(mean(d (1 - d)) / rows) = sqrt((1/6) / 400) ~ 0.020; 5 seeds' range ~ 2.326x
    assert split["noise"] == pytest.approx(2.326 * (1 / 6 / 400) ** 0.5, rel=0.1)
    assert split["p"] > 0.05
    assert split["own"] < split["noise"]


def test_seeds_that_differ_are_told_from_the_noise():
    generator = torch.Generator().manual_seed(7)   # not split_spread's own shuffling seed, 0
    worth = torch.tensor([0.55, 0.6, 0.65, 0.7, 0.75])   # the seeds' own range: 0.2
    right = (torch.rand(5, 2000, generator=generator) < worth[:, None]).float()
    split = seed_spread.split_spread(right, shuffles=500)
    assert split["p"] == 0.0
    assert split["own"] == pytest.approx(2.326 * worth.std().item(), abs=0.05)   # the seeds' std is 0.079
    assert split["noise"] < 0.05


def test_answers_are_read_by_recipe_in_seed_order_and_must_cover_the_same_rows(tmp_path):
    path = tmp_path / "runs.jsonl"
    runs = [{"task": "debates", "recipe": "new", "seed": 1, "accuracy": 0.5, "right": "10"},
            {"method": "prompt-tuning", "task": "debates", "recipe": "new", "seed": 0, "accuracy": 1.0, "right": "11"},
            {"task": "debates", "recipe": "old", "seed": 0, "accuracy": 0.5}]   # recorded before "right": left out
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    (key, right), = seed_spread.answers([path]).items()
    assert key == ("prompt-tuning", "debates", "new")
    assert right.tolist() == [[1.0, 1.0], [1.0, 0.0]]
    assert seed_spread.table([path]).splitlines()[2].startswith("| prompt-tuning | debates | new | 2 | 2 | 0.500 |")
    path.write_text(path.read_text() + json.dumps({**runs[0], "seed": 2, "right": "101"}) + "\n")
    with pytest.raises(ValueError, match=r"same held-out rows, got row counts \[2, 3\]"):
        seed_spread.answers([path])


def test_a_recipes_seeds_are_gathered_from_every_results_file_given(tmp_path, capsys):
    earlier, later = tmp_path / "earlier.jsonl", tmp_path / "later.jsonl"
    run = {"method": "prompt-tuning", "task": "speeches", "recipe": "new", "accuracy": 0.5}
    earlier.write_text(json.dumps({**run, "seed": 1, "right": "01"}) + "\n")
    later.write_text(json.dumps({**run, "seed": 0, "right": "11"}) + "\n")
    right = seed_spread.answers([earlier, later])[("prompt-tuning", "speeches", "new")]
    assert right.tolist() == [[1.0, 1.0], [0.0, 1.0]]   # seed 0 (from the later file) first
    assert seed_spread.main([str(earlier), str(later)]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("| prompt-tuning | speeches | new | 2 | 2 | 0.500 |")


def test_the_split_needs_two_to_ten_seeds():
    with pytest.raises(ValueError, match="2..10 seeds"):
        seed_spread.split_spread(torch.ones(1, 5))


def test_recipes_whose_seeds_all_answer_alike_differ_by_nothing():
    right = (torch.rand(1, 300, generator=torch.Generator().manual_seed(3)) < 0.7).float().repeat(5, 1)
    assert seed_spread.compare(right, right, draws=200) == {"difference": 0.0, "low": 0.0, "high": 0.0, "above": 0.0}


def test_a_better_recipe_is_told_apart_and_the_interval_holds_the_difference():
    generator = torch.Generator().manual_seed(7)
    difficulty = torch.rand(2000, generator=generator)   # shared by both recipes: the rows are paired
    first = (torch.rand(5, 2000, generator=generator) < difficulty * 0.8).float()
    second = (torch.rand(3, 2000, generator=generator) < difficulty * 0.8 + 0.1).float()   # fewer seeds is fine
    c = seed_spread.compare(first, second, draws=500)
    assert c["difference"] == pytest.approx(0.1, abs=0.02)
    assert 0 < c["low"] < c["difference"] < c["high"] and c["above"] == 1.0


def test_recipes_of_equal_worth_are_not_told_apart():
    generator = torch.Generator().manual_seed(7)
    difficulty = torch.rand(200, generator=generator)
    first, second = ((torch.rand(5, 200, generator=generator) < difficulty).float() for _ in range(2))
    c = seed_spread.compare(first, second, draws=500)
    assert c["low"] < 0 < c["high"] and 0.05 < c["above"] < 0.95


def test_compared_recipes_must_answer_the_same_rows():
    with pytest.raises(ValueError, match=r"same >= 2 rows, got \(2, 5\) and \(2, 6\)"):
        seed_spread.compare(torch.ones(2, 5), torch.ones(2, 6))


def test_the_comparison_table_covers_the_tasks_both_recipes_ran_on(tmp_path, capsys):
    path = tmp_path / "runs.jsonl"
    runs = [{"task": task, "recipe": recipe, "seed": seed, "accuracy": 0.0, "right": right}
            for task, recipe, right in [("debates", "new", "1100"), ("debates", "old", "1000"),
                                        ("news", "new", "1111")]
            for seed in (0, 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    assert seed_spread.main([str(path), "--compare", "prompt-tuning:old", "prompt-tuning:new"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[2].startswith("| debates | 4 | 0.250 (2) | 0.500 (2) | +0.250 |")
    with pytest.raises(ValueError, match="no task has per-row answers of both prompt-tuning:old and mpt:new"):
        seed_spread.comparison_table([path], ("prompt-tuning", "old"), ("mpt", "new"))
    with pytest.raises(SystemExit):
        seed_spread.main([str(path), "--compare", "old", "prompt-tuning:new"])
    assert "expected METHOD:RECIPE (e.g. prompt-tuning:new), got 'old'" in capsys.readouterr().err
