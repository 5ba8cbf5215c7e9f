"""`fastprompt train` / `fastprompt eval` end to end on a tiny model saved to a folder."""

import argparse
import json

import pytest

from fastprompt.train.cli import add_commands
from fastprompt.train import read_log
from tests.tiny_models import save_tiny_tokenizer, tiny_model
from tests.train.common import classification_records, seq2seq_records, write_jsonl


def _parser():
    parser = argparse.ArgumentParser(prog="fastprompt")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv):
    args = _parser().parse_args(argv)
    return args.run(args)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


def test_train_then_eval_classification(tmp_path, model_dir, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", classification_records(16))
    dev = write_jsonl(tmp_path / "dev.jsonl", classification_records(8, seed=1))
    out = tmp_path / "out"
    common = ["--model", str(model_dir), "--verbalizer", "positive=review", "--verbalizer", "negative=film"]
    assert _run(["train", *common, "--method", "prompt-tuning", "--data", train, "--eval-data", dev,
                 "--out", str(out), "--num-virtual-tokens", "4", "--lr", "0.2", "--steps", "20", "--batch-size", "4",
                 "--eval-every", "10", "--save-every", "10", "--progress", "print", "--init", "class-labels"]) == 0
    printed = capsys.readouterr().out
    assert "step 10/20" in printed and "tokens/s" in printed
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_log.jsonl", "loss_curve.png",
                 "fastprompt_data.json", "checkpoint-10/optimizer.pt", "checkpoint-20/adapter_config.json",
                 "best/adapter_config.json"):
        assert (out / name).is_file(), name
    log = read_log(out / "train_log.jsonl")
    assert [r["step"] for r in log if "eval_accuracy" in r] == [10, 20]

    assert _run(["eval", "--model", str(model_dir), "--adapter", str(out), "--data", dev,
                 "--output", str(tmp_path / "metrics.json")]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["eval_accuracy"] == 1.0 and metrics["eval_examples"] == 8
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


@pytest.mark.parametrize("records", [seq2seq_records(8), classification_records(8)],
                         ids=["peft-start", "residual-encoder-from-text"])
def test_train_resume_continues_exactly(tmp_path, model_dir, capsys, records):
    train = write_jsonl(tmp_path / "train.jsonl", records)
    base = ["train", "--model", str(model_dir), "--method", "p-tuning", "--data", train, "--num-virtual-tokens", "3",
            "--batch-size", "4", "--progress", "none", "--no-plot", "--schedule", "cosine", "--warmup", "1",
            "--optimizer", "adafactor", "--encoder-hidden-size", "8"]
    assert _run([*base, "--out", str(tmp_path / "a"), "--steps", "4"]) == 0
    assert _run([*base, "--out", str(tmp_path / "b"), "--steps", "4", "--save-every", "2"]) == 0
    # Pretend the run died after its checkpoint at step 2 and continue it.
    (tmp_path / "b" / "checkpoint-4" / "fastprompt_training_state.json").unlink()
    assert _run([*base, "--out", str(tmp_path / "b"), "--steps", "4", "--save-every", "2", "--resume"]) == 0
    capsys.readouterr()
    losses = [[r["loss"] for r in read_log(tmp_path / run / "train_log.jsonl")] for run in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 4


@pytest.mark.parametrize("method", ["prefix-tuning", "mpt"])
def test_multitask_train_and_eval(tmp_path, model_dir, method, capsys):
    up = write_jsonl(tmp_path / "up.jsonl", seq2seq_records(6, seed=1))
    down = write_jsonl(tmp_path / "down.jsonl", seq2seq_records(6, seed=2))
    out = tmp_path / "out"
    assert _run(["train", "--model", str(model_dir), "--method", method, "--data", up, "--data", f"down={down}",
                 "--out", str(out), "--num-virtual-tokens", "3", "--steps", "3", "--batch-size", "4",
                 "--progress", "none", "--no-plot"]) == 0
    saved = json.loads((out / "fastprompt_data.json").read_text())
    assert saved["tasks"] == ["down", "up"] and saved["method"] == method
    if method == "mpt":
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["peft_type"] == "MULTITASK_PROMPT_TUNING" and config["num_tasks"] == 2
    else:
        assert (out / "up" / "adapter_config.json").is_file() and (out / "down" / "adapter_config.json").is_file()
    assert _run(["eval", "--model", str(model_dir), "--adapter", str(out), "--data", f"up={up}"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["eval_examples"] == 6 and metrics["eval_loss"] > 0


def test_malformed_data_fails_with_file_and_line(tmp_path, model_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "a", "target": "good"}\n{"input": "a"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: missing field 'target'"):
        _run(["train", "--model", str(model_dir), "--data", str(path), "--out", str(tmp_path / "o")])
