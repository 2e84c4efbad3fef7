"""The encode stage: VAE posteriors of both images of every pair, text states of every prompt.

Reads:  select/manifest.parquet (pair_id, prompt_id, rank[, relabeled]): the train split, in
        rank order; a pair with relabeled = True (select.relabel) is encoded with its winner
        and loser swapped (moments_w is the proxy's winner);
        ingest/pairs.parquet (pair_id, prompt_id, winner_ref, loser_ref[, is_tie]);
        ingest/prompts.parquet (prompt_id, text); the base model folder (encode.base_model).
Writes (workdir/encode/):
  tfds/fifa_dpo_pairs/1.0.0/    splits train (manifest pairs) and validation (held-out pairs):
                                pair_id, prompt_row, moments_w, moments_l [, *_flip]
  tfds/fifa_dpo_prompts/1.0.0/  split prompts: prompt_id, prompt_embeds (L, D) [, pooled (P,)]
  empty_prompt.npz              the same states for "" (caption dropout)
  dataset_spec.json             shapes, dtypes, VAE scaling/shift factors, counts
  encode_report.json            counts: pairs, encoded, skipped by reason, prompts, validation,
                                latent shape, bytes, chunks reused/encoded, timings
  chunks/                       resumable per-chunk results (npz) + meta.json (fingerprints)
(layout and how to open it: pair_dataset.py; reading it for training: loader.py)

Images (method.md section 3.7): decoded through the ingest image refs, shorter side resized to
`resolution` (PIL bilinear, as torchvision's Resize on PIL images), centre crop
`resolution` x `resolution` (torchvision's offsets: round((H - res) / 2)), scaled to [-1, 1] as
`(x / 255 - 0.5) / 0.5`. The frozen VAE encoder runs once per image; we store the posterior's
mean and log-variance (logvar clipped to [-30, 20] as diffusers does), stacked on the channel
axis as (2C, h, w), PyTorch layout, unscaled: the train step draws a fresh
`mean + exp(logvar / 2) * noise` each time and multiplies by `scaling_factor` (never the mean).

Random horizontal flips with precomputed latents: the flip does not commute with the encoder,
so with `random_flip` we also encode each image's mirror and store its posterior
(`moments_w_flip`, `moments_l_flip`); the loader picks, per image and independently for winner
and loser (as the official code's per-image transform does), the plain or the mirrored
posterior with probability 1/2. It doubles encoding work and storage.

Text (once per unique prompt of either split, plus ""): tokenised as the diffusers pipelines do
(padding to max_length = min(tokenizer.model_max_length, max_position_embeddings), truncation,
no attention mask); SD1.x / 2.x: the text encoder's last_hidden_state; SDXL: both encoders'
penultimate hidden states concatenated on the feature axis, and the pooled projection
(`text_embeds`) of encoder 2.

Validation: `num_val_pairs` ingest pairs that are not in the manifest (and not ties), drawn with
`config.seed`; `val_prompts` chooses whether their prompts may also be train prompts ("any"),
must not ("disjoint"), or preferably not ("prefer_disjoint": disjoint ones first, then others).

Resumable like the score stage: pairs are encoded in chunks of `chunk_size`, each written to
`chunks/<split>_<k>.npz` (temporary name, then renamed); `chunks/meta.json` holds one
fingerprint per split and one for the text states (inputs, image refs and the parquet files
they point into, model files' sizes and times, settings); chunks of another fingerprint are
dropped. A killed run resumes at the first missing chunk. The tfds datasets are built from the
chunks at the end. A pair whose winner or loser fails to decode (or gives a non-finite
posterior) is skipped and counted by reason, never a crash. Process 0 decides which chunks are
finished and writes every file; all hosts run the sharded VAE and text steps.

Test hook: env FIFA_JAX_ENCODE_FAIL_AFTER_CHUNKS=N raises SimulatedKill right after this run
has written its N-th chunk.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pyarrow.parquet as pq
from absl import logging
from flax import nnx

from fifa_jax import parallel
from fifa_jax.data import images as image_refs
from fifa_jax.dtypes import DTYPES
from fifa_jax.errors import InputError
from fifa_jax.files import file_stats
from fifa_jax.parallel import hosts
from fifa_jax.scoring import embeddings, input_pipeline
from fifa_jax.scoring.margins import failure_counts
from fifa_jax.scoring.preprocess import resize_output_hw
from fifa_jax.demo import assets
from fifa_jax.training import pair_dataset

SECTION = "encode"
STAGE = "encode"
CONFIG_KEYS = ("seed", "encode")
UPSTREAM = ("select",)
SPEED_ONLY = ("num_workers", "batch_size", "chunk_size")
CHUNK_DIR = "chunks"
REPORT = "encode_report.json"
SPLITS = ("train", "validation")
FAIL_HOOK_ENV = "FIFA_JAX_ENCODE_FAIL_AFTER_CHUNKS"
VAL_PROMPTS = ("prefer_disjoint", "disjoint", "any")
_STORE = ("float32", "float16")

RULES = {
    "resolution": ("min", 8),
    "dtype": ("choice", _STORE),
    "vae_dtype": ("choice", tuple(DTYPES)),
    "text_dtype": ("choice", tuple(DTYPES)),
    "attention_impl": ("choice", ("auto", "xla", "cudnn")),   # not einsum: causal text towers
    "num_val_pairs": ("min", 0),
    "val_prompts": ("choice", VAL_PROMPTS),
    "batch_size": ("min", 1),
    "chunk_size": ("min", 1),
    "num_workers": ("min", 1),
}


class SimulatedKill(RuntimeError):
    """Raised by the FIFA_JAX_ENCODE_FAIL_AFTER_CHUNKS test hook."""


def default_config() -> ml_collections.ConfigDict:
    """The `encode` section of the experiment config."""
    c = ml_collections.ConfigDict()
    c.base_model = ""            # diffusers pipeline folder (model_index.json, vae/, text_encoder/,
    #                              tokenizer/ [, text_encoder_2/, tokenizer_2/ for SDXL])
    c.vae_path = ""              # VAE folder ("" = base_model/vae; e.g. SDXL's fp16-fix VAE)
    c.variant = ""               # weight variant, e.g. "fp16" ("" = the plain weight files)
    c.resolution = 512           # training size: shorter side resized (bilinear), centre crop
    c.random_flip = True         # also store each mirrored image's posterior (see the docstring)
    c.dtype = "float32"          # stored moments and text states: float32 | float16
    c.vae_dtype = "float32"      # VAE compute dtype: float32 | bfloat16 | float16
    c.text_dtype = "float32"     # text encoder compute dtype: float32 | bfloat16 | float16
    c.attention_impl = "auto"    # auto | xla | cudnn (fifa_jax/models/attention.py)
    c.num_val_pairs = 500        # held-out pairs (not in the manifest) for validation
    c.val_prompts = "prefer_disjoint"  # prefer_disjoint | disjoint | any (see the docstring)
    c.batch_size = 8             # images (and prompts) per device per step; speed only
    c.chunk_size = 512           # pairs per resumable chunk file; speed only
    c.num_workers = 8            # image decoding threads; speed only
    return c


# ------------------------------------------------------------------------------ model files
def _vae_dir(ec) -> str:
    return ec.vae_path or os.path.join(ec.base_model, "vae")


def _text_dirs(base: str) -> list[str]:
    names = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    return [os.path.join(base, n) for n in names if os.path.isdir(os.path.join(base, n))]


def _stats(paths, workdir) -> dict:
    """file_stats of each path, leaving out paths inside the work directory (made by a stage
    whose fingerprint already covers them)."""
    out = {}
    root = os.path.abspath(workdir) + os.sep if workdir is not None else None
    for p in paths:
        p = os.path.abspath(os.path.expanduser(p))
        if root is not None and p.startswith(root):
            continue
        out.update(file_stats(p))
    return out


def input_signature(config, workdir) -> dict:
    """Sizes and modification times of the base model files this stage reads (VAE, text
    encoders, tokenizers, model_index.json): replacing a checkpoint in place reruns it."""
    ec = config.get(SECTION)
    if ec is None or not ec.get("base_model") or ec.base_model == assets.DEMO:
        return {}                 # demo: made from the code (the config covers it)
    paths = [_vae_dir(ec), os.path.join(ec.base_model, "model_index.json")]
    paths += _text_dirs(ec.base_model)
    return _stats(paths, workdir)


def discard_resume_state(workdir) -> None:
    """Forget finished chunks and cached text states (what `--force=encode` drops)."""
    out = pathlib.Path(workdir) / STAGE
    shutil.rmtree(out / CHUNK_DIR, ignore_errors=True)
    shutil.rmtree(out / (pair_dataset.TFDS_DIR + ".tmp"), ignore_errors=True)


# ------------------------------------------------------------------------------ inputs
def _need(path: pathlib.Path, cols, what: str):
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the {what} stage first")
    table = pq.read_table(path)
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; has {table.column_names}")
    return table


def read_inputs(workdir) -> dict:
    """The manifest, the ingest pairs and the prompt texts as numpy arrays / lists."""
    workdir = pathlib.Path(workdir)
    man = _need(workdir / "select" / "manifest.parquet", ("pair_id", "prompt_id", "rank"),
                "select").sort_by("rank")
    pairs = _need(workdir / "ingest" / "pairs.parquet",
                  ("pair_id", "prompt_id", "winner_ref", "loser_ref"), "ingest")
    prompts = _need(workdir / "ingest" / "prompts.parquet", ("prompt_id", "text"),
                    "ingest").sort_by("prompt_id")
    texts = prompts.column("text").to_pylist()
    if any(t is None for t in texts):
        raise InputError(f"{workdir / 'ingest' / 'prompts.parquet'}: null prompt text")
    ids = prompts.column("prompt_id").to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise InputError(f"{workdir / 'ingest' / 'prompts.parquet'}: prompt_id must be "
                         f"0..U-1 without gaps")
    pair_id = pairs.column("pair_id").to_numpy()
    order = np.argsort(pair_id, kind="stable")
    pair_id = pair_id[order]
    if pair_id.size and np.any(pair_id[1:] == pair_id[:-1]):
        raise InputError(f"{workdir / 'ingest' / 'pairs.parquet'}: duplicate pair_id")
    tie = (pairs.column("is_tie").to_numpy(zero_copy_only=False)[order]
           if "is_tie" in pairs.column_names else np.zeros(pair_id.size, bool))
    win = pairs.column("winner_ref").to_pylist()
    los = pairs.column("loser_ref").to_pylist()
    man_ids = man.column("pair_id").to_numpy()
    swap = (man.column("relabeled").to_numpy(zero_copy_only=False).astype(bool)
            if "relabeled" in man.column_names else np.zeros(man_ids.size, bool))
    pos = np.searchsorted(pair_id, man_ids)
    bad = (pos >= pair_id.size) | (pair_id[np.minimum(pos, max(pair_id.size - 1, 0))]
                                   != man_ids) if pair_id.size else np.ones(man_ids.size, bool)
    if np.any(bad):
        raise InputError(f"{workdir / 'select' / 'manifest.parquet'}: pair_id "
                         f"{int(man_ids[np.argmax(bad)])} is not in ingest/pairs.parquet "
                         f"(the select stage is out of date: rerun it)")
    win, los = [win[i] for i in order], [los[i] for i in order]
    for r in pos[swap]:           # relabelled train pairs (never validation: not in manifest)
        win[r], los[r] = los[r], win[r]
    return {"pair_id": pair_id, "prompt_id": pairs.column("prompt_id").to_numpy()[order],
            "winner_ref": win, "loser_ref": los, "relabeled": int(swap.sum()),
            "is_tie": tie.astype(bool), "train_rows": pos, "texts": texts}


def draw_validation(inputs: dict, n: int, seed: int, policy: str) -> tuple[np.ndarray, dict]:
    """Rows (into the sorted ingest pairs) of up to `n` held-out pairs, sorted by pair_id.

    Candidates: pairs not in the manifest and not ties. policy: "any" draws among all of
    them; "disjoint" only among pairs whose prompt has no train pair; "prefer_disjoint" takes
    the disjoint ones first (in a random order), then the others. Deterministic in `seed`."""
    if policy not in VAL_PROMPTS:
        raise InputError(f"config key 'encode.val_prompts' must be one of "
                         f"{', '.join(VAL_PROMPTS)}; got {policy!r}")
    npairs = inputs["pair_id"].size
    in_train = np.zeros(npairs, bool)
    in_train[inputs["train_rows"]] = True
    cand = np.nonzero(~in_train & ~inputs["is_tie"])[0]
    train_prompts = np.zeros(len(inputs["texts"]), bool)
    train_prompts[inputs["prompt_id"][inputs["train_rows"]]] = True
    disjoint = ~train_prompts[inputs["prompt_id"][cand]]
    rng = np.random.default_rng([int(seed), 0x7A1])
    first = rng.permutation(cand[disjoint])
    rest = rng.permutation(cand[~disjoint])
    order = {"any": rng.permutation(cand), "disjoint": first,
             "prefer_disjoint": np.concatenate([first, rest])}[policy]
    rows = np.sort(order[:int(n)])
    info = {"requested": int(n), "candidates": int(cand.size),
            "candidates_disjoint": int(disjoint.sum()), "drawn": int(rows.size),
            "drawn_disjoint": int((~train_prompts[inputs["prompt_id"][rows]]).sum()),
            "policy": policy}
    return rows, info


# ------------------------------------------------------------------------------ images
def center_crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop(size) on an image at least size x size."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def preprocess_image(img, resolution: int) -> np.ndarray:
    """RGB PIL image -> (resolution, resolution, 3) uint8: shorter side resized to
    `resolution` (PIL bilinear), then the centre crop."""
    from PIL import Image
    h, w = resize_output_hw(img.height, img.width, resolution)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), resample=Image.BILINEAR)
    x = np.asarray(img, np.uint8)
    top, left = center_crop_box(h, w, resolution)
    return np.ascontiguousarray(x[top:top + resolution, left:left + resolution])


def _decode_fn(resolution: int):
    def decode(ref: str) -> np.ndarray:
        return preprocess_image(image_refs.load_image(ref), resolution)
    return decode


def to_model_input(pix):
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1], as ToTensor + Normalize(0.5)."""
    x = (pix.astype(jnp.float32) / 255.0 - 0.5) / 0.5
    return jnp.transpose(x, (0, 3, 1, 2))


