"""Shared bits of the selection benchmarks: environment facts, timing, tables, JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def environment() -> dict:
    """Device and library versions for the results table."""
    import jax
    import numpy as np
    env = {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__,
           "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
           "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
           "machine": platform.machine()}
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
