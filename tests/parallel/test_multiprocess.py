"""Multi-host operation, as two JAX processes on this machine (CPU, gloo collectives).

Each process has 2 forced CPU devices and joins the other through `jax.distributed` (set up by
`fifa_jax.parallel.initialize_distributed` from FIFA_JAX_COORDINATOR / FIFA_JAX_NUM_PROCESSES /
FIFA_JAX_PROCESS_ID, coordinator on 127.0.0.1), so the global mesh has 4 devices over 2
processes. Checked against one process with 4 devices:
  - the sharded k-NN gives bit-identical distances and indices on every process;
  - the demo pipeline (ingest on process 0, every other stage on both) writes the same
    select/manifest.parquet bytes, the same score/margins.parquet values, the same encoded
    pairs, and after 3 train steps parameters equal to the one-process run's (the exported
    UNet);
  - a failure in a process-0-only stage stops every process at once (no barrier hang);
  - FSDP training split over both processes (the tiny UNet through `train.fit`): every process
    writes its own shards of the checkpoints, a run killed (SIGKILL) after a checkpoint resumes
    from it, a SIGTERM that reached one process stops both at the next log / checkpoint step,
    checkpoints of other settings are removed by both (no hang), and the parameters equal a
    one-process run's.
Every subprocess runs under a deadline and is killed (its process group) on the way out.
"""
from __future__ import annotations

import filecmp
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from fifa_jax.errors import InputError
from fifa_jax.parallel import mesh as mesh_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
N_PROC = 2
LOCAL_DEVICES = 2
DEMO_ARGS = ["--config", "configs/demo.py", "--config.data.demo.n_prompts=30",
             "--config.data.demo.n_pairs=200", "--config.select.k_pairs=20",
             "--config.encode.num_val_pairs=8", "--config.train.num_steps=3",
             "--config.train.eval_every=0", "--config.train.checkpoint_every=0",
             "--config.train.progress=False",
             "--config.stages=ingest,score,select,encode,train,export"]