def make_encode_step(vae, flip: bool, out_dtype):
    """(state, step): step(state, pix (B, H, W, 3) uint8) -> (moments, finite), moments
    (B, 2C, h, w) or, with flip, (B, 2, 2C, h, w) [plain, mirrored], cast to out_dtype;
    finite (B,) bool (every value finite, checked in float32 before the cast)."""
    graphdef, state = nnx.split(vae)

    def step(state, pix):
        x = to_model_input(pix)
        if flip:  # (B, 2, 3, H, W) -> (2B, ...): each device keeps its images and mirrors
            x = jnp.stack([x, jnp.flip(x, axis=3)], axis=1).reshape((-1,) + x.shape[1:])
        post = nnx.merge(graphdef, state).encode(x)
        mom = jnp.concatenate([post.mean, post.logvar], axis=1).astype(jnp.float32)
        if flip:
            mom = mom.reshape((-1, 2) + mom.shape[1:])
        finite = jnp.all(jnp.isfinite(mom).reshape(mom.shape[0], -1), axis=1)
        return mom.astype(out_dtype), finite

    return state, jax.jit(step)


# ------------------------------------------------------------------------------ text
def _text_step(graphdef, sdxl_role: str | None, out_dtype):
    """jit(state, ids) -> states (B, L, D) [and pooled (B, P) for SDXL encoder 2]."""
    def step(state, ids):
        m = nnx.merge(graphdef, state)
        if sdxl_role is None:
            return m(ids).last_hidden_state.astype(out_dtype)
        out = m(ids, output_hidden_states=True)
        states = out.hidden_states[-2].astype(out_dtype)
        if sdxl_role == "second":
            return jnp.concatenate([states.reshape(states.shape[0], -1),
                                    out.text_embeds.astype(out_dtype)], axis=1)
        return states
    return jax.jit(step)


