"""Saves survive a power cut and work where a folder cannot be renamed: every file and folder of a save is
fsynced before the switch and the parent after it; a mount point is written into, not swapped; files get
the umask's mode (0644 under umask 022), as PEFT's do."""

import errno
import os
import shutil
import subprocess

import pytest
import torch

import fastprompt
from fastprompt import io
from tests.tiny_models import batch, tiny_model


def _model():
    return fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=3))


@pytest.fixture
def events(monkeypatch):
    """What the save did, in order: ("fsync", path) for each real os.fsync, ("switch", target) for each
    folder exchange."""
    log = []
    real_fsync, real_switch = os.fsync, io._switch

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def switch(staging, target):
        log.append(("switch", str(target)))
        real_switch(staging, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(io, "_switch", switch)
    return log


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fsynced descriptor through /proc")
def test_a_save_is_fsynced_before_the_switch_and_its_parent_after(tmp_path, events):
    target = tmp_path / "adapter"
    _model().save_pretrained(target)
    switch = events.index(("switch", str(target)))
    before = [path for kind, path in events[:switch] if kind == "fsync"]
    staging = os.path.dirname(before[0])
    assert os.path.basename(staging).startswith(".adapter.") and staging.endswith(".tmp")
    assert set(before) == {os.path.join(staging, name) for name in os.listdir(target)} | {staging}
    assert before[-1] == staging  # the folder after its entries
    assert events[switch + 1:] == [("fsync", str(tmp_path))]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fsynced descriptor through /proc")
def test_a_single_file_write_is_fsynced_then_its_folder(tmp_path, events):
    path = tmp_path / "log.jsonl"
    io.atomic_write(path, lambda tmp: open(tmp, "w").write("{}\n"))
    assert path.read_text() == "{}\n"
    assert [kind for kind, _ in events] == ["fsync", "fsync"]
    assert os.path.basename(events[0][1]).startswith(".log.jsonl.") and events[1][1] == str(tmp_path)


def test_saved_files_take_the_umask_mode_like_peft(tmp_path):
    old = os.umask(0o022)
    try:
        model = _model()
        model.save_pretrained(tmp_path / "adapter")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        fastprompt.save_training_checkpoint(tmp_path / "checkpoint", model, optimizer, step=1)
        os.umask(0o077)
        model.save_pretrained(tmp_path / "private")
    finally:
        os.umask(old)
    for folder in ("adapter", "checkpoint"):
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / folder).iterdir()}
        assert set(modes.values()) == {0o644}, modes
        assert (tmp_path / folder).stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "private").iterdir()} == {0o600}


def _checkpoint_into(folder):
    """A training checkpoint with an optimizer state into `folder`, then one without: the stale optimizer
    file must go, a file the saves do not own (a tokenizer) must stay."""
    model = _model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask, labels = batch()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    optimizer.step()
    fastprompt.save_training_checkpoint(folder, model, optimizer, step=1)
    (folder / "tokenizer.json").write_text("{}")
    with torch.no_grad():
        model.prompt_sources["default"].embedding.weight.add_(1.0)
    fastprompt.save_training_checkpoint(folder, model, None, step=2)
    return model


def _assert_second_save(folder, model):
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([io.CONFIG_NAME, io.WEIGHTS_NAME, io.TRAINING_STATE_NAME, io.TRAINING_META_NAME,
                            io.RNG_NAME, "tokenizer.json"])
    fresh = _model()
    assert fastprompt.load_training_checkpoint(folder, fresh)["step"] == 2
    assert torch.equal(fresh.prompt_sources["default"].embedding.weight,
                       model.prompt_sources["default"].embedding.weight)


def test_a_mount_point_is_written_into_not_swapped(tmp_path, monkeypatch):
    """The kernel refuses to rename a mount point (EBUSY); here both halves of that are simulated."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    real_ismount, real_switch = os.path.ismount, io._switch

    def switch(staging, target):
        if os.path.realpath(target) == str(mount):
            raise OSError(errno.EBUSY, "Device or resource busy", str(target))
        real_switch(staging, target)

    monkeypatch.setattr(os.path, "ismount", lambda p: str(p) == str(mount) or real_ismount(p))
    monkeypatch.setattr(io, "_switch", switch)
    inode = mount.stat().st_ino
    model = _checkpoint_into(mount)
    assert mount.stat().st_ino == inode
    _assert_second_save(mount, model)
    named = _model()
    named.save_pretrained(mount, selected_adapters=["default"])  # an adapter file switched in, beside the rest
    assert (mount / io.TRAINING_META_NAME).exists() and not any(io._is_temporary(p.name) for p in mount.iterdir())


def _can_mount(path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_real_mount_point(tmp_path):
    """The same on a real tmpfs mount, where this machine lets the test mount one (root in a container)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if not _can_mount(mount):
        pytest.skip("cannot mount a tmpfs here; test_a_mount_point_is_written_into_not_swapped covers the logic")
    try:
        assert os.path.ismount(mount)
        model = _checkpoint_into(mount)
        assert os.path.ismount(mount)
        _assert_second_save(mount, model)
    finally:
        subprocess.run(["umount", str(mount)], check=True)