DEMO_STAGES = "['ingest', 'score', 'select', 'encode', 'train', 'export']"
_DIST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS",
             "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT",
             "JAX_COORDINATOR_BIND_ADDRESS",
             mesh_lib.ENV_COORDINATOR, mesh_lib.ENV_NUM_PROCESSES, mesh_lib.ENV_PROCESS_ID)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(n_devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
               # the test session's persistent compilation cache (tests/conftest.py)
               JAX_COMPILATION_CACHE_DIR=os.environ.get(
                   "FIFA_JAX_TEST_CACHE", str(ROOT / ".jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run_all(cmds: list[list[str]], envs: list[dict], logs: pathlib.Path,
             timeout: float, until=None) -> list[int]:
    """Start every command at once, wait for all under one deadline; returns exit codes.

    `until`: a callable polled while they run; once it returns True every process is killed
    (SIGKILL) and the codes are returned (a process that exits before is a failure).
    Each process gets its own session (process group), killed at the deadline or on error.
    """
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        for i, (cmd, env) in enumerate(zip(cmds, envs)):
            with open(logs / f"proc{i}.log", "wb") as out:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        while until is not None and not until():
            if any(p.poll() is not None for p in procs):
                pytest.fail("a process ended before it was to be killed:\n"
                            + _tails(logs, len(cmds)))
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmds[0], timeout)
            time.sleep(0.1)
        for p in procs if until is not None else ():
            os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        return [p.returncode for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"processes still running after {timeout} s:\n" + _tails(logs, len(cmds)))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _tails(logs: pathlib.Path, n: int, chars: int = 3000) -> str:
    out = []
    for i in range(n):
        path = logs / f"proc{i}.log"
        text = path.read_text(errors="replace") if path.exists() else "(no log)"
        out.append(f"--- process {i} ({path}) ---\n{text[-chars:]}")
    return "\n".join(out)


def _full_logs(logs: pathlib.Path) -> list[str]:
    return [(logs / f"proc{i}.log").read_text(errors="replace") for i in range(N_PROC)]


def _multiprocess(cmd: list[str], logs: pathlib.Path, timeout: float, until=None,
                 **extra) -> list[int]:
    """Run `cmd` as N_PROC processes of one distributed job (coordinator on 127.0.0.1);
    `until`: see `_run_all`."""
    coord = f"127.0.0.1:{_free_port()}"
    envs = [_env(LOCAL_DEVICES, JAX_COORDINATOR_BIND_ADDRESS=coord,  # loopback only
                 **{mesh_lib.ENV_COORDINATOR: coord, mesh_lib.ENV_NUM_PROCESSES: N_PROC,
                    mesh_lib.ENV_PROCESS_ID: i}, **extra)
            for i in range(N_PROC)]
    return _run_all([cmd] * N_PROC, envs, logs, timeout, until)


def test_env_variables_give_initialize_arguments(monkeypatch):
    for k in _DIST_ENV:
        monkeypatch.delenv(k, raising=False)
    assert not mesh_lib._wants_distributed("auto") and mesh_lib._explicit_args() == {}
    monkeypatch.setenv(mesh_lib.ENV_COORDINATOR, "127.0.0.1:1234")
    monkeypatch.setenv(mesh_lib.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(mesh_lib.ENV_PROCESS_ID, "1")
    assert mesh_lib._wants_distributed("auto")
    assert mesh_lib._explicit_args() == {"coordinator_address": "127.0.0.1:1234",
                                         "num_processes": 2, "process_id": 1}
    monkeypatch.setenv(mesh_lib.ENV_PROCESS_ID, "2")
    with pytest.raises(ValueError, match="FIFA_JAX_PROCESS_ID=2"):
        mesh_lib._explicit_args()
    monkeypatch.setenv(mesh_lib.ENV_PROCESS_ID, "x")
    with pytest.raises(ValueError, match="FIFA_JAX_PROCESS_ID must be an integer"):
        mesh_lib._explicit_args()


def test_hosts_compare_signals_only_at_sync_steps(monkeypatch):
    """Several processes: whether a signal stops the run is one all-gather, made only at the
    steps every process syncs at anyway (the step number decides, never a local signal);
    one process: any signal stops after the current step, no collective."""
    import jax

    from fifa_jax.training import train

    calls = []

    def on_any_host(flag):
        calls.append(flag)
        return True                      # some other process got a signal

    monkeypatch.setattr(train.hosts, "on_any_host", on_any_host)
    assert train._stop_for_signal([], sync_step=True) is False      # one process
    assert train._stop_for_signal([signal.SIGTERM], sync_step=False) is True
    assert calls == []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert train._stop_for_signal([signal.SIGTERM], sync_step=False) is False
    assert train._stop_for_signal([], sync_step=False) is False
    assert calls == []                   # no collective between sync steps, signal or not
    assert train._stop_for_signal([], sync_step=True) is True
    assert train._stop_for_signal([signal.SIGINT], sync_step=True) is True
    assert calls == [False, True]


def test_processes_that_see_other_checkpoints_stop_with_one_line(monkeypatch, tmp_path):
    """Resume decisions are process 0's steps; a process whose manager does not list them
    (stale view of shared storage) makes every process stop before Orbax's collective calls."""
    import jax

    from fifa_jax.training import train

    class Manager:
        def __init__(self, steps):
            self.steps = steps

        def all_steps(self):
            return self.steps

    assert train._leader_steps(Manager([4, 2]), tmp_path) == [2, 4]     # one process
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(train.hosts, "bytes_from_leader", lambda data: b"[2, 4]")
    monkeypatch.setattr(train.hosts, "on_all_hosts", lambda flag: flag)
    assert train._leader_steps(Manager([2, 4, 6]), tmp_path) == [2, 4]
    with pytest.raises(InputError) as e:
        train._leader_steps(Manager([2]), tmp_path)
    assert "\n" not in str(e.value)
    assert str(e.value) == (f"train: the processes see different checkpoints in {tmp_path} "
                            f"(process 0: [2, 4], process 1: [2]); every host must see the "
                            f"same storage (or rerun with --force=train)")


def test_knn_on_two_processes_equals_one_process(tmp_path):
    from fifa_jax import parallel
    from fifa_jax.selection.knn import knn
    from tests.parallel._multiprocess_worker import knn_inputs

    cmd = [sys.executable, "-m", "tests.parallel._multiprocess_worker", "knn", str(tmp_path)]
    rcs = _multiprocess(cmd, tmp_path / "logs", timeout=240)
    assert rcs == [0] * N_PROC, _tails(tmp_path / "logs", N_PROC)

    import jax
    mesh = parallel.make_mesh(parallel.default_config(),
                              devices=jax.devices()[:N_PROC * LOCAL_DEVICES])
    got = [np.load(tmp_path / f"knn_{rank}.npz") for rank in range(N_PROC)]
    for g in got:
        assert int(g["process_count"]) == N_PROC
        assert int(g["device_count"]) == N_PROC * LOCAL_DEVICES
    for name, x, kw in knn_inputs():
        dist, idx = knn(x, kw["k"], mesh=mesh, tile=kw["tile"])
        # the one-process result is the exact k-NN (float64 brute force, ties by index) ...
        d = np.sqrt(((x[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        want = np.lexsort((np.broadcast_to(np.arange(x.shape[0]), d.shape), d), axis=1)
        np.testing.assert_array_equal(idx, want[:, :kw["k"]], err_msg=name)
        np.testing.assert_allclose(dist, np.take_along_axis(d, want[:, :kw["k"]], 1),
                                   atol=1e-5, err_msg=name)
        # ... and every process of the two-process run holds exactly the same arrays
        for rank, g in enumerate(got):
            np.testing.assert_array_equal(g[f"{name}_idx"], idx, err_msg=f"{name} rank {rank}")
            np.testing.assert_array_equal(g[f"{name}_dist"], dist,
                                          err_msg=f"{name} rank {rank}")


def test_every_process_takes_process_0s_plan(tmp_path):
    """Hosts may see files differently (local checkpoint copies, stale NFS attributes): the
    runner's skip/run plan, and its errors, come from process 0."""
    cmd = [sys.executable, "-m", "tests.parallel._multiprocess_worker", "plan", str(tmp_path)]
    rcs = _multiprocess(cmd, tmp_path / "logs", timeout=240)
    assert rcs == [0] * N_PROC, _tails(tmp_path / "logs", N_PROC)
    for i in range(N_PROC):
        got = json.loads((tmp_path / f"plan_{i}.json").read_text())
        assert got["plan"] == {"made_by": 0, "steps": ["x" * 100]}
        assert got["error"] == "stage 'b' is out of date (process 0's view)"


@pytest.mark.slow
def test_demo_pipeline_on_two_processes_equals_one_process(tmp_path):
    main = [sys.executable, "-m", "fifa_jax.main", *DEMO_ARGS]
    one, two = tmp_path / "one", tmp_path / "two"
    rcs = _run_all([main + ["--workdir", str(one)]], [_env(N_PROC * LOCAL_DEVICES)],
                   tmp_path / "logs_one", timeout=900)
    assert rcs == [0], _tails(tmp_path / "logs_one", 1)
    rcs = _multiprocess(main + ["--workdir", str(two)], tmp_path / "logs_two", timeout=900)
    assert rcs == [0] * N_PROC, _tails(tmp_path / "logs_two", N_PROC)

    logs = [(tmp_path / "logs_two" / f"proc{i}.log").read_text() for i in range(N_PROC)]
    assert all(f"ran {DEMO_STAGES}" in t for t in logs), _tails(
        tmp_path / "logs_two", N_PROC)
    assert filecmp.cmp(one / "select" / "manifest.parquet", two / "select" / "manifest.parquet",
                       shallow=False), "select/manifest.parquet differs between 1 and 2 processes"
    a = pq.read_table(one / "score" / "margins.parquet")
    b = pq.read_table(two / "score" / "margins.parquet")
    assert a.num_rows == b.num_rows > 0
    assert a.equals(b), "score/margins.parquet values differ between 1 and 2 processes"
    np.testing.assert_array_equal(np.load(one / "score" / "prompt_embeddings.npy"),
                                  np.load(two / "score" / "prompt_embeddings.npy"))
    assert (pq.read_table(one / "score" / "prompt_scores.parquet").drop(["judge_model"])
            .equals(pq.read_table(two / "score" / "prompt_scores.parquet")
                    .drop(["judge_model"])))  # judge_model names the work directory's file
    from fifa_jax.training.pair_dataset import data_source
    for split in ("train", "validation"):
        a, b = data_source(one / "encode", "pairs", split), data_source(two / "encode", "pairs",
                                                                           split)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            for k, v in a[i].items():
                np.testing.assert_array_equal(v, b[i][k], err_msg=f"{split}[{i}].{k}")
    # 3 train steps: the exported parameters of both runs (every host reads its own rows of
    # the same global batches; the gradients are summed over the same 4 devices)
    from safetensors.numpy import load_file
    w1 = load_file(one / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(two / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(one / "encode" / "demo_base" / "unet" /
                     "diffusion_pytorch_model.safetensors")
    assert w1.keys() == w2.keys() == base.keys()
    assert any(np.abs(w1[k] - base[k]).max() > 0 for k in w1)      # training moved them
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-6, err_msg=k)


def test_failure_on_process_0_stops_every_process(tmp_path):
    cmd = [sys.executable, "-m", "fifa_jax.main", *DEMO_ARGS, "--workdir", str(tmp_path / "w"),
           "--config.data.format=jsonl", f"--config.data.path={tmp_path / 'missing.jsonl'}"]
    t0 = time.monotonic()
    rcs = _multiprocess(cmd, tmp_path / "logs", timeout=240)
    logs = _tails(tmp_path / "logs", N_PROC)
    assert rcs == [2] * N_PROC, logs
    assert "stage 'ingest' failed on its input" in logs
    assert "stage 'ingest' failed on process 0" in logs
    assert time.monotonic() - t0 < 60, logs


# the FSDP train check: sync (log / checkpoint) steps 3, 5 and 6
FSDP_TRAIN = {"seed": 1, "num_steps": 6, "checkpoint_every": 3, "log_every": 5}


@pytest.mark.slow
def test_fsdp_training_killed_resumed_and_restarted_on_two_processes(tmp_path):
    """Parameters split between the processes (mesh data 1 x fsdp 4, through `train.fit`):
    each process saves its own shards (the old save gathered the model: impossible here); a
    checkpoint of other settings is removed by both processes (Orbax's delete is collective:
    process 0 alone hung); a run killed after its step-3 checkpoint resumes from it; a SIGTERM
    that reached process 1 before step 4 stops both processes after step 5 (the next step
    where the hosts compare: they exchange nothing at step 4) with the same checkpoint. The
    parameters at steps 3 and 5 equal a one-process run's."""
    import jax

    from fifa_jax.training import checkpoints, train
    from tests.parallel import _fsdp_train_worker as worker

    work, one = tmp_path / "two", tmp_path / "one"
    ckpt = work / train.STAGE / train.CKPT_DIR
    # one process, 4 devices, the same schedule to step 5
    trainer = worker.make_trainer(FSDP_TRAIN, jax.devices()[:N_PROC * LOCAL_DEVICES])
    ref = worker.run(one, dict(FSDP_TRAIN, num_steps=5), trainer)
    assert (ref["start_step"], ref["final_step"], ref["checkpoints"]) == (0, 5, [3, 5])
    # in the two-process work dir: a checkpoint of other settings (its settings hash is a
    # seed-0 run's; the hash alone decides whether a checkpoint can be resumed)
    mgr = checkpoints.manager(ckpt, max_to_keep=1)
    other = train.trajectory_hash(worker.config(dict(FSDP_TRAIN, seed=0)), work)
    checkpoints.save(mgr, trainer.state, {"compat": other, "loader": {"position": 5}})
    mgr.wait_until_finished()
    mgr.close()
    del trainer

    def cmd(**over):
        return [sys.executable, "-m", "tests.parallel._fsdp_train_worker", str(work),
                json.dumps(dict(FSDP_TRAIN, **over))]

    # 1. both processes remove that checkpoint, train 3 steps, save step 3; their loaders then
    # block on step 4's pairs and both processes are killed
    def saved_3_and_blocked():
        return (ckpt / "3").is_dir() and all((work / f"hang_{i}.txt").exists()
                                             for i in range(N_PROC))
    rcs = _multiprocess(cmd(hang_at=3), tmp_path / "logs_kill", timeout=300,
                        until=saved_3_and_blocked)
    logs = _tails(tmp_path / "logs_kill", N_PROC)
    assert rcs == [-signal.SIGKILL] * N_PROC, logs
    assert sorted(p.name for p in ckpt.iterdir()) == ["3"], logs
    assert all("made with other settings" in text
               for text in _full_logs(tmp_path / "logs_kill")), logs
    for i in range(N_PROC):
        layout = json.loads((work / f"layout_{i}.json").read_text())
        assert layout["mesh"] == {"data": 1, "fsdp": N_PROC * LOCAL_DEVICES}
        # the kernels are split between the processes (biases and norm scales replicated):
        # each holds little more than half of the parameters
        assert layout["split"] > layout["params"] // 4, layout
        assert layout["held"] < 0.6, layout

    # 2. rerun: resumes from step 3; process 1 gets SIGTERM while reading step 4's pairs
    rcs = _multiprocess(cmd(signal_at={"position": 3, "process": 1}),
                        tmp_path / "logs_resume", timeout=300)
    logs = _tails(tmp_path / "logs_resume", N_PROC)
    assert rcs == [128 + signal.SIGTERM] * N_PROC, logs
    assert all("resumed from step 3" in text
               for text in _full_logs(tmp_path / "logs_resume")), logs
    for i in range(N_PROC):
        got = json.loads((work / f"result_{i}.json").read_text())
        assert got["step"] == 5, got
    assert sorted(int(p.name) for p in ckpt.iterdir()) == [3, 5], logs

    abstract = worker.abstract_params()
    here = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    for step in (3, 5):
        two_params, _ = checkpoints.restore_params(ckpt, step, abstract, here)
        one_params, _ = checkpoints.restore_params(one / train.STAGE / train.CKPT_DIR, step,
                                                   abstract, here)
        two_flat, one_flat = jax.tree.leaves(two_params), jax.tree.leaves(one_params)
        assert len(two_flat) == len(one_flat) == len(jax.tree.leaves(abstract))
        for a, b in zip(two_flat, one_flat):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6,
                                       err_msg=f"step {step}")
        if step == 3:
            at_3 = one_flat
    assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4      # training moved them
               for a, b in zip(at_3, one_flat))
