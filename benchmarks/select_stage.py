"""The whole select stage at Pick-a-Pic v2 scale: wall time and peak memory per method.

Writes a synthetic work directory (ingest/pairs.parquet, ingest/prompts.parquet,
score/margins.parquet, score/prompt_scores.parquet, score/prompt_embeddings.npy: `--pairs`
pairs over `--prompts` unit-norm d = 768 prompt embeddings in 64 clusters, 50 exact duplicate
prompts, Gaussian margins, uniform 0-10 quality), then runs `fifa_jax.selection.stage.run`
(configs/demo.py's select section with K = `--k-pairs`) once per method, each in a fresh
process so that peak memory is its own: read and validate the inputs, select, the exact gains,
the manifest, the report with its random-set objectives, histograms and PCA plot.
Reference in the same run: the paper's importance top-K (the first method listed); the
ratio is each method's time over it.

    python benchmarks/select_stage.py --out /tmp/select_stage.json     # 850k pairs, 60k prompts
    python benchmarks/select_stage.py --pairs 20000 --prompts 1430 --k-pairs 500   # quick
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import clustered_prompts, environment, print_table, write_json  # noqa: E402

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def write_inputs(wd: pathlib.Path, pairs: int, prompts: int, d: int, seed: int = 0) -> None:
    """The score stage's outputs (and ingest's two tables) for a synthetic dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    (wd / "ingest").mkdir(parents=True, exist_ok=True)
    (wd / "score").mkdir(exist_ok=True)
    pid, emb = clustered_prompts(rng, pairs, prompts, d, duplicates=min(50, prompts // 4))
    pq.write_table(pa.table({"pair_id": np.arange(pairs), "prompt_id": pid}),
                   wd / "ingest" / "pairs.parquet")
    pq.write_table(pa.table({"prompt_id": np.arange(prompts)}), wd / "ingest" / "prompts.parquet")
    m = rng.standard_normal(pairs)
    pq.write_table(pa.table({"pair_id": np.arange(pairs), "margin_signed": m,
                             "margin_abs": np.abs(m), "ok": np.ones(pairs, bool)}),
                   wd / "score" / "margins.parquet")
    pq.write_table(pa.table({"prompt_id": np.arange(prompts),
                             "quality": rng.uniform(0, 10, prompts)}),
                   wd / "score" / "prompt_scores.parquet")
    np.save(wd / "score" / "prompt_embeddings.npy", emb)


CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from configs import demo
from fifa_jax.selection import stage
cfg = demo.get_config({method!r})
cfg.select.k_pairs = {k}
t = time.perf_counter()
res = stage.run(cfg, {wd!r})
print(json.dumps({{"seconds": time.perf_counter() - t,
                   "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "selected_unique_prompts": res["selected_unique_prompts"]}}))
"""


def run_method(wd: pathlib.Path, method: str, k: int) -> dict:
    code = CHILD.format(root=str(ROOT), method=method, k=k, wd=str(wd))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    report = json.loads((wd / "select" / "report.json").read_text())
    row["F"] = report["objective"]["chosen"]["F"]
    row["F_random_mean"] = report["objective"]["random"]["F"]["mean"]
    return {"method": method, **row}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=850000)
    ap.add_argument("--prompts", type=int, default=60000)
    ap.add_argument("--k-pairs", type=int, default=5000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--methods", default="importance,greedy",
                    help="comma-separated; the first is the reference")
    ap.add_argument("--workdir", default="", help="default: a temporary directory")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    env = environment()
    print("environment:", env)
    with tempfile.TemporaryDirectory() as tmp:
        wd = pathlib.Path(args.workdir or tmp)
        write_inputs(wd, args.pairs, args.prompts, args.d)
        rows = [run_method(wd, m, args.k_pairs) for m in args.methods.split(",")]
    for r in rows:
        r["vs_reference"] = r["seconds"] / rows[0]["seconds"]
    print(f"\nselect stage, K={args.k_pairs} from {args.pairs} pairs over {args.prompts} "
          f"prompts, d={args.d}; {env['device_kind']} ({env['backend']}), jax {env['jax']}; "
          f"reference: {rows[0]['method']}")
    print_table(rows, [("method", "method"), ("seconds", "stage s"),
                       ("vs_reference", "time ratio"), ("peak_rss_mib", "peak RSS MiB"),
                       ("selected_unique_prompts", "unique prompts"), ("F", "F(S)"),
                       ("F_random_mean", "F(random) mean")])
    write_json(args.out, {"benchmark": "select_stage", "pairs": args.pairs,
                          "prompts": args.prompts, "k_pairs": args.k_pairs, "d": args.d,
                          "environment": env, "results": rows})


if __name__ == "__main__":
    main()
