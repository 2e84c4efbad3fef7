"""Greedy set maximisation speed (`fifa_jax.selection.greedy_select`).

CPU (target: K = 500 from 20,000 pairs in under a minute):
    python benchmarks/greedy.py --out /tmp/greedy_cpu.json
GPU (target: K = 5,000 from 850,000 pairs over 60,000 unique prompts in under 30 s):
    python benchmarks/greedy.py --gpu-size --out /tmp/greedy_gpu.json

Data: U unit-norm prompt embeddings (d = 768; a mixture of clusters so neighbourhoods are
uneven), P pairs over them (every prompt at least once, about P / U pairs per prompt like
Pick-a-Pic v2), a_i ~ N(0, 1) (z-scored margin + quality). Reported: the first call (with
compilation) and the median of `--repeats` warm calls, picks/s, and F(S) of the result against
random sets of the same size (a sanity check that the greedy did its job).

Reference in the same run: the paper's importance-score top-K on the same data (exact k-NN over
the unique prompts for log rho_k, s = a + gamma log rho_k, top K): the ratio says what the exact
set maximisation costs over the paper's approximation, and F says what it buys.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (clustered_prompts, environment, print_table, timeit,  # noqa: E402
                     write_json)

import numpy as np  # noqa: E402

from fifa_jax.selection.entropy import log_rho_k  # noqa: E402
from fifa_jax.selection.greedy import greedy_select, set_objective  # noqa: E402
from fifa_jax.selection.importance import normalize, top_k_pairs  # noqa: E402


def make_data(pairs, prompts, d, seed=0):
    rng = np.random.default_rng(seed)
    pid, emb = clustered_prompts(rng, pairs, prompts, d)
    a = rng.standard_normal(pairs).astype(np.float32)
    return a, pid, emb


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--prompts", type=int, default=1430, help="default: 20,000 / 14")
    ap.add_argument("--k-pairs", type=int, default=500)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--knn-k", type=int, default=5)
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--eps", type=float, default=1e-4)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gpu-size", action="store_true",
                    help="850,000 pairs, 60,000 prompts, K = 5,000")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.gpu_size:
        args.pairs, args.prompts, args.k_pairs = 850000, 60000, 5000
    env = environment()
    print("environment:", env)
    a, pid, emb = make_data(args.pairs, args.prompts, args.d)
    res = {}

    def run():
        res["r"] = greedy_select(a, pid, emb, args.k_pairs, knn_k=args.knn_k, gamma=args.gamma,
                                 eps=args.eps, chunk=args.chunk, progress=False)
    t = timeit(run, args.repeats)
    order = res["r"].order
    kw = dict(knn_k=args.knn_k, gamma=args.gamma, eps=args.eps)
    f_greedy = set_objective(a, pid, emb, order, **kw)["F"]
    rng = np.random.default_rng(1)
    f_rand = [set_objective(a, pid, emb, rng.permutation(args.pairs)[:args.k_pairs], **kw)["F"]
              for _ in range(3)]

    def run_importance():
        div = normalize(log_rho_k(emb, args.knn_k, eps=args.eps)[pid], "zscore")
        res["imp"] = top_k_pairs(a + args.gamma * div, args.k_pairs)
    t_imp = timeit(run_importance, args.repeats)
    f_imp = set_objective(a, pid, emb, res["imp"], **kw)["F"]
    row = {"method": f"greedy_select (chunk={args.chunk})", **t,
           "picks_per_s": args.k_pairs / t["median_s"],
           "unique_prompts": int(np.unique(pid[order]).size),
           "F": f_greedy, "F_random_mean": float(np.mean(f_rand)),
           "vs_importance": t["median_s"] / t_imp["median_s"]}
    ref = {"method": "reference: importance top-K (k-NN over prompts + top K)", **t_imp,
           "picks_per_s": args.k_pairs / t_imp["median_s"],
           "unique_prompts": int(np.unique(pid[res["imp"]]).size),
           "F": f_imp, "F_random_mean": float(np.mean(f_rand)), "vs_importance": 1.0}
    print(f"\ngreedy K={args.k_pairs} from {args.pairs} pairs over {args.prompts} prompts, "
          f"d={args.d}, k={args.knn_k}; device {env['device_kind']} ({env['backend']}), "
          f"jax {env['jax']}")
    print_table([row, ref], [("method", "method"), ("median_s", "median s"),
                             ("first_call_s", "first call s"), ("vs_importance", "time ratio"),
                             ("unique_prompts", "unique prompts"), ("F", "F(S)"),
                             ("F_random_mean", "F(random) mean")])
    write_json(args.out, {"benchmark": "greedy", "pairs": args.pairs, "prompts": args.prompts,
                          "k_pairs": args.k_pairs, "d": args.d, "knn_k": args.knn_k,
                          "environment": env, "results": [row, ref]})


if __name__ == "__main__":
    main()
