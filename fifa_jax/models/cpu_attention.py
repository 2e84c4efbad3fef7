"""Fused CPU attention: the C++ kernel in `kernels/attention_cpu.cc` as an XLA custom call.

`fused_attention(q, k, v, scale)` is softmax(q k^T * scale) v over (B, T, N, H) / (B, S, N, H)
arrays, forward and gradient, without materialising the (B, N, T, S) scores (see the .cc file
for why). The kernel is compiled on first use with the machine's C++ compiler (`$CXX`, else
`c++`; `-O3 -march=native`) into a cache folder (`$FIFA_JAX_KERNEL_CACHE`, default
`~/.cache/fifa_jax/kernels`), keyed by the source, the flags, the compiler and the CPU, and
registered with `jax.ffi` for the CPU platform. `available()` says whether that worked; where it
did not (no compiler), `models.attention` falls back to its einsum form and says so once.

Inputs of other dtypes are computed in float32 and cast back. Leading dimensions beyond one
batch dimension (and `jax.vmap`) are flattened into the batch by the kernel. Under a sharded
`jit` the custom call is not partitioned by XLA (its operands are gathered): the model's CPU
path is for single-device work and tests, GPUs and TPUs take their own fused kernels.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "attention_cpu.cc")
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-shared",
         "-fPIC")
_TARGETS = {"fifa_attention_fwd": "FifaAttentionForward",
            "fifa_attention_bwd": "FifaAttentionBackward"}


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler_version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0] if out.stdout else cxx


def build(cache_dir: str | None = None) -> str:
    """Compiles the kernel (once per source, flags, compiler and CPU); returns the .so path.

    Raises RuntimeError naming the compiler command and its output when compilation fails."""
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler {cxx!r} on PATH (set $CXX)")
    include = jax.ffi.include_dir()
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([
        source, " ".join(FLAGS).encode(), _compiler_version(cxx).encode(),
        _cpu_signature().encode(), jax.__version__.encode()])).hexdigest()[:16]
    cache_dir = cache_dir or os.environ.get("FIFA_JAX_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fifa_jax", "kernels")
    path = os.path.join(cache_dir, f"attention_cpu-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{include}", SOURCE, "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"compiling the CPU attention kernel failed: {' '.join(cmd)}\n"
                           f"{proc.stderr[-4000:]}")
    os.replace(tmp, path)  # atomic: concurrent builders each write their own temporary file
    return path


_LOCK = threading.Lock()


def _load() -> str | None:
    with _LOCK:   # one build and one registration a process, whichever thread comes first
        return _load_once()


@functools.lru_cache(maxsize=None)
def _load_once() -> str | None:
    """Builds and registers the kernel; returns None (with one warning) if the build fails."""
    import ctypes
    try:
        lib = ctypes.cdll.LoadLibrary(build())
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"fused CPU attention unavailable, using the einsum form: {e}",
                      RuntimeWarning, stacklevel=3)
        return None
    return "ok"


def available() -> bool:
    """Whether the kernel compiled and is registered (builds it on the first call)."""
    return _load() is not None


def _require() -> None:
    if not available():
        raise RuntimeError("the fused CPU attention kernel did not build; see the warning above "
                           "or use attention impl 'einsum'")


def _forward(q, k, v, scale: float):
    _require()
    t, n = q.shape[-3], q.shape[-2]
    call = jax.ffi.ffi_call(
        "fifa_attention_fwd",
        (jax.ShapeDtypeStruct(q.shape, jnp.float32),
         jax.ShapeDtypeStruct(q.shape[:-3] + (n, t), jnp.float32)),
        vmap_method="broadcast_all")
    return call(q, k, v, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, scale: float):
    return _forward(q, k, v, scale)[0]


def _attention_fwd(q, k, v, scale):
    o, lse = _forward(q, k, v, scale)
    return o, (q, k, v, o, lse)


def _attention_bwd(scale, res, do):
    q, k, v, o, lse = res
    _require()
    call = jax.ffi.ffi_call(
        "fifa_attention_bwd",
        (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, jnp.float32),
         jax.ShapeDtypeStruct(v.shape, jnp.float32)),
        vmap_method="broadcast_all")
    return call(q, k, v, o, lse, do.astype(jnp.float32), scale=np.float32(scale))


_attention.defvjp(_attention_fwd, _attention_bwd)


def fused_attention(q, k, v, scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale) v: q (B, T, N, H), k and v (B, S, N, H) -> (B, T, N, H), q's dtype.

    Raises RuntimeError when the kernel is unavailable (see `available()`)."""
    _require()
    if k.shape != v.shape or q.shape[-2:] != k.shape[-2:] or q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"fused attention needs q (B, T, N, H) and k, v (B, S, N, H); got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    f32 = jnp.float32
    out = _attention(q.astype(f32), k.astype(f32), v.astype(f32), scale)
    return out.astype(q.dtype)