def text_states(texts, base_model: str, ec, mesh) -> dict:
    """prompt_embeds (N, L, D) [, pooled (N, P)] in ec.dtype, truncated (N,) bool, max_length,
    for `texts` (see the module docstring for what SD and SDXL use)."""
    from fifa_jax.models.pipeline import load_pipeline
    pipe = load_pipeline(base_model, dtype=DTYPES[ec.text_dtype],
                         attention_impl=ec.attention_impl, variant=ec.variant or None,
                         components=("text_encoder", "text_encoder_2", "tokenizer",
                                     "tokenizer_2"))
    if pipe.text_encoder is None or pipe.tokenizer is None:
        raise InputError(f"{base_model}: the pipeline has no text_encoder/tokenizer")
    parts = [(pipe.tokenizer, pipe.text_encoder, "first" if pipe.is_sdxl else None)]
    if pipe.is_sdxl:
        if pipe.text_encoder_2 is None or pipe.tokenizer_2 is None:
            raise InputError(f"{base_model}: an SDXL pipeline needs text_encoder_2 and "
                             f"tokenizer_2")
        parts.append((pipe.tokenizer_2, pipe.text_encoder_2, "second"))
    out_dtype = DTYPES[ec.dtype]
    states, pooled, truncated, lengths = [], None, np.zeros(len(texts), bool), set()
    for tok, enc, role in parts:
        max_len = min(int(getattr(tok, "model_max_length", 10 ** 9) or 10 ** 9),
                      int(enc.config.max_position_embeddings))
        lengths.add(max_len)
        t = embeddings.tokenize(tok, texts, max_len)
        truncated |= t.truncated
        graphdef, state = nnx.split(enc)
        state = jax.device_put(state, parallel.replicated(mesh))
        res = embeddings.run_batched(_text_step(graphdef, role, out_dtype), state, [t.ids],
                                     int(ec.batch_size), mesh, what="encode text states")
        if role == "second":
            d2 = res.shape[1] - int(enc.config.projection_dim)
            pooled = res[:, d2:]
            res = res[:, :d2].reshape(len(texts), max_len, -1)
        states.append(res)
    if len(lengths) != 1:
        raise InputError(f"{base_model}: the two tokenizers pad to different lengths "
                         f"{sorted(lengths)}")
    out = {"prompt_embeds": np.concatenate(states, axis=-1), "truncated": truncated,
           "max_length": lengths.pop()}
    if pooled is not None:
        out["pooled"] = pooled
    for k in ("prompt_embeds", "pooled"):
        if k in out and not np.all(np.isfinite(out[k].astype(np.float32))):
            raise FloatingPointError(f"non-finite text states ({k}) from {base_model}")
    return out


