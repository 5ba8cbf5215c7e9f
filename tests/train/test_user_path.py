"""`fastprompt train` as a newcomer meets it (issue 24): the default recipe, zero-shot and held-out accuracy,
named models, one-line errors with exit code 2, label words, defaults in --help, `demo --tiny --out`."""

import json

import pytest
import torch

import fastprompt
from fastprompt import cli
from fastprompt.cli import main
from fastprompt.train import cli as train_cli
from fastprompt.train.recipe import OLD_RECIPE, default_recipe, instruction, run_epochs
from tests.tiny_models import save_tiny_tokenizer, tiny_model
from tests.train.common import classification_records, seq2seq_records, write_jsonl


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


def _train(model, data, out, *extra):
    return main(["train", "--model", str(model), "--data", data, "--out", str(out), "--steps", "4",
                 "--batch-size", "4", "--progress", "none", "--no-plot", *extra])


def test_default_recipe_starts_classification_from_an_instruction_of_the_label_words():
    recipe = default_recipe("prompt-tuning", ["positive", "negative"])
    assert (recipe.init, recipe.init_text) == ("text", "Answer with one word: positive or negative.\n")
    assert recipe.num_virtual_tokens is None and (recipe.lr, recipe.schedule, recipe.warmup) == (1e-2, "cosine", 10)
    assert instruction(["a", "b", "c"]) == "Answer with one word: a, b or c.\n"
    prefix = default_recipe("prefix-tuning", ["positive", "negative"])    # from the instruction's keys/values
    assert (prefix.init, prefix.init_text, prefix.num_virtual_tokens) == ("text", recipe.init_text, None)
    p_tuning = default_recipe("p-tuning", ["positive"])    # the instruction and PEFT's task guide's recipe
    assert (p_tuning.init, p_tuning.num_virtual_tokens, p_tuning.encoder_hidden_size) == ("text", None, 128)
    assert (default_recipe("p-tuning").init, default_recipe("p-tuning").num_virtual_tokens) == ("random", 20)
    assert (p_tuning.lr, p_tuning.schedule, p_tuning.warmup, p_tuning.weight_decay) == (1e-3, "linear", 0, 0.01)
    assert recipe.weight_decay == 0.0 and recipe.encoder_hidden_size is None
    assert default_recipe("prompt-tuning", None).init == "random"
    assert default_recipe("prompt-tuning").num_virtual_tokens == 20


@pytest.mark.parametrize("epochs, schedule", [(None, (1e-2, "cosine", 10)), (2.9, (1e-2, "cosine", 10)),
                                              (1.0, (3e-2, "linear", 0)), (0.8, (3e-2, "linear", 0))])
def test_prompt_tuning_and_mpt_reading_their_rows_at_most_once_take_the_higher_rate(epochs, schedule):
    for method in ("prompt-tuning", "mpt"):
        recipe = default_recipe(method, ["positive", "negative"], epochs)
        assert (recipe.lr, recipe.schedule, recipe.warmup, recipe.steps) == (*schedule, 100)
        # prompt tuning at the higher rate ends with the mean of its last quarter's prompts (measured for it only)
        tail = 0.25 if method == "prompt-tuning" and schedule[0] == 3e-2 else 0.0
        assert recipe.average_tail == tail
        assert recipe.init == "text"                                 # the start does not move with the epochs
        assert default_recipe(method, None, epochs) == default_recipe(method)   # random start: as before
    for method in ("prefix-tuning", "p-tuning"):                     # not measured at the higher rate
        assert default_recipe(method, ["positive"], epochs) == default_recipe(method, ["positive"])


def test_run_epochs_counts_rows_read_and_refuses_what_is_not_a_count():
    assert run_epochs(100, 8, 1000) == 0.8 and run_epochs(100, 8, 280) == pytest.approx(2.857, abs=1e-3)
    for bad in ({"steps": 0}, {"rows_per_step": 2.5}, {"training_rows": -1}):
        args = {"steps": 100, "rows_per_step": 8, "training_rows": 1000, **bad}
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a positive int"):
            run_epochs(**args)
    with pytest.raises(ValueError, match="epochs must be a positive number or None, got 0"):
        default_recipe("prompt-tuning", ["positive"], 0)


