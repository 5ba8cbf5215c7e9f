"""kill -9 during a save, at random moments, many times: the folder always loads, and holds one save.

A forked child saves in a loop, each save stamping every tensor (both adapters' prompts, the optimizer
state) and the step metadata with its own step number; the parent lets it complete a few saves, kills it
at a random moment of the next and checks the folder that survived. Forking keeps it quick: the child inherits the
imported torch and the built models. The parent is a fresh process that never starts torch's thread pool
(pytest's own process has, and a child forked from it can hang in its first parallel op)."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastprompt
from fastprompt import io
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
KILLS = 30


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, str]:
    """Both cases run in one fresh process (one torch import): {case: "ok" or its traceback}."""
    root = tmp_path_factory.mktemp("kills")
    done = subprocess.run([sys.executable, "-m", "tests.test_kill_during_save", str(root)],
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((root / "outcomes.json").read_text())


def test_kill_during_save_training_checkpoint(outcomes):
    assert outcomes["training_checkpoint"] == "ok", outcomes["training_checkpoint"]


def test_kill_during_save_pretrained_over_another_size(outcomes):
    assert outcomes["save_pretrained"] == "ok", outcomes["save_pretrained"]


def _stamp(model, step: int) -> None:
    with torch.no_grad():
        for param in model.prompt_sources.parameters():
            param.fill_(float(step))


def _kill_while_saving(save, check, folder: Path, seconds_per_save: float) -> tuple[set, int]:
    """KILLS times: fork a child that saves steps base, base + 1, ... in a loop, let it finish one to three
    saves (it reports each through a pipe), SIGKILL it at a random moment of the next one, check the folder.
    Waiting on the child's reports rather than on the clock keeps this true on a slow or loaded machine,
    where a fork's first save can take many times the parent's. Returns (the steps found after the kills,
    kills that left a save unfinished)."""
    rng = random.Random(0)
    found, interrupted = set(), 0
    for kill in range(KILLS):
        base = (kill + 1) * 1000
        reports, report = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: save until killed, one byte down the pipe after each save
            try:
                os.close(reports)
                step = base
                while True:
                    save(step)
                    os.write(report, b".")
                    step += 1
            finally:
                os._exit(1)
        os.close(report)
        completed = rng.randint(1, 3)
        for _ in range(completed):
            ready, _, _ = select.select([reports], [], [], 120)
            assert ready and os.read(reports, 1) == b".", "the saving child stopped reporting"
        time.sleep(rng.uniform(0.0, seconds_per_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(reports)
        strays = list(folder.parent.glob(f".{folder.name}.*.tmp"))
        interrupted += bool(strays)
        assert len(strays) <= 1, strays  # the next save removed the earlier kills' leftovers
        step = check()
        assert step >= base + completed - 1, (step, base, completed)  # at least the saves it reported
        found.add(step)
    return found, interrupted


def _seconds_per_save(save) -> float:
    start = time.perf_counter()
    for step in range(1, 4):
        save(step)
    return (time.perf_counter() - start) / 3


def kill_during_save_training_checkpoint(tmp_path: Path) -> None:
    model = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    model.add_adapter("other", fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    folder = tmp_path / "checkpoint"

    def save(step):
        _stamp(model, step)
        for p in params:
            optimizer.state[p]["momentum_buffer"] = torch.full_like(p, float(-step))
        torch.manual_seed(step)
        fastprompt.save_training_checkpoint(folder, model, optimizer, step=step, extra={"step": step})

    resumed = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    resumed.add_adapter("other", fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    resumed_params = [p for p in resumed.parameters() if p.requires_grad]

    def check():
        _stamp(resumed, -7)
        resumed_optimizer = torch.optim.SGD(resumed_params, lr=0.1, momentum=0.9)
        meta = fastprompt.load_training_checkpoint(folder, resumed, resumed_optimizer)
        step = meta["step"]
        assert meta["extra"] == {"step": step}
        for param in resumed_params:
            assert torch.equal(param, torch.full_like(param, float(step))), (step, param.flatten()[:3])
            assert torch.equal(resumed_optimizer.state[param]["momentum_buffer"], torch.full_like(param, -step))
        assert torch.equal(torch.get_rng_state(), torch.manual_seed(step).get_state())
        # the PEFT-format adapters beside it are of the same step
        for name, sub in (("default", folder), ("other", folder / "other")):
            prompts = io.load_adapter_files(sub)[1]["prompt_embeddings"]
            assert torch.equal(prompts, torch.full_like(prompts, float(step))), (name, step)
        return step

    found, interrupted = _kill_while_saving(save, check, folder, _seconds_per_save(save))
    assert len(found) == KILLS, found  # every kill's folder holds that child's own saves
    assert interrupted >= KILLS // 3, interrupted  # and most kills landed inside a save
    save(10**6)
    assert check() == 10**6
    assert not [p for p in tmp_path.rglob("*.tmp")], "stray temporaries after a completed save"


def kill_during_save_pretrained(tmp_path: Path) -> None:
    base = tiny_model("llama")
    models = {}
    for size in (4, 7):  # every other save changes num_virtual_tokens, so mixed files would not even load
        models[size] = fastprompt.get_peft_model(base, fastprompt.PromptTuningConfig(num_virtual_tokens=size))
        models[size].add_adapter("other", fastprompt.PromptTuningConfig(num_virtual_tokens=size))
    folder = tmp_path / "adapter"
    (tmp_path / "adapter").mkdir()
    (folder / "tokenizer.json").write_text("{}")  # not the save's: carried over by every save

    def save(step):
        model = models[4 if step % 2 else 7]
        _stamp(model, step)
        model.save_pretrained(folder)

    def check():
        steps = set()
        for name, sub in (("default", folder), ("other", folder / "other")):
            loaded = fastprompt.from_pretrained(base, sub, adapter_name=name)
            prompts = loaded.prompt_sources[name].peft_state_dict()["prompt_embeddings"]
            assert prompts.shape[0] == loaded.peft_config[name].num_virtual_tokens
            step = int(prompts.flatten()[0])
            assert torch.equal(prompts, torch.full_like(prompts, float(step)))
            assert prompts.shape[0] == (4 if step % 2 else 7), (name, step, prompts.shape)
            steps.add(step)
        assert len(steps) == 1, steps  # both adapters of one save
        assert (folder / "tokenizer.json").read_text() == "{}"
        return steps.pop()

    found, interrupted = _kill_while_saving(save, check, folder, _seconds_per_save(save))
    assert len(found) == KILLS, found
    assert interrupted >= KILLS // 3, interrupted
    save(10**6 + 1)
    assert check() == 10**6 + 1
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "other", "tokenizer.json"]
    assert not [p for p in tmp_path.rglob("*.tmp")], "stray temporaries after a completed save"


if __name__ == "__main__":
    import traceback

    torch.set_num_threads(1)  # before any op: no thread pool for the forked children to inherit
    root, results = Path(sys.argv[1]), {}
    for case, run in (("training_checkpoint", kill_during_save_training_checkpoint),
                      ("save_pretrained", kill_during_save_pretrained)):
        (root / case).mkdir()
        try:
            run(root / case)
            results[case] = "ok"
        except Exception:
            results[case] = traceback.format_exc()
    (root / "outcomes.json").write_text(json.dumps(results))
