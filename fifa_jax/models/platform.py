"""Which form of a layer runs: decided by the platform a computation is lowered for.

The models have two forms of a few layers. The CPU form calls our C++ kernels (convolution,
linear weight gradient, attention: custom calls that exist only in XLA's CPU backend); the
accelerator form is plain JAX (XLA convolution and autodiff, `jnp.dot`, XLA attention), with
cuDNN attention on GPUs and Pallas flash attention on TPUs where their shape rules allow
(`attention.py`). The choice is made by `jax.lax.platform_dependent`: both forms are traced,
and when the program is lowered, only the branch of the platform it is lowered for is kept.
So a train step lowered for a TPU slice from a CPU-only host (`fifa_jax.aot`) holds no CPU
custom call, whatever `jax.default_backend()` says.

The accelerator form on the CPU: set the environment variable FIFA_JAX_FORMS=accelerator, or
trace inside `with platform.forms("accelerator"):`. Every layer then takes its accelerator
form on every platform (the TPU / GPU kernels still only where lowered for them), so the code
a GPU or TPU runs can be run and tested on the CPU. The tests run the model and trainer suites
in both forms (tests/conftest.py's `forms` fixture).

    forms_name() -> "auto" | "accelerator"
    choose(*args, cpu=f_cpu, default=f_acc, tpu=..., cuda=...)   # the dispatch
    device_platform(mesh=None) -> "cpu" | "tpu" | "gpu"         # where a mesh's devices are
    compute_dtype_name("auto", mesh) -> "bfloat16" on accelerators, "float32" on the CPU
"""
from __future__ import annotations

import contextlib
from typing import Callable

import jax
from jax._src import config as jax_config

ENV = "FIFA_JAX_FORMS"
FORMS = ("auto", "accelerator")
# A JAX config state (read from $FIFA_JAX_FORMS at import) that is part of jit's cache key and
# trace context, so a function traced under one form is never reused under the other. (jax's
# `enum_state` is internal API; the public config has no way to add a keyed option.)
_STATE = jax_config.enum_state(
    "fifa_jax_forms", list(FORMS), default="auto", include_in_jit_key=True,
    include_in_trace_context=True,
    help="auto: each platform its own layer forms; accelerator: the accelerator forms on "
         "every platform (the CPU included)")


def forms_name() -> str:
    """The forms in force: the innermost `forms(...)` block, else $FIFA_JAX_FORMS (read at
    import), else "auto" (each platform its own form)."""
    return _STATE.value


def accelerator_forms() -> bool:
    """True when every platform, the CPU included, takes the accelerator forms."""
    return forms_name() == "accelerator"


@contextlib.contextmanager
def forms(name: str):
    """Trace with `name` forms ("auto" | "accelerator") inside the block."""
    if name not in FORMS:
        raise ValueError(f"forms must be one of {FORMS}, got {name!r}")
    with _STATE(name):
        yield


def has_gpu_backend() -> bool:
    """A GPU backend is loaded in this process (needed to trace cuDNN calls at all)."""
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def choose(*args, cpu: Callable | None = None, default: Callable,
           tpu: Callable | None = None, cuda: Callable | None = None):
    """`default(*args)`, or the branch of the platform the program is lowered for.

    `cpu` is dropped under the accelerator forms; `cuda` (cuDNN calls cannot even be traced
    without a GPU backend) only when this process has one. With no platform branch left the
    default is called directly (no conditional in the program).
    """
    branches = {}
    if cpu is not None and not accelerator_forms():
        branches["cpu"] = cpu
    if tpu is not None:
        branches["tpu"] = tpu
    if cuda is not None and has_gpu_backend():
        branches["cuda"] = cuda
    if not branches:
        return default(*args)
    return jax.lax.platform_dependent(*args, default=default, **branches)


def device_platform(mesh=None) -> str:
    """The platform of `mesh`'s devices ("cpu", "tpu", "gpu"), else of the default device.

    For host-side choices that cannot wait for lowering (tile sizes, loop forms)."""
    dev = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    return "gpu" if dev.platform in ("cuda", "rocm", "gpu") else dev.platform


def compute_dtype_name(name: str, mesh=None) -> str:
    """A sampler's compute dtype: "auto" is bfloat16 on accelerators (half the memory and
    the matrix units' rate; float32 sampling with guidance needs ~8.6 GB a self-attention
    layer at SD1.5's batch of 8 under XLA's attention) and float32 on the CPU."""
    if name != "auto":
        return name
    return "float32" if device_platform(mesh) == "cpu" else "bfloat16"
