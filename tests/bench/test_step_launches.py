"""bench/step_launches.py: kernel launches per training step, counted on meta tensors taken for CUDA.

What the counts must show: the Trainer's default step (`CudaGraphStep`) issues a fixed handful of host
launches per step (its inputs copied into the graph's buffers, the learning rate filled, one replay) however
deep the model, and no host read; the graph holds the eager shared-prefix step's launches plus clipping's;
attention runs through fastprompt's Triton kernels, not SDPA; an eager fastprompt step launches fewer kernels
per layer than PEFT's, and on the shared-prefix path reads nothing on the host (PEFT's step, and the concat
path, which runs the backbone's own mask code, read the mask's values once: transformers' all-ones check)."""

import pytest

from bench import step_launches, training

METHODS = {m.label: m for m in training.METHODS}


@pytest.fixture(scope="module")
def rows():
    return {(label, provider): step_launches.row("tiny-llama", METHODS[label], provider, batch=4, seq_len=9)
            for label in ("prompt_tuning-P100", "mpt-P100")
            for provider in ("peft-sdpa", "fastprompt-shared", "fastprompt-concat", "fastprompt")}


@pytest.mark.parametrize("label, inputs", [("prompt_tuning-P100", 3), ("mpt-P100", 4)])   # MPT: task ids too
def test_the_default_step_is_one_replay_on_the_host(rows, label, inputs):
    default = rows[label, "fastprompt"]
    assert default["host_launches"] == inputs + 2       # copies of ids, mask, labels (, task ids); lr; replay
    assert default["host_reads"] == 0
    eager = rows[label, "fastprompt-shared"]
    assert default["gpu_launches_per_layer"] == eager["gpu_launches_per_layer"]
    assert eager["gpu_launches"] < default["gpu_launches"] <= eager["gpu_launches"] + 20   # + clipping


def test_attention_runs_through_fastprompts_kernels():
    counts = step_launches.count_step("tiny-llama", METHODS["prefix-P100"], "fastprompt-eager", batch=2, seq_len=5)
    launched = counts["host"]
    assert launched["triton._fwd_kernel"] == 2 and launched["triton._bwd_dq_kernel"] == 2    # 2 layers
    assert launched["sdpa.forward"] == 0


@pytest.mark.parametrize("label", ["prompt_tuning-P100", "mpt-P100"])
def test_fastprompt_launches_fewer_kernels_per_layer_than_peft(rows, label):
    peft, shared, concat = (rows[label, provider] for provider in ("peft-sdpa", "fastprompt-shared",
                                                                   "fastprompt-concat"))
    assert shared["gpu_launches_per_layer"] < peft["gpu_launches_per_layer"]
    assert concat["gpu_launches_per_layer"] < peft["gpu_launches_per_layer"]
    assert shared["host_reads"] == 0 and concat["host_reads"] == peft["host_reads"] == 1


def test_cli_prints_the_table(capsys, tmp_path):
    out = tmp_path / "launches.json"
    assert step_launches.main(["--model", "tiny-llama", "--methods", "prefix-P100", "--providers", "fastprompt",
                               "--batch", "2", "--seq-len", "5", "--out", str(out)]) == 0
    assert "| prefix-P100 | fastprompt | 5 | 0 |" in capsys.readouterr().out
    assert out.read_text().startswith("[")
