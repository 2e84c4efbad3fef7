"""Preemption: a train run stopped by SIGTERM (saves, exits 143) or killed by SIGKILL after a
checkpoint, then rerun with the same command, ends with parameters bit-identical to an
uninterrupted run (CPU). The command is the README's CLI on a small demo world."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMALL = ["--config.data.demo.n_prompts=30", "--config.data.demo.n_pairs=200",
         "--config.data.demo.rows_per_shard=100", "--config.select.k_pairs=24",
         "--config.score.reward.batch_size=64", "--config.encode.num_val_pairs=8"]
TRAIN = ["--config.stages=train", "--config.train.num_steps=10",
         "--config.train.checkpoint_every=2", "--config.train.eval_every=0",
         "--config.train.log_every=1", "--config.train.batch_size=4",
         "--config.train.grad_accum=2", "--config.train.progress=False"]


def _cmd(workdir, *extra):
    return [sys.executable, "-m", "fifa_jax.main", "--config", str(ROOT / "configs" / "demo.py"),
            "--workdir", str(workdir), *SMALL, *extra]


def _env():
    return dict(os.environ, XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=os.environ.get(
        "FIFA_JAX_TEST_CACHE", str(ROOT / ".jax_cache")))


def _run(workdir, *extra, timeout=600):
    proc = subprocess.run(_cmd(workdir, *extra), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=_env())
    return proc


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A work directory with ingest, score, select and encode done."""
    workdir = tmp_path_factory.mktemp("encoded")
    proc = _run(workdir, "--config.stages=ingest,score,select,encode")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def _params(workdir, step):
    from flax import nnx

    from fifa_jax.models.diffusers_io import read_config
    from fifa_jax.models.unet_io import abstract_unet
    from fifa_jax.training import checkpoints
    unet = read_config(str(workdir / "encode" / "demo_base" / "unet"))
    abstract = nnx.to_pure_dict(nnx.split(abstract_unet(unet))[1])
    params, got = checkpoints.restore_params(workdir / "train" / "checkpoints", step, abstract)
    assert got == step
    return {"/".join(map(str, k)): np.asarray(v)
            for k, v in _flatten(params)}


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


@pytest.fixture(scope="module")
def uninterrupted(encoded, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted") / "w"
    shutil.copytree(encoded, workdir)
    proc = _run(workdir, *TRAIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _params(workdir, 10)


def _train_records(workdir):
    path = workdir / "train" / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:      # a line being written
            pass
    return [r for r in out if r["kind"] == "train"]


def _start_and_stop(workdir, sig, ready, timeout=300):
    """Start the train command, wait until `ready(workdir)`, send `sig` to its process group;
    returns (exit code, stderr)."""
    err = open(workdir / "stderr.log", "w+")
    proc = subprocess.Popen(_cmd(workdir, *TRAIN), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready(workdir):
            assert proc.poll() is None, "the run ended before it could be stopped"
            assert time.monotonic() < deadline, "the run never got ready"
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err.seek(0)
    return rc, err.read()


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sigterm_saves_exits_and_resumes_bit_identically(encoded, uninterrupted, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(encoded, workdir)
    rc, err = _start_and_stop(workdir, signal.SIGTERM,
                              lambda w: any(r["step"] >= 3 for r in _train_records(w)))
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    assert "interrupted: train: stopped by signal 15 after step" in err
    assert not (workdir / "train" / "STAGE_DONE.json").exists()
    stopped_at = int(err.split("after step ")[1].split(";")[0])
    assert 3 <= stopped_at < 10
    assert (workdir / "train" / "checkpoints" / str(stopped_at)).is_dir()
    proc = _run(workdir, *TRAIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in proc.stderr
    _same(_params(workdir, 10), uninterrupted)
    steps = [r["step"] for r in _train_records(workdir)]
    assert steps == list(range(1, 11))        # the resumed log has each step once


def test_sigkill_after_a_checkpoint_resumes_bit_identically(encoded, uninterrupted, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(encoded, workdir)
    ckpt = workdir / "train" / "checkpoints"
    rc, err = _start_and_stop(workdir, signal.SIGKILL, lambda w: (ckpt / "4").is_dir())
    assert rc == -signal.SIGKILL, err[-3000:]
    proc = _run(workdir, *TRAIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step" in proc.stderr
    _same(_params(workdir, 10), uninterrupted)


def test_second_run_on_a_busy_workdir_stops_and_the_first_ends_as_alone(encoded, uninterrupted,
                                                                         tmp_path):
    """The README's command started twice on one work directory: while the first trains, the
    second exits 2 in one line naming the first (pid, host); the first ends with parameters
    bit-identical to a lone run."""
    workdir = tmp_path / "w"
    shutil.copytree(encoded, workdir)
    err = open(workdir.parent / "first.log", "w+")
    first = subprocess.Popen(_cmd(workdir, *TRAIN), cwd=ROOT, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while not _train_records(workdir):
            assert first.poll() is None, "the first run ended before the second could start"
            assert time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)       # held mid-training (alive) while the second
        try:                                     # starts: no race with its 10 quick steps
            second = _run(workdir, *TRAIN)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    lines = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and f"in use by another run: pid {first.pid} on host" in lines[0]
    _same(_params(workdir, 10), uninterrupted)
    assert [r["step"] for r in _train_records(workdir)] == list(range(1, 11))
    assert not (workdir / "RUN.lock").exists()