def test_train_prints_zero_shot_and_held_out_accuracy_with_the_recipe(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", classification_records(40))
    assert _train(model_dir, data, tmp_path / "out", "--steps", "8") == 0
    printed = capsys.readouterr().out
    assert "held out 4 of 40 training records" in printed
    assert "zero-shot accuracy on 4 held-out records:" in printed
    assert "held-out accuracy after training:" in printed
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    # 8 steps of 4 rows read the 36 training rows 0.89 times: PEFT's example's rate, linear decay, no warm-up,
    # the mean of the last quarter's prompts
    assert "training: 8 steps of 4 rows (shuffled batches), 0.889 epochs of 36 training records; lr 0.03, " \
           "linear schedule, no warm-up; ends with the mean of the last 2 steps' prompts\n" in printed
    assert [r["lr"] for r in steps] == pytest.approx([3e-2 * (1 - k / 8) for k in range(8)])
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["prompt_tuning_init"] == "TEXT"
    assert config["prompt_tuning_init_text"] == "Answer with one word: negative or positive.\n"  # sorted labels


def test_train_reading_its_rows_several_times_warms_up_to_the_lower_rate(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", classification_records(40))
    assert _train(model_dir, data, tmp_path / "out", "--steps", "12") == 0    # 48 rows: 1.33 epochs of 36
    assert "training: 12 steps of 4 rows (shuffled batches), 1.33 epochs of 36 training records; lr 0.01, " \
           "cosine schedule, 10 warm-up steps" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in log if "loss" in r]
    assert len(lrs) == 12 and lrs[0] == 0.0 and lrs[9] == pytest.approx(9e-3)   # the warm-up starts at 0


def test_mpt_from_text_starts_every_task_prompt_as_the_text(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", classification_records(24))
    assert _train(model_dir, data, tmp_path / "out", "--method", "mpt", "--steps", "1", "--warmup", "1") == 0
    # one step of 4 rows reads the 22 training rows 0.18 times: MPT takes prompt tuning's higher rate, linear
    assert "training: 1 step of 4 rows (shuffled batches), 0.182 epochs of 22 training records; lr 0.03, " \
           "linear schedule, 1 warm-up step\n" in capsys.readouterr().out
    saved = fastprompt.io.read_tensors(tmp_path / "out" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["prompt_tuning_init"] == "TEXT"
    # One step at the warm-up's learning rate 0: the factors are still U V = 1 (PEFT's would be near 0).
    product = saved["prefix_task_cols"] @ saved["prefix_task_rows"]
    assert torch.equal(product, torch.ones_like(product))


def test_holdout_zero_trains_without_evaluation(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", classification_records(12))
    assert _train(model_dir, data, tmp_path / "out", "--holdout", "0") == 0
    assert "zero-shot" not in capsys.readouterr().out


def test_transfer_stages_keep_their_old_defaults():
    args = type("Args", (), {k: None for k in ("lr", "steps", "schedule", "warmup", "average_last")})()
    for name, value in dict(out="o", optimizer="adamw", batch_size=8, grad_accum=1, weight_decay=0.0,
                            max_grad_norm=1.0, precision="fp32", eval_every=0, eval_batch_size=None, metric="auto",
                            patience=None, restore_best=True, save_every=0, keep_checkpoints=None, seed=0, log_every=10,
                            progress="none", no_plot=True, score="sum", cuda_graphs=False, stratify=False).items():
        setattr(args, name, value)
    config = train_cli.training_config(args)
    assert (config.lr, config.schedule, config.warmup, config.steps, config.average_last, config.stratify) == (
        OLD_RECIPE.lr, "constant", 0, 100, 0, False)


def test_named_model_smollm2_resolves_to_its_converted_folder(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.setattr(cli, "named_models", lambda: {"smollm2": lambda: model_dir})
    data = write_jsonl(tmp_path / "train.jsonl", seq2seq_records(8))
    assert _train("smollm2", data, tmp_path / "out") == 0
    saved = json.loads((tmp_path / "out" / "fastprompt_data.json").read_text())
    assert saved["base_model"] == str(model_dir)


def test_smollm2_is_a_named_model():
    from fastprompt.offline.smollm2 import smollm2_folder

    assert cli.named_models()["smollm2"] is smollm2_folder


def test_wrong_model_path_is_one_line_and_exit_code_2(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", seq2seq_records(4))
    with pytest.raises(SystemExit) as exit_info:
        _train(tmp_path / "no-such-model", data, tmp_path / "out")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("fastprompt train: error: --model ") and "no config.json" in err and "smollm2" in err


@pytest.mark.parametrize("flag, value", [("--steps", "-3"), ("--batch-size", "0"), ("--grad-accum", "x")])
def test_a_count_flag_that_is_not_a_positive_integer_is_a_usage_error(tmp_path, capsys, flag, value):
    data = write_jsonl(tmp_path / "train.jsonl", classification_records(8))
    with pytest.raises(SystemExit) as exit_info:    # refused by argparse, before any model or data is read
        _train(tmp_path / "no-such-model", data, tmp_path / "out", flag, value)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: argument {flag}: must be a positive integer, got '{value}'\n")


def test_stratify_orders_the_batches_by_label(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", classification_records(12))
    assert _train(model_dir, data, tmp_path / "out", "--stratify", "--steps", "2", "--holdout", "0") == 0
    assert "training: 2 steps of 4 rows (stratified batches)" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value, says", [("--average-last", "5", "an int from 0 to steps (4), got 5"),
                                             ("--warmup", "-1", ">= 0, got -1")])
def test_an_option_the_training_config_refuses_is_one_line_naming_the_flag(tmp_path, model_dir, capsys, flag,
                                                                            value, says):
    data = write_jsonl(tmp_path / "train.jsonl", classification_records(8))
    with pytest.raises(SystemExit) as exit_info:
        _train(model_dir, data, tmp_path / "out", flag, value)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err   # after the model's loading bar: the flag's value needs the recipe
    assert err.endswith(f"\nfastprompt train: error: {flag} must be {says}\n") and "Traceback" not in err


@pytest.mark.parametrize("last", [3, 0])
def test_average_last_sets_how_many_steps_the_final_prompt_averages(tmp_path, model_dir, capsys, last):
    data = write_jsonl(tmp_path / "train.jsonl", classification_records(40))   # 4 steps: the recipe averages none
    assert _train(model_dir, data, tmp_path / "out", "--average-last", str(last), "--progress", "print") == 0
    printed = capsys.readouterr().out
    said = f"no warm-up; ends with the mean of the last {last} steps' prompts\n" if last else "no warm-up\n"
    assert said in printed
    assert ("the prompt is the mean of those after steps 2-4 (average_last)" in printed) == bool(last)
    evals = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()
             if "eval_accuracy" in line]
    # the held-out split scores the final prompt: the mean, or the last step's
    assert [(r["step"], r.get("averaged_last")) for r in evals] == [(4, last or None)]


@pytest.mark.parametrize("command", ["train", "eval"])
def test_bad_data_file_is_one_line_and_exit_code_2(tmp_path, model_dir, capsys, command):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the movie was good", "label": "positive"}\nnot json\n')
    argv = ["--model", str(model_dir), "--data", str(bad)]
    argv = [command, *argv, *(["--out", str(tmp_path / "o")] if command == "train" else ["--adapter", str(tmp_path)])]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"fastprompt {command}: error: {bad}:2: not valid JSON: Expecting value (column 1)\n"


def test_labels_without_verbalizer_are_named_and_multi_token_labels_warned(tmp_path, model_dir, capsys):
    records = [{"text": r["text"], "label": "good movie" if r["label"] == "positive" else "bad"}
               for r in classification_records(20)]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    assert _train(model_dir, data, tmp_path / "out", "--holdout", "0") == 0
    captured = capsys.readouterr()
    assert "label words, from the label strings (no --verbalizer given): 'bad', 'good movie'" in captured.out
    assert "warning: label 'good movie' is scored as 2 tokens" in captured.err
    assert "'bad'" not in captured.err


def test_verbalizer_words_are_named(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", classification_records(20))
    assert _train(model_dir, data, tmp_path / "out", "--holdout", "0", "--verbalizer", "positive=great",
                  "--verbalizer", "negative=awful") == 0
    captured = capsys.readouterr()
    assert "label words, from --verbalizer: 'great', 'awful'" in captured.out and "warning" not in captured.err


@pytest.mark.parametrize("command, shown", [
    ("train", ["--method {prompt-tuning,prefix-tuning,p-tuning,mpt}\n" + " " * 24 + "default: prompt-tuning",
               "(default: the recipe's, 100)", "(per rank) (default: 8)", "the tokens of the init text, else 20"]),
    ("serve", ["--host HOST           default: 127.0.0.1", "--port PORT           default: 8000"]),
])
def test_help_shows_the_defaults(command, shown, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    printed = capsys.readouterr().out
    for text in shown:
        assert text in printed, text


def test_tiny_demo_keeps_its_adapters_in_out(tmp_path, capsys):
    assert main(["demo", "--tiny", "--steps", "2", "--out", str(tmp_path / "demo")]) == 0
    for name in ("count_up", "count_down"):
        assert (tmp_path / "demo" / name / "adapter_config.json").is_file()
    assert f"adapters saved in {tmp_path / 'demo'}" in capsys.readouterr().out


def test_prefix_tuning_can_start_from_the_instruction_keys_and_values(tmp_path, model_dir):
    """Prefix tuning's default start on classification data (--init text): each layer's prefix is the
    instruction's keys/values (lr 0: the saved adapter is the start itself)."""
    import fastprompt
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastprompt.train.prefix_init import init_prefix_from_text

    data = write_jsonl(tmp_path / "train.jsonl", classification_records(40))
    assert _train(model_dir, data, tmp_path / "out", "--method", "prefix-tuning", "--lr", "0") == 0   # the default
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")["prompt_embeddings"]
    ids = AutoTokenizer.from_pretrained(model_dir)("Answer with one word: negative or positive.\n")["input_ids"]
    want = fastprompt.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                     fastprompt.PrefixTuningConfig(num_virtual_tokens=len(ids)))
    init_prefix_from_text(want, ids)
    assert saved.shape[0] == len(ids)
    torch.testing.assert_close(saved, want.prompt_sources["default"].embedding.weight.detach())


@pytest.mark.parametrize("flags, message", [
    (["--init", "class-labels"], "--method prefix-tuning supports --init random or text, got 'class-labels'"),
    (["--init", "text", "--prefix-projection"], "--init text sets the prefix's keys/values, which "
                                                "--prefix-projection computes through an MLP"),
])
def test_prefix_tuning_start_refusals(tmp_path, model_dir, capsys, flags, message):
    data = write_jsonl(tmp_path / "train.jsonl", classification_records(12))
    with pytest.raises(SystemExit) as exit_info:
        _train(model_dir, data, tmp_path / "out", "--method", "prefix-tuning", *flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_prefix_projection_keeps_peft_start_by_default(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", classification_records(12))
    assert _train(model_dir, data, tmp_path / "out", "--method", "prefix-tuning", "--prefix-projection",
                  "--encoder-hidden-size", "8", "--num-virtual-tokens", "3") == 0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["num_virtual_tokens"] == 3 and config["prefix_projection"] is True


def _built_for(model_dir, data, *flags):
    """The model `fastprompt train --data data *flags` starts training from (`starting_model`), its tokenizer."""
    args = cli.build_parser().parse_args(["train", "--model", str(model_dir), "--data", data, "--out", "o", *flags])
    base, tokenizer = train_cli.load_backbone(args, "cpu")
    train_data, _, kwargs = train_cli.load_training_data(args, tokenizer)
    model, _ = train_cli.starting_model(args, base, tokenizer, train_data, kwargs["verbalizers"], say=False)
    return model, tokenizer


def test_p_tuning_starts_classification_from_the_instruction(tmp_path, model_dir):
    """--method p-tuning on classification data: the residual encoder with the instruction's embeddings as its
    table, so the untuned prompt is that text; --init random (and text-to-text data) keep PEFT's start."""
    data = write_jsonl(tmp_path / "train.jsonl", classification_records(12))
    model, tokenizer = _built_for(model_dir, data, "--method", "p-tuning")
    ids = tokenizer("Answer with one word: negative or positive.\n")["input_ids"]
    config, source = model.peft_config["default"], model.prompt_sources["default"]
    assert config.encoder_residual and config.num_virtual_tokens == len(ids)
    with torch.no_grad():
        assert torch.equal(source.encoded(), model.backbone.word_embeddings.weight[ids])
    for flags, records in ((["--init", "random"], classification_records(12)), ([], seq2seq_records(8))):
        other = write_jsonl(tmp_path / "other.jsonl", records)
        model, _ = _built_for(model_dir, other, "--method", "p-tuning", *flags)
        assert not model.peft_config["default"].encoder_residual
        assert model.peft_config["default"].num_virtual_tokens == 20
    refusal = "--method p-tuning supports --init random or text, got 'class-labels'"
    with pytest.raises(train_cli.UsageError, match=refusal):
        _built_for(model_dir, data, "--method", "p-tuning", "--init", "class-labels")


def test_p_tuning_trains_by_its_recipe_unless_told(tmp_path, model_dir, capsys):
    """--method p-tuning with no recipe flag: PEFT's task-guide recipe (encoder 128, lr 1e-3 decaying linearly
    from step 0, weight decay 0.01); each flag given wins."""
    data = write_jsonl(tmp_path / "train.jsonl", classification_records(24))
    assert _train(model_dir, data, tmp_path / "out", "--method", "p-tuning") == 0
    capsys.readouterr()
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "P_TUNING" and config["encoder_hidden_size"] == 128
    # the residual encoder from the instruction: fastprompt's own field, beside PEFT's config
    assert json.loads((tmp_path / "out" / "fastprompt_config.json").read_text()) == {"encoder_residual": True}
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log if "loss" in r] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    args = ["train", "--model", "m", "--data", "d", "--out", "o", "--method", "p-tuning"]
    parse, recipe = cli.build_parser().parse_args, default_recipe("p-tuning")
    assert train_cli.training_config(parse(args), recipe).weight_decay == 0.01
    assert train_cli.training_config(parse([*args, "--weight-decay", "0"]), recipe).weight_decay == 0


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_init_text_without_a_text_is_refused(tmp_path, model_dir, capsys, method):
    """Text-to-text data has no label words, so no default text: --init text needs --init-text."""
    data = write_jsonl(tmp_path / "train.jsonl", seq2seq_records(8))
    with pytest.raises(SystemExit) as exit_info:
        _train(model_dir, data, tmp_path / "out", "--method", method, "--init", "text")
    assert exit_info.value.code == 2
    assert "--init text needs --init-text TEXT" in capsys.readouterr().err