# ------------------------------------------------------------------------------ chunks
def _hash_update(h, *parts) -> None:
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\0")


def _image_fingerprint(rows, inputs, vae_stats: dict, ec) -> str:
    h = hashlib.sha256()
    containers = set()
    for i in rows:
        w, l = inputs["winner_ref"][i], inputs["loser_ref"][i]
        _hash_update(h, int(inputs["pair_id"][i]), w, l)
        for ref in (w, l):
            if isinstance(ref, str) and image_refs.SEP in ref:
                path, row, _ = image_refs.parse_ref(ref)
                if row is not None:
                    containers.add(path)
    for path in sorted(containers):
        _hash_update(h, json.dumps(file_stats(path)))
    _hash_update(h, json.dumps(vae_stats, sort_keys=True), ec.resolution, bool(ec.random_flip),
                 ec.dtype, ec.vae_dtype, ec.attention_impl, ec.variant, ec.chunk_size)
    return h.hexdigest()


def _text_fingerprint(texts, text_stats: dict, ec) -> str:
    h = hashlib.sha256()
    _hash_update(h, *texts)
    _hash_update(h, json.dumps(text_stats, sort_keys=True), ec.dtype, ec.text_dtype,
                 ec.attention_impl, ec.variant)
    return h.hexdigest()


