"""Proxy-reward margins: score both images of every pair with a CLIP-layout reward model.

    score(c, x) = exp(logit_scale) * cos(text_features(c), image_features(x))   (PickScore)
    margin_signed = score_w - score_l,  margin_abs = |margin_signed|

Text features are computed once per unique prompt (and cached in the chunk folder); images are
decoded and resized/cropped by a thread pool (`input_pipeline`) while the device scores the
previous batch; one jitted step normalises the uint8 crops, runs the vision tower and takes the
scaled cosine, with the batch split over every device of the mesh (last batch padded).
`score.reward.batch_size` is images (and prompts, for the text features) PER DEVICE: a step
takes batch_size x `parallel.batch_multiple(mesh)`, so every device always runs the same shape
and the scores do not depend on the device count (1 device == 8 devices bit for bit).

`margins.parquet` holds both the signed and the absolute margin; the selector chooses
(`select.margin`). Results go to `<out>/margin_chunks/chunk_00012.parquet`, one file per
`chunk_size` pairs, written to a temporary name and renamed, so a killed run resumes at the
first missing chunk and never rescores a finished one. `meta.json` fingerprints the inputs and
the model; chunks of a different fingerprint are discarded. The fingerprint covers the size and
mtime of every parquet file that image refs point into (`<file>::<row>::<column>`), so a shard
rewritten in place is rescored; refs that are plain image files (there can be millions) are not
stat'ed: after replacing such images in place, run with `--force=ingest,score`. Process 0
decides which chunks are finished (and whether the cached text features are valid) and
broadcasts it, so every host takes the same work list. A pair whose image cannot be decoded
(or whose score is not finite) gets ok=False, scores 0.0 and a failure reason; nothing is
dropped.

Test hook: env FIFA_JAX_SCORE_EXIT_AFTER_CHUNKS=N makes the process `os._exit(75)` right after
it has written its N-th chunk (simulates a kill between chunks).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import time
import zlib
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import logging
from PIL import Image

from fifa_jax import parallel
from fifa_jax.parallel import hosts
from fifa_jax.data import images as image_refs
from fifa_jax.files import file_stats
from fifa_jax.dtypes import DTYPES, compute_dtype
from fifa_jax.scoring import embeddings, input_pipeline
from fifa_jax.scoring import preprocess as pp
from fifa_jax.scoring.score_step import cast_matrices, make_score_step  # noqa: F401 (public)

EXIT_HOOK_ENV = "FIFA_JAX_SCORE_EXIT_AFTER_CHUNKS"
CHUNK_DIR = "margin_chunks"


@dataclasses.dataclass
class RewardModel:
    """A CLIP-layout reward: its tokenizer, its image preprocessing and (loaded on first use,
    so a fully resumed run never builds it) the NNX model."""
    tokenizer: object
    image_cfg: pp.ImageProcessorConfig
    path: str
    max_length: int
    dtype: str = "float32"
    attention_impl: str = "auto"
    model: object = None

    def ensure_model(self):
        if self.model is None:
            from fifa_jax.models.clip_io import load_clip
            self.model = load_clip(self.path, dtype=DTYPES[self.dtype],
                                   attention_impl=self.attention_impl)
        return self.model


def load_reward(path: str, dtype: str = "float32", processor_path: str = "",
                attention_impl: str = "auto") -> RewardModel:
    """A CLIP-layout reward folder: config.json + safetensors, tokenizer files and
    preprocessor_config.json (from `processor_path` when given: PickScore keeps its processor
    in the base model's repository). The weights are read on `ensure_model()`."""
    compute_dtype(dtype, "score.reward.dtype")          # a bad name: one line naming the key
    from fifa_jax.models.clip_config import read_config
    cfg, _ = read_config(path)
    text_cfg = getattr(cfg, "text_config", None)
    if text_cfg is None or not hasattr(cfg, "vision_config"):
        raise ValueError(f"{path}: the reward model must be a dual CLIPModel "
                         f"(text_config + vision_config), got {type(cfg).__name__}")
    proc = processor_path or path
    return RewardModel(embeddings.load_tokenizer(proc), pp.load_config(proc), path,
                       int(text_cfg.max_position_embeddings), dtype, attention_impl)


def _decode_fn(image_cfg: pp.ImageProcessorConfig):
    from fifa_jax.data.images import load_image_bytes

    def decode(ref: str) -> np.ndarray:
        with Image.open(io.BytesIO(load_image_bytes(ref))) as im:
            im.load()
            return pp.resize_and_crop(im, image_cfg)
    return decode


def fingerprint(pairs: pa.Table, texts: Sequence[str], reward_path: str, image_cfg,
                dtype: str, chunk_size: int,
                tokenized: embeddings.TokenizedText | None = None) -> str:
    """Hash of everything a margin chunk depends on (inputs, weights, preprocessing, chunking,
    the token ids the reward's tokenizer made of `texts`: the tokenizer may live outside
    `reward_path`, in `processor_path`; and the size and mtime of every parquet file the image
    refs point into, stat'ed once each; plain image-file refs are not stat'ed)."""
    h = hashlib.sha256()
    if tokenized is not None:
        for a in (tokenized.ids, tokenized.mask):
            a = np.ascontiguousarray(a, np.int32)
            h.update(f"{a.shape}".encode())
            h.update(a.tobytes())
    containers = set()
    for col in ("pair_id", "prompt_id", "winner_ref", "loser_ref"):
        for v in pairs.column(col).to_pylist():
            h.update(str(v).encode())
            h.update(b"\0")
            if isinstance(v, str) and image_refs.SEP in v:
                path, row, _ = image_refs.parse_ref(v)
                if row is not None:
                    containers.add(path)
    for path in sorted(containers):   # a missing one: its pairs fail to decode, counted
        h.update(json.dumps(file_stats(path)).encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    real = os.path.realpath(reward_path)
    for root, _, files in sorted(os.walk(real)):
        for f in sorted(files):
            st = os.stat(os.path.join(root, f))
            h.update(f"{os.path.relpath(os.path.join(root, f), real)}:{st.st_size}:"
                     f"{st.st_mtime_ns}".encode())
    h.update(f"{dataclasses.asdict(image_cfg)}|{dtype}|{chunk_size}".encode())
    return h.hexdigest()


def chunk_path(out_dir: Path, k: int) -> Path:
    return out_dir / CHUNK_DIR / f"chunk_{k:05d}.parquet"


def _write_atomic_table(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _prepare_chunk_dir(out_dir: Path, fp: str, n_chunks: int) -> list[int]:
    """Create/validate the chunk folder (the leader discards chunks of another fingerprint);
    return the indices of finished chunks as the leader sees them, the same list on every host
    (hosts' own file checks may disagree, e.g. under stale NFS attribute caches)."""
    cdir = out_dir / CHUNK_DIR
    meta = cdir / "meta.json"
    finished = np.zeros(n_chunks, np.int32)
    if jax.process_index() == 0:
        cdir.mkdir(parents=True, exist_ok=True)
        old = json.loads(meta.read_text()) if meta.exists() else None
        if old is None or old.get("fingerprint") != fp:
            stale = sorted(cdir.glob("chunk_*.parquet"))
            if stale:
                logging.warning("margins: inputs or model changed; discarding %d old chunks "
                                "in %s", len(stale), cdir)
            for p in cdir.iterdir():
                p.unlink()
            tmp = meta.with_name("meta.json.tmp")
            tmp.write_text(json.dumps({"fingerprint": fp, "n_chunks": n_chunks}))
            os.replace(tmp, meta)
        for p in cdir.glob("*.tmp*"):  # leftovers of a kill during a write
            p.unlink()
        finished[:] = [chunk_path(out_dir, k).exists() for k in range(n_chunks)]
    hosts.barrier("margins:prepare")
    return np.nonzero(hosts.from_leader(finished))[0].tolist()


def _text_features(reward: RewardModel, tok: embeddings.TokenizedText, batch_size: int,
                   mesh, out_dir: Path, stats: dict) -> np.ndarray:
    """Unit-norm reward text features (U, P), once per unique prompt, cached on disk.

    The leader decides whether the cache is valid and broadcasts its checksum; the cache is used
    only when every host read exactly those bytes, otherwise every host recomputes."""
    cache = out_dir / CHUNK_DIR / "text_features.npy"

    def read():
        try:
            feats = np.load(cache)
        except (OSError, ValueError, EOFError):  # missing or half-written
            return None, 0
        if feats.shape[0] != tok.ids.shape[0]:
            return None, 0
        return feats, zlib.crc32(np.ascontiguousarray(feats).tobytes())

    feats, crc = read() if jax.process_index() == 0 else (None, 0)
    leader = hosts.from_leader(np.array([feats is not None, np.uint32(crc).view(np.int32)]))
    if leader[0]:
        if jax.process_index() != 0:
            feats, crc = read()
        same = feats is not None and np.uint32(crc).view(np.int32) == leader[1]
        if hosts.on_all_hosts(same):
            return feats
    feats = embeddings.clip_text_features(reward.ensure_model(), tok, batch_size, mesh)
    stats["text_features_computed"] += feats.shape[0]
    feats = np.asarray(feats, np.float32)
    if jax.process_index() == 0:
        tmp = cache.with_name("text_features.tmp.npy")
        np.save(tmp, feats)
        os.replace(tmp, cache)
    return feats


def _chunk_table(pair_ids, scores, img_ok, reasons) -> pa.Table:
    """scores/img_ok: (n, 2) [winner, loser]; reasons: n x 2 strings."""
    finite = np.isfinite(scores)
    ok = img_ok.all(1) & finite.all(1)
    why = []
    for i in range(len(pair_ids)):
        parts = []
        for side, name in ((0, "winner"), (1, "loser")):
            if not img_ok[i, side]:
                r = reasons[i][side].replace(";", ",")  # "; " separates the two sides
                head, _, tail = r.partition(": ")
                parts.append(f"{head} ({name}): {tail}" if tail else f"{r} ({name})")
            elif not finite[i, side]:
                parts.append(f"non-finite score ({name})")
        why.append("; ".join(parts))
    s = np.where(ok[:, None], scores, 0.0).astype(np.float32)
    signed = (s[:, 0] - s[:, 1]).astype(np.float32)
    return pa.table({"pair_id": pa.array(np.asarray(pair_ids, np.int64)),
                     "score_w": pa.array(s[:, 0]), "score_l": pa.array(s[:, 1]),
                     "margin_signed": pa.array(signed),
                     "margin_abs": pa.array(np.abs(signed).astype(np.float32)),
                     "ok": pa.array(ok), "failure_reason": pa.array(why, pa.string())})


def failure_counts(reasons: Sequence[str]) -> dict[str, int]:
    """Count failures by category (the text before ':' of each '; '-separated reason)."""
    c = collections.Counter()
    for r in reasons:
        for part in filter(None, (r or "").split("; ")):
            c[part.split(":")[0].strip()] += 1
    return dict(sorted(c.items()))


def compute_margins(pairs: pa.Table, texts: Sequence[str], reward_cfg, mesh,
                    out_dir: Path, reward: RewardModel | None = None) -> dict:
    """Score every pair, in resumable chunks under `out_dir`; write `out_dir/margins.parquet`.

    Args:
      pairs: ingest pairs (pair_id, prompt_id, winner_ref, loser_ref, ...).
      texts: prompt text by prompt_id (U,).
      reward_cfg: config.score.reward {path, processor_path, batch_size (images per device),
        chunk_size, num_workers, dtype}.
      mesh: the device mesh; image batches are split over all its devices.
      reward: an already loaded reward model (tests), else loaded from reward_cfg.path.
    Returns: counts (pairs, ok, failures by reason, truncated prompts, chunks scored/reused,
      image batches run).
    """
    pairs = pairs.sort_by("pair_id")
    n = pairs.num_rows
    pid = pairs.column("prompt_id").to_numpy()
    if n and (pid.min() < 0 or pid.max() >= len(texts)):
        bad = int(np.nonzero((pid < 0) | (pid >= len(texts)))[0][0])
        raise ValueError(f"pairs row {bad}: prompt_id {int(pid[bad])} not in the prompt table "
                         f"(0..{len(texts) - 1})")
    chunk_size = int(reward_cfg.chunk_size)
    if chunk_size < 1:
        raise ValueError(f"score.reward.chunk_size must be >= 1, got {chunk_size}")
    if int(reward_cfg.batch_size) < 1:
        raise ValueError(f"score.reward.batch_size must be >= 1, got {reward_cfg.batch_size}")
    n_chunks = -(-n // chunk_size)
    if reward is None:
        reward = load_reward(reward_cfg.path, reward_cfg.dtype,
                             reward_cfg.get("processor_path", ""),
                             reward_cfg.get("attention_impl", "auto"))
    tok = embeddings.tokenize(reward.tokenizer, texts, reward.max_length)
    fp = fingerprint(pairs, texts, reward.path, reward.image_cfg, reward_cfg.dtype, chunk_size,
                     tok)
    done = set(_prepare_chunk_dir(out_dir, fp, n_chunks))
    todo = [k for k in range(n_chunks) if k not in done]
    stats = {"chunks_total": n_chunks, "chunks_reused": len(done), "chunks_scored": 0,
             "image_batches_scored": 0, "images_scored": 0, "text_features_computed": 0}
    if todo:
        text_feats = _text_features(reward, tok, int(reward_cfg.batch_size), mesh, out_dir,
                                    stats)
        _score_chunks(pairs, pid, text_feats, reward, reward_cfg, mesh, out_dir, todo, stats)
    used = np.zeros(len(texts), bool)
    used[pid] = True
    stats.update(pairs=n, reward_prompts_truncated=int((tok.truncated & used).sum()),
                 reward_truncated_ids=np.nonzero(tok.truncated)[0].tolist(),
                 reward_max_length=reward.max_length)
    if jax.process_index() != 0:  # only the leader assembles and writes the table
        return stats
    table = (pa.concat_tables([pq.read_table(chunk_path(out_dir, k)) for k in range(n_chunks)])
             if n_chunks else _chunk_table([], np.zeros((0, 2)), np.zeros((0, 2), bool), []))
    if table.num_rows != n or not np.array_equal(table.column("pair_id").to_numpy(),
                                                 pairs.column("pair_id").to_numpy()):
        raise RuntimeError(f"margin chunks in {out_dir / CHUNK_DIR} do not cover the pairs; "
                           "delete the folder and rerun")
    for col in ("score_w", "score_l", "margin_signed", "margin_abs"):
        if not np.all(np.isfinite(table.column(col).to_numpy())):
            raise FloatingPointError(f"non-finite {col} in margins (a bug: failures are 0.0)")
    _write_atomic_table(table, out_dir / "margins.parquet")
    ok = table.column("ok").to_numpy(zero_copy_only=False)
    return dict(stats, pairs_ok=int(ok.sum()), pairs_failed=int((~ok).sum()),
                failures=failure_counts(table.column("failure_reason").to_pylist()))


def _score_chunks(pairs, pid, text_feats, reward: RewardModel, reward_cfg, mesh,
                  out_dir: Path, todo: list[int], stats: dict) -> None:
    chunk_size = int(reward_cfg.chunk_size)
    bs = int(reward_cfg.batch_size) * parallel.batch_multiple(mesh)  # per device x devices
    h, w = reward.image_cfg.out_hw
    state, step = make_score_step(reward.ensure_model(), reward.image_cfg,
                                  DTYPES[reward.dtype])
    state = jax.device_put(state, parallel.replicated(mesh))
    pair_ids = pairs.column("pair_id").to_numpy()
    win = pairs.column("winner_ref").to_pylist()
    los = pairs.column("loser_ref").to_pylist()
    exit_after = int(os.environ.get(EXIT_HOOK_ENV, "0") or 0)

    def specs():  # image j of a chunk: pair j // 2, side j % 2 (winner, loser)
        for k in todo:
            rows = np.arange(k * chunk_size, min((k + 1) * chunk_size, len(pair_ids)))
            refs = [r for i in rows for r in (win[i], los[i])]
            for b0 in range(0, len(refs), bs):
                yield refs[b0:b0 + bs], (k, rows, b0, len(refs))

    t0, imgs_done = time.time(), 0
    total_imgs = sum(2 * (min((k + 1) * chunk_size, len(pair_ids)) - k * chunk_size)
                     for k in todo)
    cur, results = None, []
    batches = input_pipeline.decoded_batches(specs(), _decode_fn(reward.image_cfg), (h, w, 3),
                                             num_workers=int(reward_cfg.num_workers))
    for batch in batches:
        k, rows, b0, n_refs = batch.tag
        if cur is not None and k != cur[0]:
            raise AssertionError("chunks arrive in order")  # pragma: no cover
        if cur is None:
            cur = (k, rows)
            results = []
        real = batch.images.shape[0]
        sl = np.arange(b0, b0 + real)
        tfeat = text_feats[pid[rows[sl // 2]]]
        pix, _ = parallel.pad_batch(batch.images, bs)
        tf, _ = parallel.pad_batch(tfeat, bs)
        out = step(state, parallel.shard_batch(pix, mesh), parallel.shard_batch(tf, mesh))
        stats["image_batches_scored"] += 1
        stats["images_scored"] += real
        results.append((out, real, batch.ok, batch.reasons))
        if b0 + real == n_refs:  # chunk complete: fetch, write, maybe exit (test hook)
            scores = np.concatenate([parallel.to_host(o).astype(np.float32)[:r]
                                     for o, r, _, _ in results])
            oks = np.concatenate([o for _, _, o, _ in results])
            reasons = [x for *_, rs in results for x in rs]
            table = _chunk_table(pair_ids[rows], scores.reshape(-1, 2), oks.reshape(-1, 2),
                                 [reasons[2 * i:2 * i + 2] for i in range(len(rows))])
            if jax.process_index() == 0:
                _write_atomic_table(table, chunk_path(out_dir, k))
            stats["chunks_scored"] += 1
            imgs_done += n_refs
            rate = imgs_done / max(time.time() - t0, 1e-9)
            logging.info("margins: chunk %d done, %d/%d images, %.1f images/s, ETA %.0f s",
                         k, imgs_done, total_imgs, rate, (total_imgs - imgs_done) / rate)
            cur = None
            if exit_after and stats["chunks_scored"] >= exit_after:
                os._exit(75)
