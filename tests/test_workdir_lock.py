"""One run per work directory (workdir_lock.py, pipeline.run_pipeline): a live holder stops a
second run in one line naming it (also the real CLI, started while the first run is inside a
stage, and the first then ends as a lone run would); a lock left by a dead process is taken
over with a message; another host's lock is refused with how to remove it; the lock is gone
after a run, also one that failed."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import ml_collections
import pytest

from fifa_jax import pipeline, workdir_lock
from fifa_jax.pipeline import PipelineError, Stage

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _holder(pid, host=None, start=None):
    return {"host": host or socket.gethostname(), "pid": pid,
            "start_time": start if start is not None else workdir_lock._start_time(pid),
            "since": "2026-12-06T00:00:00+00:00", "command": "python -m fifa_jax.main ..."}


def _write_lock(workdir, record):
    (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(record))


@pytest.fixture
def child():
    """A live process of this host (not us), killed after the test."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def test_acquire_release_and_live_holder_named(tmp_path, child):
    record = workdir_lock.acquire(tmp_path)
    assert json.loads((tmp_path / "RUN.lock").read_text())["pid"] == os.getpid()
    workdir_lock.release(tmp_path, record)
    assert not (tmp_path / "RUN.lock").exists()
    _write_lock(tmp_path, _holder(child.pid))
    with pytest.raises(workdir_lock.LockedError,
                       match=rf"in use by another run: pid {child.pid} on host "
                             rf"{socket.gethostname()} .*wait for it to end"):
        workdir_lock.acquire(tmp_path)
    assert json.loads((tmp_path / "RUN.lock").read_text())["pid"] == child.pid   # untouched


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, _holder(dead.pid, start="1"))
    said = []
    record = workdir_lock.acquire(tmp_path, echo=said.append)
    assert record["pid"] == os.getpid()
    assert len(said) == 1 and f"stale lock {tmp_path}/RUN.lock of pid {dead.pid}" in said[0]
    # a reused pid (same number, another start time) is not the holder either
    workdir_lock.release(tmp_path, record)
    _write_lock(tmp_path, _holder(os.getppid(), start="-1"))
    assert workdir_lock.acquire(tmp_path, echo=said.append)["pid"] == os.getpid()


def test_lock_of_another_host_is_refused_with_how_to_remove_it(tmp_path):
    _write_lock(tmp_path, _holder(12345, host="tpu-vm-worker-3", start="7"))
    with pytest.raises(workdir_lock.LockedError,
                       match=r"pid 12345 on host tpu-vm-worker-3 .*if that run has ended, "
                             r"delete .*RUN.lock"):
        workdir_lock.acquire(tmp_path)


def _stage_module(name, during=None):
    import types
    module = types.ModuleType(name)

    def run(config, workdir):
        if during is not None:
            during(workdir)
        out = workdir / name.rsplit(".", 1)[-1]
        out.mkdir(parents=True, exist_ok=True)
        (out / "out.json").write_text(json.dumps({"v": config.a.v}))
        return {"rows": 1}

    module.run = run
    return module


@pytest.fixture
def one_stage(monkeypatch):
    def install(during=None):
        stage = Stage("a", "fakelock.a", ("a",), ())
        monkeypatch.setitem(sys.modules, stage.module, _stage_module(stage.module, during))
        monkeypatch.setattr(pipeline, "STAGES", (stage,))
        monkeypatch.setattr(pipeline, "STAGE_BY_NAME", {"a": stage})
    return install


def _config():
    return ml_collections.ConfigDict({"stages": "a", "a": {"v": 1}})


def test_second_cli_run_during_a_run_exits_in_one_line_naming_the_first(
        tmp_path, one_stage):
    """While stage `a` of the first run (this process) runs, the README's CLI is started on the
    same work directory: it must exit 2 with one line naming this process; the first run then
    ends with the same outputs as a lone run, and no lock is left."""
    seen = {}

    def second_run(workdir):
        proc = subprocess.run(
            [sys.executable, "-m", "fifa_jax.main", "--config",
             str(ROOT / "configs" / "demo.py"), "--workdir", str(workdir)],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
            env=dict(os.environ, JAX_PLATFORMS="cpu"))
        seen.update(rc=proc.returncode, err=proc.stderr, listing=sorted(os.listdir(workdir)))

    one_stage(during=second_run)
    pipeline.run_pipeline(_config(), tmp_path / "w", echo=lambda m: None)
    assert seen["rc"] == 2, seen["err"][-2000:]
    lines = [ln for ln in seen["err"].splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, seen["err"][-2000:]
    assert f"in use by another run: pid {os.getpid()} on host {socket.gethostname()}" in lines[0]
    assert "Traceback" not in seen["err"]
    assert seen["listing"] == ["RUN.lock"]           # the second run wrote nothing
    lone = tmp_path / "lone"
    one_stage()
    pipeline.run_pipeline(_config(), lone, echo=lambda m: None)
    assert ((tmp_path / "w" / "a" / "out.json").read_text()
            == (lone / "a" / "out.json").read_text())
    assert not (tmp_path / "w" / "RUN.lock").exists()


def test_lock_is_released_when_a_stage_fails(tmp_path, one_stage):
    def fail(workdir):
        raise RuntimeError("boom")

    one_stage(during=fail)
    with pytest.raises(RuntimeError, match="boom"):
        pipeline.run_pipeline(_config(), tmp_path, echo=lambda m: None)
    assert not (tmp_path / "RUN.lock").exists()


def test_run_pipeline_refuses_a_held_directory(tmp_path, one_stage, child):
    one_stage()
    _write_lock(tmp_path, _holder(child.pid))
    with pytest.raises(PipelineError, match=f"pid {child.pid}"):
        pipeline.run_pipeline(_config(), tmp_path, echo=lambda m: None)
    assert not (tmp_path / "a").exists()
