"""One process of a multi-process (multi-host) check, started by test_multiprocess.py.

    python -m tests.parallel._multiprocess_worker knn|plan OUT_DIR

The process joins the others through `fifa_jax.parallel.initialize_distributed` (environment:
FIFA_JAX_COORDINATOR, FIFA_JAX_NUM_PROCESSES, FIFA_JAX_PROCESS_ID; XLA_FLAGS forces the local
CPU device count), builds the global mesh over every process's devices, runs the sharded k-NN
on fixed inputs and writes OUT_DIR/knn_<process id>.npz (every process gets the whole result);
`plan` checks that every process takes process 0's stage plan (and its errors).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402


def knn_inputs() -> list[tuple[str, np.ndarray, dict]]:
    """(name, x (N, d) float32, knn kwargs): several tiles (matmul path) and the direct path."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((203, 16)).astype(np.float32)
    x[7] = x[3]                                  # a duplicate: distance 0, ties by index
    low = rng.standard_normal((150, 3)).astype(np.float32)
    return [("tiled", x, {"k": 5, "tile": 64}), ("direct", low, {"k": 4, "tile": 48})]


def _knn(out_dir: str) -> None:
    import jax
    from fifa_jax import parallel
    from fifa_jax.selection.knn import knn

    parallel.initialize_distributed("on")
    mesh = parallel.make_mesh(parallel.default_config())
    assert jax.process_count() > 1, "expected several processes"
    result = {"process_count": np.int64(jax.process_count()),
              "device_count": np.int64(jax.device_count())}
    for name, x, kw in knn_inputs():
        dist, idx = knn(x, kw["k"], mesh=mesh, tile=kw["tile"])
        result[f"{name}_dist"] = np.asarray(dist)
        result[f"{name}_idx"] = np.asarray(idx)
    np.savez(os.path.join(out_dir, f"knn_{jax.process_index()}.npz"), **result)
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("knn:written")


def _plan(out_dir: str) -> None:
    """Every process asks `_plan_on_leader` with a plan of its own: all must get process 0's,
    and process 0's PipelineError must reach all of them."""
    import json

    import jax
    from fifa_jax import parallel, pipeline

    parallel.initialize_distributed("on")
    me = jax.process_index()
    got = pipeline._plan_on_leader(lambda: {"made_by": me, "steps": ["x" * (100 + 50 * me)]})

    def fail():
        if me == 0:
            raise pipeline.PipelineError("stage 'b' is out of date (process 0's view)")
        return {"made_by": me}
    try:
        pipeline._plan_on_leader(fail)
        error = None
    except pipeline.PipelineError as e:
        error = str(e)
    with open(os.path.join(out_dir, f"plan_{me}.json"), "w") as f:
        json.dump({"plan": got, "error": error}, f)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("knn", "plan"):
        print(f"usage: {argv[0]} knn|plan OUT_DIR", file=sys.stderr)
        return 2
    (_knn if argv[1] == "knn" else _plan)(argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
