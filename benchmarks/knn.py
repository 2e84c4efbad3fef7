"""Exact k-NN speed: `fifa_jax.selection.knn` against faiss-cpu, scikit-learn and the floor.

CPU (the issue's target: not slower than faiss-cpu IndexFlatL2 on the same data, same run):
    python benchmarks/knn.py --n 50000 --out /tmp/knn_cpu.json
GPU (target: within 1.3x of the bf16 matmul floor 2 N^2 d / peak, measured in the same run):
    python benchmarks/knn.py --gpu-size 1048576 --out /tmp/knn_gpu.json

Data: N unit-norm float32 rows (Gaussian, 1% exact duplicates), d = 768, k = 10, self
excluded. Times are medians of `--repeats` calls after one warm-up call (compile excluded;
the first call is reported too). Every method's distances are checked against an exact
float32 brute force on `--check-rows` random rows (max abs distance error, index recall).
The bf16 "floor" is 2 N^2 d divided by the bf16 matmul rate of an 8192^3 matmul timed here;
our kernel uses the distance matrix's symmetry, so it does about half of those FLOPs.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import environment, print_table, timeit, write_json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fifa_jax.selection.knn import knn  # noqa: E402


def make_data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    dup = rng.choice(n, size=n // 100, replace=False)
    x[dup[: len(dup) // 2]] = x[dup[len(dup) // 2: 2 * (len(dup) // 2)]]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def check(x, dist, idx, k, rows):
    """Max |dist - exact| and index recall on `rows` against an exact float32 brute force."""
    xd = jnp.asarray(x)
    q = xd[rows]
    d2 = (jnp.sum(q * q, 1)[:, None] + jnp.sum(xd * xd, 1)[None, :]
          - 2.0 * jnp.dot(q, xd.T, precision=jax.lax.Precision.HIGHEST))
    d2 = d2.at[jnp.arange(len(rows)), rows].set(jnp.inf)
    nd2, ni = jax.lax.top_k(-d2, k)
    # recompute the reference distances exactly from differences
    ref = np.sqrt(np.sum((np.asarray(x)[rows][:, None, :] - np.asarray(x)[np.asarray(ni)]) ** 2,
                         axis=-1, dtype=np.float64))
    ref = np.sort(ref, axis=1)
    got = np.asarray(dist)[rows]
    gi = np.asarray(idx)[rows]
    recall = np.mean([len(set(a) & set(b)) / k
                      for a, b in zip(gi.tolist(), np.asarray(ni).tolist())])
    return {"max_abs_dist_err": float(np.max(np.abs(got - ref))), "index_recall": float(recall)}


def bf16_peak(size=8192, repeats=10):
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b))
    t = timeit(lambda: f(a, b).block_until_ready(), repeats, warmup=2)
    return 2 * size ** 3 / t["median_s"]


def naive(x, k, tile=2048):
    """The anchors' naive form: per row tile, matmul against all rows, then top_k of full rows."""
    n = x.shape[0]
    xb = x.astype(jnp.bfloat16)
    sq = jnp.sum(x * x, 1)

    @jax.jit
    def run(xb, sq):
        def one(r):
            q = jax.lax.dynamic_slice_in_dim(xb, r * tile, tile)
            s = 2.0 * jnp.dot(q, xb.T, preferred_element_type=jnp.float32) - sq[None, :]
            s = jnp.where(jnp.arange(n)[None, :] == (r * tile + jnp.arange(tile))[:, None],
                          -jnp.inf, s)
            return jax.lax.top_k(s, k)[1]
        return jax.lax.map(one, jnp.arange(n // tile))
    return lambda: run(xb, sq).block_until_ready()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tile", type=int, default=0, help="0: backend default")
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--exact-f32", choices=["auto", "true", "false"], default="auto")
    ap.add_argument("--gpu-size", type=int, default=0,
                    help="accelerator run at this N: adds the bf16 matmul floor")
    ap.add_argument("--sweep", default="", help="extra tile:group configs, e.g. 4096:16,8192:32")
    ap.add_argument("--floor-size", type=int, default=8192,
                    help="edge of the square bf16 matmul that measures the floor's rate")
    ap.add_argument("--naive", action="store_true", help="also time the naive matmul+top_k")
    ap.add_argument("--no-faiss", action="store_true")
    ap.add_argument("--no-sklearn", action="store_true")
    ap.add_argument("--check-rows", type=int, default=256)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    n = args.gpu_size or args.n
    env = environment()
    print("environment:", env)
    x = make_data(n, args.d)
    rows = np.random.default_rng(1).choice(n, size=min(args.check_rows, n), replace=False)
    exact = {"auto": None, "true": True, "false": False}[args.exact_f32]
    results = []
    flops_full = 2.0 * n * n * args.d

    xd = jax.device_put(x)
    configs = [(args.tile or 0, args.group)]
    for item in filter(None, args.sweep.split(",")):
        t, g = item.split(":")
        configs.append((int(t), int(g)))
    for tile, group in configs:
        def run():
            dd, ii = knn(xd, args.k, tile=tile or None, exact_f32=exact, group=group)
            jax.block_until_ready((dd, ii))
            return dd, ii
        t = timeit(run, args.repeats)
        dd, ii = run()
        row = {"method": f"fifa_jax knn tile={tile or 'auto'} group={group} "
                         f"exact_f32={args.exact_f32}", **t, **check(x, dd, ii, args.k, rows)}
        results.append(row)

    if args.naive:
        results.append({"method": "naive bf16 matmul + top_k (row tiles 2048)",
                        **timeit(naive(xd, args.k + 1), max(1, args.repeats - 1))})

    if not args.no_faiss:
        try:
            import faiss
            def run_faiss():
                index = faiss.IndexFlatL2(args.d)
                index.add(x)
                return index.search(x, args.k + 1)
            t = timeit(run_faiss, args.repeats, warmup=0 if n > 20000 else 1)
            dd, ii = run_faiss()
            # drop self by index (duplicates may come first)
            keep = ii != np.arange(n)[:, None]
            fi = np.stack([r[m][: args.k] for r, m in zip(ii, keep)])
            fd = np.sqrt(np.maximum(np.stack([r[m][: args.k] for r, m in zip(dd, keep)]), 0))
            results.append({"method": f"faiss-cpu IndexFlatL2 ({faiss.omp_get_max_threads()} "
                                      f"threads)", **t, **check(x, fd, fi, args.k, rows)})
        except ImportError:
            print("faiss not installed: skipped")
    if not args.no_sklearn:
        try:
            from sklearn.neighbors import NearestNeighbors
            def run_sk():
                nn = NearestNeighbors(n_neighbors=args.k + 1, algorithm="brute", n_jobs=-1)
                return nn.fit(x).kneighbors(x)
            t = timeit(run_sk, max(1, args.repeats - 2), warmup=0)
            results.append({"method": "scikit-learn brute force (n_jobs=-1)", **t})
        except ImportError:
            print("scikit-learn not installed: skipped")

    floor = None
    if args.gpu_size:
        peak = bf16_peak(args.floor_size)
        floor = flops_full / peak
        results.append({"method": f"bf16 matmul floor 2N^2d at {peak / 1e12:.3g} TFLOP/s "
                                  f"({args.floor_size}^3 measured)", "median_s": floor})
    ref = next((r for r in results if r["method"].startswith("faiss")), None)
    for r in results:
        r["vs_faiss"] = r["median_s"] / ref["median_s"] if ref else None
        r["vs_floor"] = r["median_s"] / floor if floor else None
        r["tflops_equiv"] = flops_full / r["median_s"] / 1e12
    print(f"\nexact k-NN, N={n}, d={args.d}, k={args.k}, device {env['device_kind']} "
          f"({env['backend']}), jax {env['jax']}")
    print_table(results, [("method", "method"), ("median_s", "median s"),
                          ("first_call_s", "first call s"), ("vs_faiss", "/ faiss"),
                          ("vs_floor", "/ floor"), ("tflops_equiv", "2N^2d TFLOP/s"),
                          ("max_abs_dist_err", "max dist err"), ("index_recall", "recall")])
    write_json(args.out, {"benchmark": "knn", "n": n, "d": args.d, "k": args.k,
                          "environment": env, "results": results})


if __name__ == "__main__":
    main()
