"""The select stage: choose K pairs by importance score, greedy set maximisation or a baseline.

Reads (workdir contract):
    ingest/pairs.parquet            pair_id, prompt_id
    ingest/prompts.parquet          prompt_id (0..U-1)
    score/margins.parquet           pair_id, margin_signed, margin_abs, ok
    score/prompt_scores.parquet     prompt_id, quality (harmful optional)
    score/prompt_embeddings.npy     (U, d) float32, row i = prompt_id i
Writes select/:
    manifest.parquet   one row per chosen pair: rank, pair_id, prompt_id, every term raw and
                       normalised, importance, score (the method's ranking value: the greedy
                       gain, the top-K score; NaN for full/random), method, fingerprint,
                       relabeled (winner and loser swapped by select.relabel; the encode
                       stage swaps the images), proxy_margin (proxy score of the trained
                       winner minus the loser's: SmPO weighting reads it)
    report.json        counts, the objective's terms for the chosen set vs R random sets of
                       the same size (mean, std) and, for every method but importance and
                       full, vs the paper's importance top-K of the same size; the config
    hist_terms.png     margin / quality / diversity histograms, chosen vs all candidates
    prompts_pca.png    2-D PCA of the prompt embeddings, chosen prompts marked
Pairs whose margins row has ok = False (image not decodable) and pairs of a prompt whose
prompt_scores row has ok = False (the judge failed) are excluded and counted apart. The same
config gives a byte-identical manifest. `select.margin_mode` (top | bottom | band:LO-HI) and
`select.relabel` are described in options.py; the report counts the pairs outside the band
and the relabelled pairs (among the candidates and the chosen).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

import jax
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import logging

from fifa_jax.errors import ConfigError
from fifa_jax.errors import InputError
from fifa_jax.selection.entropy import kl_entropy, log_rho_k
from fifa_jax.selection.greedy import exact_gains, greedy_select
from fifa_jax.selection.importance import (NORMALIZATIONS, combined_score, margin_term,
                                           normalize, top_k_pairs)
from fifa_jax.selection.knn import knn
from fifa_jax.selection.options import (band_mask, oriented_margin, parse_margin_mode,
                                        relabel)

STAGE = "select"
SECTION = "select"
CONFIG_KEYS = ("seed", "select")
UPSTREAM = ("ingest", "score")
METHODS = ("importance", "greedy", "full", "random", "margin", "margin_quality",
           "margin_diversity")
RULES = {"method": ("choice", METHODS), "normalize": ("choice", NORMALIZATIONS),
         "margin": ("choice", ("absolute", "signed")), "knn_k": ("min", 1),
         "knn_tile": ("min", 0)}


def check_config(sel) -> None:
    """The select section's checks beyond RULES (run before any stage runs: a typo here must
    not be found only after hours of ingest and scoring)."""
    if "eps" in sel and not sel.eps > 0:
        raise ConfigError(f"config key 'select.eps' (duplicate floor) must be > 0; got {sel.eps}")
    if "k_pairs" in sel and sel.get("method") != "full" and sel.k_pairs < 1:
        raise ConfigError(f"config key 'select.k_pairs' must be >= 1; got {sel.k_pairs}")
    parse_margin_mode(sel.get("margin_mode", "top"))
    if not isinstance(sel.get("relabel", False), bool):
        raise ConfigError(f"config key 'select.relabel' must be True or False; got "
                          f"{sel.relabel!r}")


def default_config() -> ml_collections.ConfigDict:
    """The `select` section of the experiment config."""
    c = ml_collections.ConfigDict()
    c.method = "importance"     # importance | greedy | full | random | margin | margin_quality
    #                             | margin_diversity
    c.k_pairs = 5000            # K, pairs to choose
    c.knn_k = 5                 # k of the k-NN entropy / log rho_k term
    c.alpha = 1.0               # weight of prompt quality
    c.gamma = 1.0               # weight of diversity
    c.normalize = "zscore"      # none | zscore | rank, each term over the candidate pairs
    c.margin = "absolute"       # absolute | signed
    c.margin_mode = "top"       # top (FiFA: large margins) | bottom (small margins: the
    #                             margin term enters with its sign reversed) | band:LO-HI
    #                             (only pairs whose margin lies between its LO and HI
    #                             quantiles stay candidates, e.g. band:0.4-0.6)
    c.relabel = False           # swap winner and loser where the proxy reward disagrees with
    #                             the human label (Diffusion-DPO's AI-feedback variant)
    c.cap_per_prompt = 0        # at most this many pairs per prompt (0: no cap); top-K, greedy
    c.eps = 1e-4                # distance floor (duplicate policy) for log rho and the greedy
    c.seed = -1                 # random baseline / report seed (-1: the global config.seed)
    c.knn_tile = 0              # k-NN tile edge (0: backend default)
    c.knn_exact_f32 = True      # rank k-NN candidates in float32 (False: bf16 + re-rank)
    c.greedy_chunk = 16         # members re-scored per pass in the greedy update
    c.report = ml_collections.ConfigDict()
    c.report.random_sets = 10           # R random sets of size K to compare against
    c.report.max_set_for_entropy = 20000  # skip set-entropy terms for larger sets (full data)
    c.report.plots = True
    c.report.max_plot_points = 20000
    return c


def fingerprint(config) -> str:
    """sha256 of the sorted-JSON select section plus the effective seed."""
    payload = {"select": config.select.to_dict(), "seed": _seed(config)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _seed(config) -> int:
    s = int(config.select.seed)
    return int(config.get("seed", 0)) if s < 0 else s


def _read(path: pathlib.Path, columns):
    if not path.exists():
        raise FileNotFoundError(f"select: missing input {path} (run the upstream stage first)")
    have = pq.read_schema(path).names
    missing = [c for c in columns if c not in have]
    if missing:
        raise InputError(f"select: {path} lacks column(s) {missing}; has {have}")
    t = pq.read_table(path, columns=list(columns))
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in columns}


def load_inputs(workdir: pathlib.Path) -> dict:
    """Read and validate the upstream tables; returns per-pair and per-prompt arrays."""
    pairs = _read(workdir / "ingest" / "pairs.parquet", ["pair_id", "prompt_id"])
    prompts = _read(workdir / "ingest" / "prompts.parquet", ["prompt_id"])
    mpath = workdir / "score" / "margins.parquet"
    margins = _read(mpath, ["pair_id", "margin_signed", "margin_abs", "ok"])
    spath = workdir / "score" / "prompt_scores.parquet"
    names = pq.read_schema(spath).names if spath.exists() else []
    optional = [c for c in ("harmful", "ok") if c in names]
    scores = _read(spath, ["prompt_id", "quality"] + optional)
    epath = workdir / "score" / "prompt_embeddings.npy"
    if not epath.exists():
        raise FileNotFoundError(f"select: missing input {epath} (run the score stage first)")
    emb = np.load(epath)

    u = prompts["prompt_id"].size
    if not np.array_equal(np.sort(prompts["prompt_id"]), np.arange(u)):
        raise InputError(f"select: {workdir / 'ingest' / 'prompts.parquet'} prompt_id must be "
                         f"0..{u - 1} without gaps")
    if emb.ndim != 2 or emb.shape[0] != u:
        raise InputError(f"select: {epath} has shape {emb.shape}, expected ({u}, d)")
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if bad.size:
        raise InputError(f"select: {epath} has non-finite values in rows {bad[:5].tolist()}")
    pid = pairs["prompt_id"].astype(np.int64)
    pair_id = pairs["pair_id"].astype(np.int64)
    bad = np.flatnonzero((pid < 0) | (pid >= u))
    if bad.size:
        raise InputError(f"select: ingest/pairs.parquet rows {bad[:5].tolist()} have prompt_id "
                         f"outside [0, {u})")
    order = np.argsort(pair_id, kind="stable")
    pair_id, pid = pair_id[order], pid[order]
    dup = pair_id[1:][pair_id[1:] == pair_id[:-1]]
    if dup.size:
        raise InputError(f"select: {workdir / 'ingest' / 'pairs.parquet'} repeats pair_id(s) "
                         f"{np.unique(dup)[:5].tolist()}")

    # margins joined on pair_id
    mid = margins["pair_id"].astype(np.int64)
    srt = np.sort(mid)
    dup = srt[1:][srt[1:] == srt[:-1]]
    if dup.size:
        raise InputError(f"select: {mpath} repeats pair_id(s) {np.unique(dup)[:5].tolist()}")
    pos = np.searchsorted(pair_id, mid)
    known = (pos < pair_id.size) & (pair_id[np.minimum(pos, pair_id.size - 1)] == mid)
    if not known.all():
        raise InputError(f"select: {mpath} has pair_id(s) not in pairs: {mid[~known][:5].tolist()}")
    have = np.zeros(pair_id.size, bool)
    have[pos] = True
    if not have.all():
        raise InputError(f"select: {mpath} lacks rows for pair_id(s) "
                         f"{pair_id[~have][:5].tolist()} ({int((~have).sum())} missing)")
    ms = np.empty(pair_id.size)
    ma = np.empty(pair_id.size)
    ok = np.empty(pair_id.size, bool)
    ms[pos] = margins["margin_signed"]
    ma[pos] = margins["margin_abs"]
    ok[pos] = margins["ok"].astype(bool)
    bad = np.flatnonzero(ok & ~(np.isfinite(ms) & np.isfinite(ma)))
    if bad.size:
        raise InputError(f"select: {mpath} has non-finite margins with ok=True for pair_id(s) "
                         f"{pair_id[bad][:5].tolist()}")

    qid = scores["prompt_id"].astype(np.int64)
    if not np.array_equal(np.sort(qid), np.arange(u)):
        raise InputError(f"select: {spath} must have one row per prompt_id 0..{u - 1}")
    quality = np.empty(u)
    quality[qid] = scores["quality"]
    bad = np.flatnonzero(~np.isfinite(quality))
    if bad.size:
        raise InputError(f"select: {spath} has non-finite quality for prompt_id(s) "
                         f"{bad[:5].tolist()}")
    harmful = np.zeros(u, bool)
    if "harmful" in optional:
        harmful[qid] = scores["harmful"].astype(bool)
    prompt_ok = np.ones(u, bool)
    if "ok" in optional:
        prompt_ok[qid] = scores["ok"].astype(bool)
    return dict(pair_id=pair_id, prompt_id=pid, margin_signed=ms, margin_abs=ma,
                ok=ok & prompt_ok[pid], margin_ok=ok, prompt_ok=prompt_ok[pid],
                quality=quality, harmful=harmful, emb=emb.astype(np.float32))


def _mesh(config):
    if "mesh" not in config:
        return None
    from fifa_jax.parallel import make_mesh
    return make_mesh(config.mesh)


def _set_terms(idx, terms, emb, pid, sel, mesh) -> dict:
    """Objective terms of one set of candidate indices idx."""
    out = {"sum_margin": float(terms["m"][idx].sum()),
           "mean_margin": float(terms["m"][idx].mean()),
           "mean_quality": float(terms["q"][idx].mean()),
           "sum_a": float(terms["a"][idx].sum()),
           "sum_importance": float(terms["s"][idx].sum()),
           "unique_prompts": int(np.unique(pid[idx]).size)}
    k = int(sel.knn_k)
    if idx.size <= int(sel.report.max_set_for_entropy):
        ent = 0.0
        if idx.size > k:
            d, _ = knn(emb[pid[idx]], k, mesh=mesh, exact_f32=True)
            ent = float(np.sum(np.log(np.maximum(np.asarray(d[:, k - 1], np.float64), sel.eps))))
        out["entropy_sum"] = ent
        out["F"] = out["sum_a"] + float(sel.gamma) * ent
        up = np.unique(pid[idx])
        out["kl_entropy_unique_prompts"] = (
            float(kl_entropy(emb[up], k, eps=sel.eps, mesh=mesh)) if up.size > k else None)
    return out


def _plots(out: pathlib.Path, terms, chosen, emb, pid, sel, seed):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, name) in zip(axes, [("m", f"margin ({sel.margin})"), ("q", "quality"),
                                      ("div", f"diversity log rho_{sel.knn_k}")]):
        v = terms[key]
        bins = np.histogram_bin_edges(v, bins=40)
        ax.hist(v, bins=bins, density=True, alpha=0.5, label="all candidates")
        ax.hist(v[chosen], bins=bins, density=True, alpha=0.6, label="chosen")
        ax.set_title(name)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "hist_terms.png", dpi=90)
    plt.close(fig)

    x = emb.astype(np.float64) - emb.mean(axis=0)
    _, vecs = np.linalg.eigh(x.T @ x)
    comp = vecs[:, ::-1][:, :2]
    comp *= np.sign(comp[np.argmax(np.abs(comp), axis=0), [0, 1]])
    xy = x @ comp
    rng = np.random.default_rng(seed)
    n_max = int(sel.report.max_plot_points)
    show = rng.permutation(xy.shape[0])[:n_max] if xy.shape[0] > n_max else np.arange(xy.shape[0])
    cp = np.unique(pid[chosen])
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.scatter(xy[show, 0], xy[show, 1], s=3, c="0.7", label="all prompts")
    ax.scatter(xy[cp, 0], xy[cp, 1], s=8, c="tab:red", label=f"chosen ({cp.size})")
    ax.set_title("prompt embeddings, PCA")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "prompts_pca.png", dpi=90)
    plt.close(fig)


def select(terms: dict, pid: np.ndarray, emb: np.ndarray, sel, seed: int, mesh=None):
    """Indices (into the candidate arrays) in rank order, and the method's score per pick."""
    n = pid.size
    method = sel.method
    k_pairs = int(sel.k_pairs)
    cap = int(sel.cap_per_prompt)
    if method == "full":
        return np.arange(n), np.full(n, np.nan)
    if not 0 < k_pairs <= n:
        raise InputError(f"select.k_pairs={k_pairs} must be in [1, {n} candidate pairs]")
    if method == "random":
        return np.random.default_rng(seed).permutation(n)[:k_pairs], np.full(k_pairs, np.nan)
    if cap > 0 and method in ("greedy", "importance", "margin", "margin_quality",
                              "margin_diversity"):
        pickable = int(np.minimum(np.bincount(pid), cap).sum())
        if k_pairs > pickable:
            raise InputError(f"select.cap_per_prompt={cap} leaves only {pickable} pairs < "
                             f"k_pairs={k_pairs}")
    if method == "greedy":
        res = greedy_select(terms["a"], pid, emb, k_pairs, knn_k=int(sel.knn_k),
                            gamma=float(sel.gamma), eps=float(sel.eps), cap_per_prompt=cap,
                            mesh=mesh, chunk=int(sel.greedy_chunk))
        # float64 host gains of the chosen order: the same bytes on every device count
        return res.order, exact_gains(terms["a"], pid, emb, res.order, knn_k=int(sel.knn_k),
                                      gamma=float(sel.gamma), eps=float(sel.eps))
    score = {"importance": terms["s"], "margin": terms["mn"],
             "margin_quality": terms["a"],
             "margin_diversity": combined_score(terms["mn"], 0, terms["divn"], 0.0,
                                                float(sel.gamma))}.get(method)
    if score is None:
        raise ValueError(f"select.method must be one of {METHODS}, got {method!r}")
    idx = top_k_pairs(score, k_pairs, pid, cap)
    if idx.size < k_pairs:
        raise ValueError(f"select.cap_per_prompt={cap} leaves only {idx.size} pairs < "
                         f"k_pairs={k_pairs}")
    return idx, score[idx]


