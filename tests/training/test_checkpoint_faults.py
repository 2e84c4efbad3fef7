"""Checkpoint faults of the train loop (`train.fit` on the tiny UNet, one CPU device): a newest
checkpoint that cannot be read back is moved aside and the next older one resumed, ending
bit-identical to an uninterrupted run; checkpoints of other settings are moved, never deleted;
a full disk in Orbax's background writer is one line naming the path and the space needed,
keeps the last good checkpoint and its temporary folder is gone on the next start; export of a
broken step names the step and the folder."""
import errno
import pathlib
import shutil

import jax
import numpy as np
import pytest
from absl import logging as absl_logging

from fifa_jax.errors import InputError
from fifa_jax.training import checkpoints, train
from tests.parallel import _fsdp_train_worker as worker

SETTINGS = {"seed": 0, "num_steps": 10, "checkpoint_every": 2, "log_every": 1}


def _fit(workdir, **over):
    settings = dict(SETTINGS, **over)
    trainer = worker.make_trainer(settings, devices=jax.devices()[:1])
    return worker.run(workdir, settings, trainer=trainer), trainer


def _params(trainer) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(trainer.state.params)}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    _, trainer = _fit(tmp_path_factory.mktemp("uninterrupted"))
    return _params(trainer)


@pytest.fixture
def warnings(monkeypatch):
    got = []
    monkeypatch.setattr(absl_logging, "warning", lambda msg, *a: got.append(msg % a))
    monkeypatch.setattr(train.logging, "warning", lambda msg, *a: got.append(msg % a))
    return got


def _truncate_data(step_dir: pathlib.Path) -> None:
    """Cut every data file of the parameters to half (a write that stopped part-way)."""
    for data in (step_dir / "params").rglob("*"):
        if data.is_file() and data.parent.name == "d":
            with open(data, "r+b") as f:
                f.truncate(data.stat().st_size // 2)


def test_unreadable_newest_checkpoints_are_set_aside_and_the_run_ends_identical(
        tmp_path, uninterrupted, warnings):
    _fit(tmp_path, num_steps=8)
    ckpt = tmp_path / "train" / "checkpoints"
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [2, 4, 6, 8]
    _truncate_data(ckpt / "8")                          # a data file cut short
    (ckpt / "6" / "params" / "manifest.ocdbt").unlink()  # the array index gone
    shutil.rmtree(ckpt / "4" / "meta")                  # an item folder gone
    summary, trainer = _fit(tmp_path)
    assert summary["start_step"] == 2
    _same(_params(trainer), uninterrupted)
    corrupt = tmp_path / "train" / "checkpoints.corrupt"
    assert sorted(p.name.split("-")[0] for p in corrupt.iterdir()) == ["4", "6", "8"]
    moved = [w for w in warnings if "cannot be read" in w]
    assert len(moved) == 3 and all("\n" not in w for w in moved)
    assert "checkpoint step 8 cannot be read" in moved[0] and "/8/params" in moved[0]
    assert "/4/meta" in moved[2] and "checkpoints.corrupt/4-" in moved[2]


def test_export_of_a_broken_step_names_the_step_and_folder(tmp_path):
    _fit(tmp_path, num_steps=2)
    ckpt = tmp_path / "train" / "checkpoints"
    _truncate_data(ckpt / "2")
    with pytest.raises(checkpoints.UnreadableCheckpoint,
                       match=r"checkpoint step 2 cannot be read: .*/2/params: "):
        checkpoints.restore_params(ckpt, None, worker.abstract_params())


def test_other_settings_checkpoints_are_moved_never_deleted(tmp_path, warnings):
    _fit(tmp_path, num_steps=4)
    train_dir = tmp_path / "train"
    before = sorted(p.name for p in (train_dir / "checkpoints").iterdir())
    summary, _ = _fit(tmp_path, num_steps=2, seed=1)        # another trajectory
    assert summary["start_step"] == 0
    (moved_to,) = (train_dir / "checkpoints.superseded").iterdir()
    assert sorted(p.name for p in (moved_to / "checkpoints").iterdir()) == before
    assert (moved_to / "metrics.jsonl").exists()
    (msg,) = [w for w in warnings if "other settings" in w]
    assert str(moved_to) in msg and "move" in msg and "back" in msg


def test_full_disk_in_the_background_writer_is_one_line_and_loses_nothing(
        tmp_path, uninterrupted, monkeypatch):
    from orbax.checkpoint._src.path import atomicity
    cls = atomicity.AtomicRenameTemporaryPath
    real = cls.finalize

    async def full_disk(self):        # the step's last write (its commit file) fails
        if self._final_path.name == "4":
            raise OSError(errno.ENOSPC, "No space left on device", str(self._tmp_path))
        return await real(self)

    monkeypatch.setattr(cls, "finalize", full_disk)
    with pytest.raises(InputError) as got:
        _fit(tmp_path)
    msg = str(got.value)
    assert "\n" not in msg
    assert "no space left on the device to write checkpoint" in msg
    assert "GiB free" in msg and "a checkpoint needs about" in msg
    ckpt = tmp_path / "train" / "checkpoints"
    assert str(ckpt) in msg
    left = sorted(p.name for p in ckpt.iterdir())
    assert "2" in left and any("tmp" in n for n in left), left   # the good one and the cut one
    monkeypatch.setattr(cls, "finalize", real)
    summary, trainer = _fit(tmp_path)
    assert summary["start_step"] == 2
    _same(_params(trainer), uninterrupted)
    assert not [p for p in ckpt.iterdir() if "tmp" in p.name]
