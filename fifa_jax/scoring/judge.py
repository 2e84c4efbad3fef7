"""LLM judge of prompt quality (method.md §2): public API of the `score.judge` config section.

    result = judge_prompts(texts, config.score.judge, mesh=mesh, cache_dir=workdir / "cache")
    result.quality (U,) float32 in [0, 10]; result.harmful (U,) bool; result.ok (U,) bool;
    result.failure_reason[i] in {"", "unparsable", "failed", "missing", "rejected"};
    result.rating_mass (U,) float32; result.truncated (U,) bool; result.metadata (dict)

Backends: `jax` (our Flax LM, judge_jax.py), `http` (OpenAI-compatible server, judge_http.py),
`column` (scores in a file, judge_column.py). Reading rules and the harm flag: rubric.py.
Failures never produce NaN: they have ok=False, quality 0.0 and a reason; the caller decides
what to do with them (counts by reason are in `metadata["counts"]`). Raw answers of the `jax`
and `http` backends are cached (judge_cache.py), so reruns and other datasets reuse them and
thresholds can change without rescoring.
"""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
from absl import logging

from fifa_jax.scoring.judge_tiny import build_tiny_judge_checkpoint  # noqa: F401 (public)
from fifa_jax.scoring.rubric import (DEFAULT_RUBRIC, FAILURE_REASONS, RawJudgement, Verdict,
                                     finalize)

BACKENDS = ("jax", "http", "column")


def default_config() -> ml_collections.ConfigDict:
    """The `score.judge` section."""
    c = ml_collections.ConfigDict()
    c.backend = "jax"
    c.model_path = ""          # jax: transformers folder (config.json, safetensors, tokenizer)
    c.model_id = ""            # name in metadata and cache keys; default: path / http model
    c.rubric = DEFAULT_RUBRIC  # needs {prompt} and {max_rating}
    c.answer_prefix = ""       # appended after the generation prompt, e.g. "Rating: "
    c.rating_max = -1          # -1: 10 if "10" is one token (http: 10), else 9; or force 1..10
    c.min_rating_mass = 0.05   # below: "unparsable" (the model does not answer with a rating)
    c.harm_threshold = 0.5     # harmful if P(rating 0) / mass >= this
    c.harmful_quality_zero = True
    c.batch_size = 16          # jax: prompts PER DEVICE (a batch is batch_size x
                               # parallel.batch_multiple(mesh)); http: prompts per chunk
    c.max_length = 512         # tokens of the rendered chat prompt; longer prompts are cut
    c.buckets = (64, 128, 256, 512)  # jax: padded lengths (part of the cache key)
    c.dtype = "bfloat16"       # jax compute dtype (params stay float32)
    c.attn_impl = "xla"        # "auto" picks cuDNN on GPU (see fifa_jax/models/attention.py)
    c.cache_dir = ""           # "" = no cache unless judge_prompts gets cache_dir
    c.http = ml_collections.ConfigDict()
    c.http.url = "http://127.0.0.1:8000"
    c.http.model = ""
    c.http.endpoint = "chat"   # "chat" (/v1/chat/completions) | "completions" (/v1/completions)
    c.http.timeout_s = 30.0
    c.http.retries = 3
    c.http.backoff_s = 0.5
    c.http.concurrency = 8
    c.http.top_logprobs = 20
    c.http.max_tokens = 3
    c.http.api_key_env = ""    # name of an environment variable holding a bearer token
    c.column = ml_collections.ConfigDict()
    c.column.path = ""         # parquet / jsonl / csv with prompt, quality[, harmful]
    c.column.missing = "error"  # "error" | "fail"
    return c


@dataclasses.dataclass
class JudgeResult:
    """Per unique prompt, in the order of the `texts` given to `judge_prompts`."""
    quality: np.ndarray         # (U,) float32 in [0, 10]; 0.0 where not ok
    harmful: np.ndarray         # (U,) bool
    ok: np.ndarray              # (U,) bool
    failure_reason: list[str]   # "" where ok
    rating_mass: np.ndarray     # (U,) float32
    truncated: np.ndarray       # (U,) bool
    metadata: dict

    def columns(self) -> dict:
        """Column name -> array/list, ready for a parquet table (score/prompt_scores)."""
        n = len(self.quality)
        return {"quality": self.quality, "harmful": self.harmful, "judge_ok": self.ok,
                "judge_failure": list(self.failure_reason), "judge_rating_mass": self.rating_mass,
                "judge_truncated": self.truncated,
                "judge_backend": [self.metadata["backend"]] * n,
                "judge_model": [self.metadata["model_id"]] * n}


