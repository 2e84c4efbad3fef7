"""The README's command (`python -m fifa_jax.main`) as the end-to-end tests run it: one CPU
device, as a user would, and the suite's compilation cache."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(config: str, workdir, *args, timeout: float = 900) -> str:
    """Runs configs/<config> on `workdir` with `args`; asserts it succeeds; returns stdout."""
    env = dict(os.environ, XLA_FLAGS="",
               JAX_COMPILATION_CACHE_DIR=os.environ.get("FIFA_JAX_TEST_CACHE",
                                                        str(ROOT / ".jax_cache")))
    proc = subprocess.run(
        [sys.executable, "-m", "fifa_jax.main", "--config", str(ROOT / "configs" / config),
         "--workdir", str(workdir), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout
