"""Our C++ CPU kernels (`kernels/*.cc`), compiled on first use and registered with `jax.ffi`.

Two kernels, both for XLA's CPU backend, float32: the fused attention (`cpu_attention.py`) and
a convolution's kernel gradient (`conv.py`); each .cc file says why it exists. They are
compiled together into one shared library with the machine's C++ compiler (`$CXX`, else `c++`;
`-O3 -march=native`) into a cache folder (`$FIFA_JAX_KERNEL_CACHE`, default
`~/.cache/fifa_jax/kernels`), keyed by the sources, the flags, the compiler, the CPU and the
jax version, and registered for the CPU platform. `available()` says whether that worked;
where it did not (no compiler), the models fall back to their XLA forms (attention: einsum;
kernel gradient: one matrix product per tap) and say so once.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import jax

KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
SOURCES = tuple(sorted(glob.glob(os.path.join(KERNEL_DIR, "*.cc"))))
HEADERS = tuple(sorted(glob.glob(os.path.join(KERNEL_DIR, "*.h"))))
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-shared",
         "-fPIC")
# jax.ffi target name -> exported handler symbol
TARGETS = {"fifa_attention_fwd": "FifaAttentionForward",
           "fifa_attention_bwd": "FifaAttentionBackward",
           "fifa_conv_forward": "FifaConvForward",
           "fifa_conv_kernel_grad": "FifaConvKernelGrad"}


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
    """Compiles the kernels (once per sources, flags, compiler and CPU); returns the .so path.

    Raises RuntimeError naming the compiler command and its output when compilation fails."""
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler {cxx!r} on PATH (set $CXX)")
    parts = []
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            parts += [os.path.basename(path).encode(), f.read()]
    key = hashlib.sha256(b"\0".join(parts + [
        " ".join(FLAGS).encode(), _compiler_version(cxx).encode(),
        _cpu_signature().encode(), jax.__version__.encode()])).hexdigest()[:16]
    cache_dir = cache_dir or os.environ.get("FIFA_JAX_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fifa_jax", "kernels")
    path = os.path.join(cache_dir, f"fifa_cpu_kernels-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", *SOURCES, "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"compiling the CPU kernels failed: {' '.join(cmd)}\n"
                           f"{proc.stderr[-4000:]}")
    os.replace(tmp, path)  # atomic: concurrent builders each write their own temporary file
    return path


_LOCK = threading.Lock()


def _load() -> str | None:
    with _LOCK:   # one build and one registration a process, whichever thread comes first
        return _load_once()


@functools.lru_cache(maxsize=None)
def _load_once() -> str | None:
    """Builds and registers the kernels; returns None (with one warning) if the build fails."""
    import ctypes
    try:
        lib = ctypes.cdll.LoadLibrary(build())
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"fifa_jax's CPU kernels are unavailable, so attention takes the einsum "
                      f"form and convolution kernel gradients one matrix product per tap "
                      f"(slower, same values up to rounding): {e}", RuntimeWarning,
                      stacklevel=4)
        return None
    return "ok"


def available() -> bool:
    """Whether the kernels compiled and are registered (builds them on the first call)."""
    return _load() is not None


def require(what: str) -> None:
    """Raises RuntimeError unless the kernels are available; `what` names the caller."""
    if not available():
        raise RuntimeError(f"the CPU kernels did not build, so {what} cannot run; see the "
                           f"warning above")
