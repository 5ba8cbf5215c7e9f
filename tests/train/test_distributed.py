"""Data-parallel training: two gloo processes under torchrun end with the same prompt as one process on
the same global batch; FSDP-sharded backbone layers give the unsharded numbers."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import fastprompt
from fastprompt.cli import main
from fastprompt.train import Distributed, read_log
from tests.helpers import assert_close
from tests.tiny_models import batch, save_tiny_tokenizer, tiny_model
from tests.train.common import seq2seq_records, write_jsonl


def test_shard_gives_each_rank_its_micro_batches_and_pads_short_steps():
    items = ["m0", "m1", "m2", "m3", "m4"]
    assert Distributed(0, 2).shard(items) == [("m0", 1.0), ("m2", 1.0), ("m4", 1.0)]
    assert Distributed(1, 2).shard(items) == [("m1", 1.0), ("m3", 1.0), ("m0", 0.0)]   # padded: same count
    assert Distributed().shard(items) == [(m, 1.0) for m in items]


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    tiny_model("llama").save_pretrained(folder / "model")
    save_tiny_tokenizer(folder / "model")
    # 10 records and a global batch of 4: the third step holds one micro-batch, so rank 1 runs a padded one.
    up = write_jsonl(folder / "up.jsonl", seq2seq_records(5, seed=1))
    down = write_jsonl(folder / "down.jsonl", seq2seq_records(5, seed=2))
    return folder, ["--model", str(folder / "model"), "--data", up, "--data", down, "--num-virtual-tokens", "3",
                    "--steps", "3", "--lr", "0.05", "--progress", "none", "--no-plot", "--device", "cpu"]


def _torchrun(args, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "fastprompt", "train", *args, "--batch-size", "2", "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _compare_runs(single, distributed):
    for task in ("up", "down"):
        ours = load_file(distributed / task / "adapter_model.safetensors")["prompt_embeddings"]
        reference = load_file(single / task / "adapter_model.safetensors")["prompt_embeddings"]
        assert_close(f"{task} prompt", ours, reference, 1e-5)
    losses = [[r["loss"] for r in read_log(run / "train_log.jsonl")] for run in (single, distributed)]
    assert len(losses[1]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.fixture(scope="module")
def single_run(run_files):
    folder, args = run_files
    assert main(["train", *args, "--batch-size", "4", "--out", str(folder / "single")]) == 0
    return folder / "single"


def test_two_gloo_ranks_equal_one_process(run_files, single_run):
    folder, args = run_files
    printed = _torchrun(args, folder / "ddp")
    assert len([line for line in printed.splitlines() if line.startswith("{")]) == 1   # only rank 0 prints
    _compare_runs(single_run, folder / "ddp")
    saved = json.loads((folder / "ddp" / "fastprompt_data.json").read_text())
    assert saved["tasks"] == ["down", "up"]


@pytest.mark.slow
def test_two_gloo_ranks_with_fsdp_equal_one_process(run_files, single_run):
    folder, args = run_files
    _torchrun([*args, "--fsdp"], folder / "fsdp")
    _compare_runs(single_run, folder / "fsdp")


def test_fsdp_sharded_layers_give_the_unsharded_loss_and_prompt_gradient(tmp_path):
    from fastprompt.train.distributed import shard_backbone

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        config = fastprompt.PromptTuningConfig(num_virtual_tokens=3)
        reference = fastprompt.get_peft_model(tiny_model("llama"), config)
        sharded = fastprompt.get_peft_model(shard_backbone(tiny_model("llama"), torch.device("cpu")), config)
        sharded.prompt_sources.load_state_dict(reference.prompt_sources.state_dict())
        ids, mask, labels = batch(3, 9)
        losses = [m(input_ids=ids, attention_mask=mask, labels=labels).loss for m in (reference, sharded)]
        for loss in losses:
            loss.backward()
        assert type(sharded.base_model.model.layers[0].mlp.up_proj.weight).__name__ == "DTensor"
        assert_close("loss", losses[1], losses[0], 1e-6)
        assert_close("prompt gradient", sharded.prompt_sources["default"].embedding.weight.grad,
                     reference.prompt_sources["default"].embedding.weight.grad, 1e-5)
    finally:
        dist.destroy_process_group()