def chunk_path(cdir: pathlib.Path, split: str, k: int) -> pathlib.Path:
    return cdir / f"{split}_{k:05d}.npz"


def _save_npz(path: pathlib.Path, arrays: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _prepare_chunks(cdir: pathlib.Path, fps: dict, n_chunks: dict) -> tuple[dict, bool]:
    """The leader drops chunks (and text states) whose fingerprint changed and says which are
    finished; every host gets the leader's view. Returns ({split: [k done]}, text_cached)."""
    order = [(s, k) for s in SPLITS for k in range(n_chunks[s])]
    flags = np.zeros(len(order) + 1, np.int32)
    if jax.process_index() == 0:
        cdir.mkdir(parents=True, exist_ok=True)
        meta_path = cdir / "meta.json"
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        for split in SPLITS:
            if old.get(split) != fps[split]:
                for p in cdir.glob(f"{split}_*.npz"):
                    p.unlink()
        if old.get("text") != fps["text"]:
            (cdir / "text_states.npz").unlink(missing_ok=True)
        for p in cdir.glob("*.tmp*"):
            p.unlink()
        tmp = cdir / "meta.json.tmp"
        tmp.write_text(json.dumps(fps, sort_keys=True))
        os.replace(tmp, meta_path)
        flags[:-1] = [chunk_path(cdir, s, k).exists() for s, k in order]
        flags[-1] = (cdir / "text_states.npz").exists()
    hosts.barrier("encode:prepare")
    flags = hosts.from_leader(flags)
    done = {s: [] for s in SPLITS}
    for (s, k), f in zip(order, flags[:-1]):
        if f:
            done[s].append(k)
    return done, bool(flags[-1])


def _chunk_arrays(pair_ids, moments, finite, ok, reasons, flip: bool) -> dict:
    """moments: (2n, [2,] 2C, h, w) images in [w0, l0, w1, l1, ...] order."""
    n = len(pair_ids)
    moments = moments.reshape((n, 2) + moments.shape[1:])
    finite = finite.reshape(n, 2) & np.isfinite(
        moments.astype(np.float32).reshape(n, 2, -1)).all(-1)
    ok = np.asarray(ok, bool).reshape(n, 2)
    why = []
    for i in range(n):
        parts = []
        for side, name in ((0, "winner"), (1, "loser")):
            if not ok[i, side]:
                r = reasons[2 * i + side].replace(";", ",")
                head, _, tail = r.partition(": ")
                parts.append(f"{head} ({name}): {tail}" if tail else f"{r} ({name})")
            elif not finite[i, side]:
                parts.append(f"non-finite latent ({name})")
        why.append("; ".join(parts))
    good = ok.all(1) & finite.all(1)
    moments = np.where(good.reshape((n,) + (1,) * (moments.ndim - 1)), moments, 0)
    out = {"pair_id": np.asarray(pair_ids, np.int64), "ok": good,
           "reason": np.asarray(why, dtype=str)}
    if flip:
        out.update(moments_w=moments[:, 0, 0], moments_l=moments[:, 1, 0],
                   moments_w_flip=moments[:, 0, 1], moments_l_flip=moments[:, 1, 1])
    else:
        out.update(moments_w=moments[:, 0], moments_l=moments[:, 1])
    return out


def _encode_chunks(units, inputs, ec, vae, mesh, cdir, stats) -> None:
    """Encode the (split, k, rows) work units in order, writing one npz per chunk."""
    flip = bool(ec.random_flip)
    res = int(ec.resolution)
    bs = int(ec.batch_size) * parallel.batch_multiple(mesh)
    state, step = make_encode_step(vae, flip, DTYPES[ec.dtype])
    state = jax.device_put(state, parallel.replicated(mesh))
    win, los = inputs["winner_ref"], inputs["loser_ref"]
    fail_after = int(os.environ.get(FAIL_HOOK_ENV, "0") or 0)

    def specs():
        for split, k, rows in units:
            refs = [r for i in rows for r in (win[i], los[i])]
            for b0 in range(0, len(refs), bs):
                yield refs[b0:b0 + bs], (split, k, rows, b0, len(refs))

    t0, done_imgs = time.time(), 0
    total = sum(2 * len(rows) for *_, rows in units)
    results = []
    for batch in input_pipeline.decoded_batches(specs(), _decode_fn(res), (res, res, 3),
                                                num_workers=int(ec.num_workers)):
        split, k, rows, b0, n_refs = batch.tag
        real = batch.images.shape[0]
        pix, _ = parallel.pad_batch(batch.images, bs)
        out = step(state, parallel.shard_batch(pix, mesh))
        results.append((out, real, batch.ok, batch.reasons))
        stats["images_encoded"] += real
        if b0 + real < n_refs:
            continue
        moments = np.concatenate([parallel.to_host(o[0])[:r] for o, r, _, _ in results])
        finite = np.concatenate([parallel.to_host(o[1])[:r] for o, r, _, _ in results])
        oks = np.concatenate([o for _, _, o, _ in results])
        reasons = [x for *_, rs in results for x in rs]
        results = []
        arrays = _chunk_arrays(inputs["pair_id"][rows], moments, finite, oks, reasons, flip)
        if jax.process_index() == 0:
            _save_npz(chunk_path(cdir, split, k), arrays)
        stats["chunks_encoded"] += 1
        done_imgs += n_refs
        rate = done_imgs / max(time.time() - t0, 1e-9)
        logging.info("encode: %s chunk %d done, %d/%d images, %.1f images/s, ETA %.0f s",
                     split, k, done_imgs, total, rate, (total - done_imgs) / rate)
        if fail_after and stats["chunks_encoded"] >= fail_after:
            raise SimulatedKill(f"{FAIL_HOOK_ENV}={fail_after}: stopping after "
                                f"{stats['chunks_encoded']} chunk(s)")


# ------------------------------------------------------------------------------ the stage
def _vae_facts(ec) -> dict:
    from fifa_jax.models.diffusers_io import read_config
    from fifa_jax.models.vae import parse_vae_config
    path = _vae_dir(ec)
    cfg = parse_vae_config(read_config(path))
    f = 2 ** (len(cfg.block_out_channels) - 1)
    if int(ec.resolution) % f:
        raise InputError(f"config key 'encode.resolution' = {ec.resolution} must be a multiple "
                         f"of the VAE's downsampling factor {f} ({path})")
    h = int(ec.resolution) // f
    return {"latent_channels": cfg.latent_channels, "downsample": f,
            "latent_shape": [cfg.latent_channels, h, h],
            "moments_shape": [2 * cfg.latent_channels, h, h],
            "scaling_factor": cfg.scaling_factor, "shift_factor": cfg.shift_factor}


def _check_config(ec) -> None:
    from fifa_jax.errors import ConfigError
    for key, (kind, arg) in RULES.items():
        value = ec.get(key)
        if value is None:
            continue
        if kind == "choice" and value not in arg:
            raise ConfigError(f"config key 'encode.{key}' must be one of {', '.join(arg)}; "
                              f"got {value!r}")
        if kind == "min" and not value >= arg:
            raise ConfigError(f"config key 'encode.{key}' must be >= {arg}; got {value!r}")
    if not ec.base_model:
        raise ConfigError("config key 'encode.base_model' is empty: name a diffusers pipeline "
                          "folder (model_index.json, vae/, text_encoder/, tokenizer/)")


def _atomic_json(obj, path: pathlib.Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def run(config, workdir) -> dict:
    """Run the encode stage (see the module docstring); returns the report's counts."""
    ec = config.encode
    _check_config(ec)
    workdir = pathlib.Path(workdir)
    if ec.base_model == assets.DEMO:       # the demo's tiny base, built in the work dir
        ec = ml_collections.ConfigDict(ec.to_dict())
        ec.base_model = assets.resolve_base_model(assets.DEMO, workdir)
    out = workdir / STAGE
    cdir = out / CHUNK_DIR
    leader = jax.process_index() == 0
    timings, t_start = {}, time.time()
    inputs = read_inputs(workdir)
    facts = _vae_facts(ec)
    val_rows, val_info = draw_validation(inputs, int(ec.num_val_pairs), int(config.seed),
                                         ec.val_prompts)
    split_rows = {"train": np.asarray(inputs["train_rows"], np.int64), "validation": val_rows}
    used = np.unique(np.concatenate([inputs["prompt_id"][r] for r in split_rows.values()]))
    used_texts = [inputs["texts"][i] for i in used] + [""]     # "" last: the empty prompt
    cs = int(ec.chunk_size)
    n_chunks = {s: -(-len(r) // cs) for s, r in split_rows.items()}
    vae_stats = _stats([_vae_dir(ec)], None)
    fps = {s: _image_fingerprint(split_rows[s], inputs, vae_stats, ec) for s in SPLITS}
    fps["text"] = _text_fingerprint(used_texts, _stats(_text_dirs(ec.base_model), None), ec)
    mesh = parallel.make_mesh(config.get("mesh"))
    done, text_cached = _prepare_chunks(cdir, fps, n_chunks)
    stats = {"chunks_total": sum(n_chunks.values()),
             "chunks_reused": sum(len(v) for v in done.values()), "chunks_encoded": 0,
             "images_encoded": 0, "text_states_computed": 0}

    t = time.time()
    if not text_cached:
        ts = text_states(used_texts, ec.base_model, ec, mesh)
        stats["text_states_computed"] = len(used_texts)
        if leader:
            _save_npz(cdir / "text_states.npz",
                      {k: np.asarray(v) for k, v in ts.items()} | {"prompt_id": used})
    timings["text_s"] = round(time.time() - t, 2)

    t = time.time()
    units = [(s, k, split_rows[s][k * cs:(k + 1) * cs]) for s in SPLITS
             for k in range(n_chunks[s]) if k not in done[s]]
    if units:
        from fifa_jax.models.vae_io import load_vae
        vae = load_vae(_vae_dir(ec), dtype=DTYPES[ec.vae_dtype], variant=ec.variant or None,
                       attention_impl=ec.attention_impl)
        _encode_chunks(units, inputs, ec, vae, mesh, cdir, stats)
    timings["images_s"] = round(time.time() - t, 2)
    hosts.barrier("encode:chunks")
    if not leader:
        return {}

    t = time.time()
    report = _write_outputs(out, cdir, ec, facts, n_chunks, inputs, val_info, stats,
                            int(config.seed))
    timings["tfds_s"] = round(time.time() - t, 2)
    timings["total_s"] = round(time.time() - t_start, 2)
    report["timings"] = timings
    report["devices"] = int(mesh.size)
    report["relabeled_train_pairs"] = inputs["relabeled"]     # select.relabel swaps
    _atomic_json(report, out / REPORT)
    logging.info("encode: %d train + %d validation pairs encoded (%d skipped), %d prompts",
                 report["splits"]["train"]["encoded"], report["splits"]["validation"]["encoded"],
                 report["skipped"], report["prompts"])
    return {k: report[k] for k in ("pairs", "encoded", "skipped", "skipped_by_reason",
                                   "prompts", "validation_pairs", "latent_shape")}


def _write_outputs(out, cdir, ec, facts, n_chunks, inputs, val_info, stats, seed) -> dict:
    """Build the tfds datasets from the chunks; write empty_prompt.npz, dataset_spec.json;
    return the report."""
    with np.load(cdir / "text_states.npz") as z:
        text = {k: z[k] for k in z.files}
    prompt_ids = text["prompt_id"]          # (U,); the text arrays have U + 1 rows, "" last
    flip = bool(ec.random_flip)
    names = ["moments_w", "moments_l"] + (["moments_w_flip", "moments_l_flip"] if flip else [])

    def chunks(split):
        for k in range(n_chunks[split]):
            with np.load(chunk_path(cdir, split, k)) as z:
                yield {key: z[key] for key in z.files}

    # pass 1: which pairs are kept and why the others are not (small arrays only)
    kept, reasons, per_split = {}, [], {}
    for split in SPLITS:
        ids, oks = [], []
        for k in range(n_chunks[split]):
            with np.load(chunk_path(cdir, split, k)) as z:
                ids.append(z["pair_id"])
                oks.append(z["ok"])
                reasons += [r for r in z["reason"].tolist() if r]
        ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        oks = np.concatenate(oks) if oks else np.zeros(0, bool)
        kept[split] = ids[oks]
        per_split[split] = {"pairs": int(ids.size), "encoded": int(oks.sum()),
                            "skipped": int((~oks).sum())}
    if per_split["train"]["encoded"] == 0:
        raise InputError(f"encode: none of the {per_split['train']['pairs']} manifest pairs "
                         f"could be encoded (reasons: {failure_counts(reasons)})")
    # prompts of the kept pairs only, and their rows in the prompts dataset
    def prompt_of(pair_ids):
        return inputs["prompt_id"][np.searchsorted(inputs["pair_id"], pair_ids)]

    kept_prompts = np.unique(np.concatenate([prompt_of(kept[s]) for s in SPLITS]))
    src_row = np.searchsorted(prompt_ids, kept_prompts)
    row_of = {int(p): r for r, p in enumerate(kept_prompts)}

    def pair_examples(split):
        def gen():
            for z in chunks(split):
                for i in np.nonzero(z["ok"])[0]:
                    pid = int(z["pair_id"][i])
                    ex = {"pair_id": pid, "prompt_row": row_of[int(prompt_of(pid))]}
                    ex.update({n: z[n][i] for n in names})
                    yield ex
        return gen

    def prompt_examples():
        for r, p in zip(src_row, kept_prompts):
            ex = {"prompt_id": int(p), "prompt_embeds": text["prompt_embeds"][r]}
            if "pooled" in text:
                ex["pooled"] = text["pooled"][r]
            yield ex

    embeds_shape = list(text["prompt_embeds"].shape[1:])
    pooled_dim = int(text["pooled"].shape[1]) if "pooled" in text else None
    pairs_spec = {"moments_shape": facts["moments_shape"], "dtype": ec.dtype, "flip": flip}
    prompts_spec = {"embeds_shape": embeds_shape, "pooled_dim": pooled_dim, "dtype": ec.dtype}
    nbytes = pair_dataset.write_datasets(
        out, pairs_spec=pairs_spec, prompts_spec=prompts_spec,
        pair_splits={s: pair_examples(s) for s in SPLITS if kept[s].size},
        prompt_examples=prompt_examples)
    empty = {"prompt_embeds": text["prompt_embeds"][-1]}
    if "pooled" in text:
        empty["pooled"] = text["pooled"][-1]
    _save_npz(out / pair_dataset.EMPTY_PROMPT, empty)
    truncated = text["truncated"][:-1][src_row]
    spec = {**facts, "resolution": int(ec.resolution), "dtype": ec.dtype, "flip": flip,
            "embeds_shape": embeds_shape, "pooled_dim": pooled_dim,
            "is_sdxl": pooled_dim is not None, "max_length": int(text["max_length"]),
            "base_model": ec.base_model, "vae_path": _vae_dir(ec), "seed": seed,
            "splits": {s: int(kept[s].size) for s in SPLITS if kept[s].size},
            "num_prompts": int(kept_prompts.size), "empty_prompt": pair_dataset.EMPTY_PROMPT}
    _atomic_json(spec, out / pair_dataset.SPEC)
    skipped = sum(v["skipped"] for v in per_split.values())
    return {"pairs": per_split["train"]["pairs"],
            "encoded": sum(v["encoded"] for v in per_split.values()),
            "skipped": skipped, "skipped_by_reason": failure_counts(reasons),
            "splits": per_split, "prompts": int(kept_prompts.size),
            "prompts_truncated": int(truncated.sum()),
            "validation_pairs": per_split["validation"]["encoded"], "validation": val_info,
            "latent_shape": facts["latent_shape"], "moments_shape": facts["moments_shape"],
            "dtype": ec.dtype, "flip": flip, "bytes": nbytes, "chunks": stats,
            "resolution": int(ec.resolution), "embeds_shape": embeds_shape,
            "pooled_dim": pooled_dim}
