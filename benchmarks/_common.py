"""Shared bits of the selection benchmarks: environment facts, timing, tables, JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# jemalloc's settings for `--allocator jemalloc`: never hand freed pages back to the kernel.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
                  "/usr/local/lib/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2")


def find_jemalloc() -> str | None:
    """$FIFA_JAX_JEMALLOC, else the usual library paths (Debian/Ubuntu: libjemalloc2)."""
    for path in (os.environ.get("FIFA_JAX_JEMALLOC"),) + JEMALLOC_PATHS:
        if path and os.path.exists(path):
            return path
    return None


def use_allocator(argv: list[str]) -> None:
    """`--allocator jemalloc`: re-run this process with jemalloc preloaded (LD_PRELOAD) and
    JEMALLOC_CONF, so every side of a comparison allocates through it. glibc's malloc hands
    XLA's large per-step buffers back to the kernel after each step, so every step
    page-faults them in again (~100k faults a train step on the CPU); jemalloc with decay off
    keeps them. Exits with a message naming the package when the library is missing."""
    want = "system"
    for i, a in enumerate(argv):
        if a == "--allocator" and i + 1 < len(argv):
            want = argv[i + 1]
        elif a.startswith("--allocator="):
            want = a.split("=", 1)[1]
    if want not in ("system", "jemalloc"):
        sys.exit(f"--allocator: 'system' or 'jemalloc', not {want!r}")
    if want == "system" or os.environ.get("FIFA_JAX_ALLOCATOR") == "jemalloc":
        return
    lib = find_jemalloc()
    if lib is None:
        sys.exit("--allocator jemalloc: libjemalloc.so.2 not found (Debian/Ubuntu: apt install "
                 "libjemalloc2; or set FIFA_JAX_JEMALLOC to the library's path)")
    env = dict(os.environ, FIFA_JAX_ALLOCATOR="jemalloc", MALLOC_CONF=JEMALLOC_CONF,
               LD_PRELOAD=" ".join(x for x in (lib, os.environ.get("LD_PRELOAD", "")) if x))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable] + argv, env)


def allocator() -> str:
    """The allocator this process runs with, for the results."""
    if os.environ.get("FIFA_JAX_ALLOCATOR") == "jemalloc":
        return f"jemalloc ({os.environ.get('LD_PRELOAD', '')}, MALLOC_CONF={JEMALLOC_CONF})"
    return "system malloc"


def environment() -> dict:
    """Device and library versions for the results table."""
    import jax
    import numpy as np
    env = {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__,
           "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
           "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "allocator": allocator()}
    try:
        import jaxlib
        env["jaxlib"] = jaxlib.__version__
    except ImportError:
        pass
    if env["backend"] == "cpu":
        env["load_avg_1m"] = os.getloadavg()[0]
    return env


def timeit(fn, repeats: int, warmup: int = 1):
    """Median wall time of fn() over `repeats` calls after `warmup` calls (fn must sync)."""
    first = None
    for i in range(warmup):
        t = time.perf_counter()
        fn()
        if i == 0:
            first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "first_call_s": first}


def print_table(rows, cols):
    """Fixed-width table: rows are dicts, cols (key, header) pairs."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)
    cells = [[h for _, h in cols]] + [[fmt(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for j, line in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path, payload):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True, default=str)
        print(f"wrote {path}")


def clustered_prompts(rng, pairs: int, prompts: int, d: int, duplicates: int = 0):
    """Pick-a-Pic-like prompts: (pid (pairs,) int64, emb (prompts, d) float32 unit rows).

    64 Gaussian clusters (uneven neighbourhoods); rows 1..duplicates copy row 0 (prompts that
    embed identically); every prompt has at least one pair, the rest drawn uniformly, shuffled.
    Draws from `rng`, so callers continue with their own per-pair values.
    """
    import numpy as np
    centres = rng.standard_normal((64, d), dtype=np.float32)
    emb = centres[rng.integers(0, 64, prompts)] + \
        0.8 * rng.standard_normal((prompts, d), dtype=np.float32)
    emb[1:1 + duplicates] = emb[0]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pid = np.concatenate([np.arange(prompts), rng.integers(0, prompts, pairs - prompts)])
    rng.shuffle(pid)
    return pid, emb
