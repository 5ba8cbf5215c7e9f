"""bench/recipes.py: every recipe of every method has what a run needs; the summary table of a results file."""

import dataclasses
import json
from types import SimpleNamespace

import pytest

from bench import recipes
from fastprompt.train.recipe import default_recipe

TASK = SimpleNamespace(name="sentiment", verbalizers={"fresh": "positive", "rotten": "negative"})
RUN_KEYS = {"init", "num_virtual_tokens", "lr", "schedule", "warmup", "steps"}


@pytest.mark.parametrize("method", recipes.METHODS)
def test_every_recipe_of_every_method_names_a_whole_run(method):
    for recipe in recipes.METHOD_RECIPES[method]:
        options = recipes.recipe_options(recipe, TASK, method)
        assert RUN_KEYS <= set(options), (method, recipe)
        if options["init"] == "text":
            assert options["init_text"], (method, recipe)


def test_the_ensemble_is_the_default_three_times():
    new = recipes.recipe_options("new", TASK)
    assert recipes.recipe_options("new-ensemble", TASK) == {**new, "ensemble": recipes.ENSEMBLE_MEMBERS}


def test_mpt_is_measured_with_its_default():
    words = list(TASK.verbalizers.values())
    assert recipes.recipe_options("new", TASK, "mpt") == dataclasses.asdict(default_recipe("mpt", words))


def test_a_recipe_of_another_method_is_refused():
    with pytest.raises(ValueError, match="recipe 'new-ensemble' does not apply to mpt"):
        recipes.recipe_options("new-ensemble", TASK, "mpt")


def test_summary_groups_runs_by_method_task_and_recipe(tmp_path):
    rows = [{"task": "news", "recipe": "new", "seed": 0, "accuracy": 0.8},        # no method: prompt tuning
            {"method": "prompt-tuning", "task": "news", "recipe": "new", "seed": 1, "accuracy": 0.9},
            {"method": "mpt", "task": "news", "recipe": "new", "seed": 0, "accuracy": 0.7}]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = recipes.summary(path).splitlines()
    assert table[2:] == ["| prompt-tuning | news | new | 2 | 0.850 | 0.800 | 0.900 | 0.100 |",
                         "| mpt | news | new | 1 | 0.700 | 0.700 | 0.700 | 0.000 |"]
    assert recipes.done_runs(path) == {("prompt-tuning", "news", "new", 0), ("prompt-tuning", "news", "new", 1),
                                       ("mpt", "news", "new", 0)}


def test_start_takes_only_prompt_tuning_recipes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipes.main(["--start", "--recipes", "new-text"])
    assert exit_info.value.code == 2
    assert "recipe(s) new-text do not apply to prompt-tuning" in capsys.readouterr().err
