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
