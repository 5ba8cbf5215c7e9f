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
    (key, right), = seed_spread.answers(path).items()
    assert key == ("prompt-tuning", "debates", "new")
    assert right.tolist() == [[1.0, 1.0], [1.0, 0.0]]
    assert seed_spread.table(path).splitlines()[2].startswith("| prompt-tuning | debates | new | 2 | 2 | 0.500 |")
    path.write_text(path.read_text() + json.dumps({**runs[0], "seed": 2, "right": "101"}) + "\n")
    with pytest.raises(ValueError, match=r"same held-out rows, got row counts \[2, 3\]"):
        seed_spread.answers(path)


def test_the_split_needs_two_to_ten_seeds():
    with pytest.raises(ValueError, match="2..10 seeds"):
        seed_spread.split_spread(torch.ones(1, 5))