def run(config, workdir) -> dict:
    """Run the select stage (see the module docstring); returns the report's counts."""
    sel = config.select
    if sel.method not in METHODS:
        raise ValueError(f"select.method must be one of {METHODS}, got {sel.method!r}")
    if sel.normalize not in NORMALIZATIONS:
        raise ValueError(f"select.normalize must be one of {NORMALIZATIONS}, got {sel.normalize!r}")
    if float(sel.eps) <= 0:
        raise ValueError(f"select.eps must be > 0, got {sel.eps}")
    workdir = pathlib.Path(workdir)
    out = workdir / STAGE
    seed = _seed(config)
    fp = fingerprint(config)
    mesh = _mesh(config)
    data = load_inputs(workdir)
    emb, k = data["emb"], int(sel.knn_k)
    u = emb.shape[0]
    if u <= k:
        raise InputError(f"select: {u} prompts, need more than knn_k={k}")

    # per-prompt diversity log rho_k among all unique prompts, then candidate pairs
    knn_kw = {"tile": int(sel.knn_tile) or None, "exact_f32": bool(sel.knn_exact_f32)}
    div_prompt = log_rho_k(emb, k, eps=float(sel.eps), mesh=mesh, **knn_kw)
    mode, band = parse_margin_mode(sel.get("margin_mode", "top"))
    flipped, proxy_margin = relabel(data["margin_signed"], bool(sel.get("relabel", False)))
    cand = np.flatnonzero(data["ok"])
    out_of_band = 0
    if band is not None:
        inside = band_mask(margin_term(proxy_margin[cand], data["margin_abs"][cand],
                                       sel.margin), *band)
        out_of_band = int((~inside).sum())
        cand = cand[inside]
    if cand.size == 0:
        raise InputError(
            f"select: no candidate pairs: all {data['pair_id'].size} pairs are excluded "
            f"({int((~data['margin_ok']).sum())} with margins ok=False, "
            f"{int((data['margin_ok'] & ~data['prompt_ok']).sum())} of prompts the judge "
            f"failed on, {out_of_band} outside select.margin_mode {sel.margin_mode})")
    pid = data["prompt_id"][cand]
    m = margin_term(proxy_margin[cand], data["margin_abs"][cand], sel.margin)
    q = data["quality"][pid]
    div = div_prompt[pid]
    terms = {"m": m, "q": q, "div": div}
    terms["mn"] = normalize(oriented_margin(m, mode), sel.normalize)
    terms["qn"] = normalize(q, sel.normalize)
    terms["divn"] = normalize(div, sel.normalize)
    terms["a"] = combined_score(terms["mn"], terms["qn"], 0, float(sel.alpha), 0.0)
    terms["s"] = combined_score(terms["mn"], terms["qn"], terms["divn"], float(sel.alpha),
                                float(sel.gamma))

    logging.info("select: method %s, %d candidates (%d excluded, ok=False), K=%s",
                 sel.method, cand.size, int((~data["ok"]).sum()), sel.k_pairs)
    idx, score = select(terms, pid, emb, sel, seed, mesh)
    kk = idx.size
    rows = cand[idx]
    table = pa.table({
        "rank": pa.array(np.arange(kk, dtype=np.int64)),
        "pair_id": pa.array(data["pair_id"][rows]),
        "prompt_id": pa.array(pid[idx]),
        "margin_signed": pa.array(data["margin_signed"][rows].astype(np.float64)),
        "margin_abs": pa.array(data["margin_abs"][rows].astype(np.float64)),
        "margin": pa.array(m[idx]),
        "quality": pa.array(q[idx]),
        "diversity": pa.array(div[idx]),
        "margin_norm": pa.array(terms["mn"][idx]),
        "quality_norm": pa.array(terms["qn"][idx]),
        "diversity_norm": pa.array(terms["divn"][idx]),
        "importance": pa.array(terms["s"][idx]),
        "score": pa.array(np.asarray(score, np.float64)),
        "method": pa.array([sel.method] * kk, pa.string()),
        "fingerprint": pa.array([fp] * kk, pa.string()),
        "relabeled": pa.array(flipped[rows]),
        "proxy_margin": pa.array(proxy_margin[rows].astype(np.float64)),
    })

    counts = {"pairs_total": int(data["pair_id"].size),
              "excluded_not_ok": int((~data["ok"]).sum()),
              "excluded_margin_failed": int((~data["margin_ok"]).sum()),
              "excluded_judge_failed": int((data["margin_ok"] & ~data["prompt_ok"]).sum()),
              "excluded_margin_band": out_of_band,
              "relabeled_candidates": int(flipped[cand].sum()),
              "relabeled_selected": int(flipped[rows].sum()),
              "candidates": int(cand.size), "prompts_total": int(u),
              "prompts_with_candidates": int(np.unique(pid).size),
              "selected": int(kk), "selected_unique_prompts": int(np.unique(pid[idx]).size),
              "selected_harmful_prompt": int(data["harmful"][pid[idx]].sum())}
    chosen_terms = _set_terms(idx, terms, emb, pid, sel, mesh)
    rng = np.random.default_rng(seed + 1)
    r_sets = [_set_terms(rng.permutation(cand.size)[:kk], terms, emb, pid, sel, mesh)
              for _ in range(int(sel.report.random_sets))] if kk < cand.size else []
    # the paper's choice on the same terms, so a greedy (or baseline) run says what it bought:
    # F is not submodular, and the greedy's final F can fall below the importance top-K's
    imp_terms = None
    if sel.method not in ("importance", "full"):
        imp = top_k_pairs(terms["s"], kk, pid, int(sel.cap_per_prompt))
        imp_terms = _set_terms(imp, terms, emb, pid, sel, mesh) if imp.size == kk else None
    random_stats = {}
    for key in chosen_terms:
        vals = [r[key] for r in r_sets if r.get(key) is not None]
        if vals:
            random_stats[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))}
    report = {"method": sel.method, "fingerprint": fp, "seed": seed, "counts": counts,
              "objective": {"chosen": chosen_terms, "random_sets": len(r_sets),
                            "random": random_stats, "importance_top_k": imp_terms},
              "config": sel.to_dict(),
              "notes": {"normalize": "terms normalised over the candidate pairs",
                        "entropy_sum": "sum over the set of log max(rho_k^S, eps)",
                        "F": "sum_a + gamma * entropy_sum (method.md section 2)"}}

    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "manifest.parquet.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, out / "manifest.parquet")
        tmp = out / "report.json.tmp"
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True))
        os.replace(tmp, out / "report.json")
        if sel.report.plots:
            chosen_mask = np.zeros(cand.size, bool)
            chosen_mask[idx] = True
            _plots(out, terms, chosen_mask, emb, pid, sel, seed)
    logging.info("select: wrote %d pairs to %s", kk, out / "manifest.parquet")
    return dict(counts, method=sel.method, fingerprint=fp)


__all__ = ["default_config", "run", "fingerprint", "load_inputs", "select", "METHODS", "STAGE"]