def _make_backend(cfg, mesh):
    if cfg.backend == "jax":
        from fifa_jax.scoring.judge_jax import JaxJudge
        return JaxJudge(cfg, mesh)
    if cfg.backend == "http":
        from fifa_jax.scoring.judge_http import HttpJudge
        return HttpJudge(cfg)
    from fifa_jax.scoring.judge_column import ColumnJudge
    return ColumnJudge(cfg)


def _is_main_process() -> bool:
    """Only process 0 writes the cache (all processes compute the same answers)."""
    import jax
    return jax.process_index() == 0


def _raw_judgements(backend, texts: list[str], cache_dir: str, counts: dict
                    ) -> dict[str, RawJudgement]:
    from fifa_jax.scoring.judge_cache import JudgeCache
    cache = JudgeCache(cache_dir, backend.settings()) if cache_dir else None
    try:
        raw = cache.get_many(texts) if cache else {}
        todo = [t for t in texts if t not in raw]
        counts["cached"], counts["scored"] = len(raw), len(todo)
        logging.info("judge: %d prompts, %d from cache, %d to score", len(texts), len(raw),
                     len(todo))
        if todo:
            writer = cache.put_many if cache and _is_main_process() else None
            raw.update(backend.score(todo, on_batch=writer))
    finally:
        if cache:
            cache.close()
    return raw


def judge_prompts(texts: list[str], judge_config, *, mesh=None, cache_dir=None) -> JudgeResult:
    """Rate each text; see the module docstring. `cache_dir` overrides `judge_config.cache_dir`."""
    cfg = judge_config
    if cfg.backend not in BACKENDS:
        raise ValueError(f"judge backend must be one of {BACKENDS}, got {cfg.backend!r}")
    texts = [str(t) for t in texts]
    unique = list(dict.fromkeys(texts))
    backend = _make_backend(cfg, mesh)
    counts = {"unparsable": 0, "failed": 0, "missing": 0, "rejected": 0, "truncated": 0,
              "cached": 0, "scored": 0, "harmful": 0, "ok": 0}
    if cfg.backend == "column":
        verdicts = dict(zip(unique, backend.verdicts(
            unique, harmful_quality_zero=cfg.harmful_quality_zero)))
        truncated = {t: False for t in unique}
        counts["scored"] = len(unique)
    else:
        cache_dir = str(cache_dir) if cache_dir else cfg.cache_dir
        raw = _raw_judgements(backend, unique, cache_dir, counts)
        verdicts = {t: finalize(raw[t], min_rating_mass=float(cfg.min_rating_mass),
                                harm_threshold=float(cfg.harm_threshold),
                                harmful_quality_zero=bool(cfg.harmful_quality_zero))
                    for t in unique}
        truncated = {t: raw[t].truncated for t in unique}
    v: list[Verdict] = [verdicts[t] for t in texts]
    result = JudgeResult(
        quality=np.array([x.quality for x in v], np.float32),
        harmful=np.array([x.harmful for x in v], bool),
        ok=np.array([x.ok for x in v], bool),
        failure_reason=[x.reason for x in v],
        rating_mass=np.array([x.rating_mass for x in v], np.float32),
        truncated=np.array([truncated[t] for t in texts], bool),
        metadata={"backend": cfg.backend, "model_id": backend.model_id,
                  "rating_max": int(backend.max_rating), "counts": counts})
    for x in verdicts.values():
        if x.reason:
            counts[x.reason] += 1
        counts["ok"] += int(x.ok)
        counts["harmful"] += int(x.harmful)
    counts["truncated"] = int(sum(truncated.values()))
    assert np.all(np.isfinite(result.quality)), "judge produced a non-finite quality"
    if counts["ok"] < len(unique):
        logging.warning("judge: %d of %d prompts not scored: %s", len(unique) - counts["ok"],
                        len(unique), {k: counts[k] for k in FAILURE_REASONS})
    return result
