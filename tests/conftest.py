"""Test set-up: 8 forced CPU devices, JAX's persistent compilation cache, no GPU.

Must run before jax is imported anywhere, which pytest guarantees for a root conftest.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

_CACHE = os.environ.get("FIFA_JAX_TEST_CACHE",
                        os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The longest test files (minutes each on 2 cores, measured with --durations on 2026-12-03:
# the 2-process pipeline ~290 s, the study ~200 s, the resumes ~200 s, the demo ~170 s, the
# notebook ~90 s) go first, so that pytest-xdist (--dist loadfile hands out files in
# collection order) does not start one of them last and leave the other workers idle.
LONGEST_FIRST = ("tests/parallel/test_multiprocess.py", "tests/demo/test_study_end_to_end.py",
                 "tests/training/test_resume.py", "tests/test_demo_end_to_end.py",
                 "tests/test_notebook.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    root = str(config.rootpath)
    def key(item):
        path = os.path.relpath(str(item.path), root).replace(os.sep, "/")
        return rank.get(path, len(LONGEST_FIRST))
    items.sort(key=key)      # stable: the order within each file and among the rest is kept
