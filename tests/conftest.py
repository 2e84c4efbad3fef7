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


import pytest  # noqa: E402


@pytest.fixture(params=["auto", "accelerator"])
def forms(request):
    """Run the test in both layer forms: "auto" (on the CPU: our C++ kernels) and
    "accelerator" (what GPUs and TPUs run: XLA convolution, dot and attention)."""
    from fifa_jax.models import platform
    with platform.forms(request.param):
        yield request.param
