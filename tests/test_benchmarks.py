"""Every benchmark script runs end to end at toy sizes and writes its JSON (GPU time comes in
short leases: a script that breaks there wastes one). Speed is not checked here."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CASES = {   # case: (script, arguments)
    "knn": ("knn", ["--n", "3000", "--d", "32", "--repeats", "1", "--no-sklearn",
                    "--check-rows", "64"]),
    "knn_gpu_branch": ("knn", ["--gpu-size", "2048", "--d", "32", "--repeats", "1",
                               "--no-faiss", "--no-sklearn", "--naive", "--check-rows", "32",
                               "--floor-size", "512"]),
    "greedy": ("greedy", ["--pairs", "3000", "--prompts", "300", "--k-pairs", "60", "--d", "32",
                          "--repeats", "1"]),
    "select_stage": ("select_stage", ["--pairs", "3000", "--prompts", "300", "--k-pairs", "60",
                                      "--d", "32"]),
    "decode": ("decode", ["--images", "16", "--size", "96", "--batch", "8"]),
    "sample": ("sample", ["--toy", "--torch-threads", "1", "--compile-cache", os.environ.get(
        "FIFA_JAX_TEST_CACHE", str(ROOT / ".jax_cache"))]),
    "score": ("score", ["--tiny", "--rounds", "1", "--iters", "1", "--warmup", "1"]),
    "train_step": ("train_step", ["--toy", "--rounds", "1", "--iters", "1", "--torch-threads", "1",
                                  "--compile-cache", os.environ.get(
                                      "FIFA_JAX_TEST_CACHE", str(ROOT / ".jax_cache"))]),
}
sys.path.insert(0, str(ROOT / "benchmarks"))
import _common  # noqa: E402

if _common.find_jemalloc():   # the re-run with jemalloc preloaded, where the library is
    CASES["train_step"][1].extend(["--allocator", "jemalloc"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs(name, tmp_path):
    script, args = CASES[name]
    out = tmp_path / "out.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args,
                           "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    rows = res.get("results") or res.get("rows")
    assert rows, res
    if "--allocator" in args:
        assert res["environment"]["allocator"].startswith("jemalloc ("), res["environment"]


def test_allocator_missing_library_names_the_package(monkeypatch):
    monkeypatch.setattr(_common, "JEMALLOC_PATHS", ())
    monkeypatch.delenv("FIFA_JAX_JEMALLOC", raising=False)
    monkeypatch.delenv("FIFA_JAX_ALLOCATOR", raising=False)
    with pytest.raises(SystemExit, match="apt install libjemalloc2"):
        _common.use_allocator(["script.py", "--allocator", "jemalloc"])
    with pytest.raises(SystemExit, match="'system' or 'jemalloc'"):
        _common.use_allocator(["script.py", "--allocator=tcmalloc"])
    _common.use_allocator(["script.py"])          # the default: no re-run
    assert _common.allocator() == "system malloc"


@pytest.mark.skipif(_common.find_jemalloc() is None, reason="no libjemalloc on this machine")
def test_allocator_reruns_with_jemalloc_loaded(tmp_path):
    """The script runs again with jemalloc mapped into the process, once (no loop)."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "import _common\n"
        "print('start', flush=True)\n"
        "_common.use_allocator(sys.argv)\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('jemalloc mapped:', 'libjemalloc' in maps, _common.allocator())\n")
    env = {k: v for k, v in os.environ.items() if k != "FIFA_JAX_ALLOCATOR"}
    proc = subprocess.run([sys.executable, str(script), "--allocator", "jemalloc"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("start") == 2 and "jemalloc mapped: True jemalloc (" in \
        proc.stdout, proc.stdout
