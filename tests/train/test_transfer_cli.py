"""The transfer commands end to end on a tiny model: teachers/sources → mpt-source → mpt-target → eval,
and probe → spot-rank → spot-transfer → eval."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from fastprompt.cli import main
from fastprompt.train import read_log
from tests.helpers import assert_close
from tests.tiny_models import save_tiny_tokenizer, tiny_model
from tests.train.common import seq2seq_records, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transfer")
    tiny_model("llama").save_pretrained(folder / "model")
    save_tiny_tokenizer(folder / "model")
    files = {name: write_jsonl(folder / f"{name}.jsonl", seq2seq_records(6, seed=seed))
             for seed, name in enumerate(["down", "up", "t1", "t2"])}
    common = ["--model", str(folder / "model"), "--batch-size", "4", "--progress", "none", "--no-plot"]
    assert main(["train", *common, "--data", f"down={files['down']}", "--data", f"up={files['up']}",
                 "--num-virtual-tokens", "3", "--steps", "2", "--out", str(folder / "sources")]) == 0
    return folder, files, common


def _weights(folder):
    return load_file(folder / "adapter_model.safetensors")


def test_mpt_source_then_target_then_eval(setup, capsys):
    folder, files, common = setup
    sources = ["--data", f"down={files['down']}", "--data", f"up={files['up']}"]
    assert main(["mpt-source", *common, "--teachers", str(folder / "sources"), *sources, "--num-ranks", "2",
                 "--distill-weight", "0.5", "--temperature", "2", "--steps", "2", "--out", str(folder / "mpt")]) == 0
    config = json.loads((folder / "mpt" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_tasks"], config["num_ranks"], config["num_virtual_tokens"]) == (
        "MULTITASK_PROMPT_TUNING", 2, 2, 3)
    record = read_log(folder / "mpt" / "train_log.jsonl")[-1]
    assert record["loss"] == pytest.approx(record["lm_loss"] + 0.5 * (record["kl_loss"] + record["hidden_loss"]),
                                           rel=1e-5)
    saved = json.loads((folder / "mpt" / "fastprompt_data.json").read_text())
    assert saved["tasks"] == ["down", "up"] and saved["transfer"]["stage"] == "mpt-source"

    # lr 0 keeps the start, so the written target shows the init: P* and the factors of source task "up".
    target = folder / "target"
    assert main(["mpt-target", *common, "--source", str(folder / "mpt"), "--data", f"t1={files['t1']}",
                 "--data", f"t2={files['t2']}", "--init", "exact", "--init-task", "up", "--lr", "0", "--steps", "1",
                 "--out", str(target)]) == 0
    source, tuned = _weights(folder / "mpt"), _weights(target)
    assert torch.equal(tuned["prompt_embeddings"], source["prompt_embeddings"])
    for key in ("prefix_task_cols", "prefix_task_rows"):
        assert tuned[key].shape[0] == 2 and torch.equal(tuned[key][1], source[key][1]), key
    config = json.loads((target / "adapter_config.json").read_text())
    assert config["num_tasks"] == 2 and config["prompt_tuning_init"] == "RANDOM"
    capsys.readouterr()
    assert main(["eval", "--model", str(folder / "model"), "--adapter", str(target), "--data", f"t2={files['t2']}"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["eval_examples"] == 6 and metrics["eval_loss"] > 0


def test_spot_rank_then_transfer_then_eval(setup, capsys):
    folder, files, common = setup
    assert main(["train", *common, "--data", f"t1={files['t1']}", "--num-virtual-tokens", "3", "--steps", "2",
                 "--out", str(folder / "probe")]) == 0
    assert main(["spot-rank", "--sources", str(folder / "sources"), "--targets", str(folder / "probe"),
                 "--similarity", "per-token", "--out", str(folder / "spot")]) == 0
    with open(folder / "spot" / "similarity.csv", newline="") as handle:
        assert [row[0] for row in csv.reader(handle)] == ["target", "t1"]
    assert (folder / "spot" / "similarity.png").read_bytes()[:4] == b"\x89PNG"
    ranking = json.loads((folder / "spot" / "ranking.json").read_text())["rankings"]["t1"]

    out = folder / "spot-target"
    assert main(["spot-transfer", *common, "--sources", str(folder / "sources"), "--target-prompt",
                 str(folder / "probe"), "--data", f"t1={files['t1']}", "--similarity", "per-token", "--top-k", "2",
                 "--lr", "0", "--steps", "1", "--out", str(out)]) == 0
    saved = json.loads((out / "fastprompt_data.json").read_text())
    assert saved["transfer"]["chosen"] == [name for name, _ in ranking[:2]]
    average = sum(_weights(folder / "sources" / name)["prompt_embeddings"] for name, _ in ranking[:2]) / 2
    assert_close("transferred start", _weights(out / "t1")["prompt_embeddings"], average, 1e-6)
    capsys.readouterr()
    assert main(["eval", "--model", str(folder / "model"), "--adapter", str(out), "--data", f"t1={files['t1']}"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_examples"] == 6


def test_mpt_source_needs_a_teacher_per_task(setup):
    folder, files, common = setup
    with pytest.raises(ValueError, match="no teacher for task 't1'"):
        main(["mpt-source", *common, "--teachers", str(folder / "sources"), "--data", f"t1={files['t1']}",
              "--steps", "1", "--out", str(folder / "bad")])
