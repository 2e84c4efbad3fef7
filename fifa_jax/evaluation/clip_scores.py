"""The scorer interface of the evaluate stage, and the two CLIP-layout text-image scores.

Every scorer (here, `aesthetic`, `hpsv2`, `safety_checker`) is a `Scorer`:

    scorer.score(images (N, H, W, 3) uint8, prompts: N strings) -> (N,) float32
    scorer.name        short metric name ("clip_score", "pickscore", ...)
    scorer.definition  the formula and checkpoint, to print next to every number

Images are the generated RGB images as uint8; each scorer does its own model's preprocessing
(CLIP: transformers' CLIPImageProcessor from the checkpoint's `preprocessor_config.json`, via
`scoring.preprocess`: PIL resize of the short side, centre crop, on the host; mean/std inside
the jitted step). Unique prompts are encoded once. Work is split into batches of `batch_size`
rows per device of `mesh` (default: one device), the last one padded, so one compiled shape.

    CLIP score (torchmetrics): max(100 * cos(E_I, E_C), 0) per image, with
        openai/clip-vit-large-patch14 (HF CLIPModel layout).
    PickScore: exp(logit_scale) * cos(E_I, E_C), yuvalkirstain/PickScore_v1 (the score stage's
        `RewardModel`, the same jitted step as the margins).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fifa_jax import parallel
from fifa_jax.dtypes import compute_dtype
from fifa_jax.errors import InputError
from fifa_jax.scoring import embeddings
from fifa_jax.scoring import preprocess as pp
from fifa_jax.scoring.score_step import l2_normalize


def default_mesh(mesh=None):
    """`mesh`, or a one-device mesh over the first local device."""
    return mesh if mesh is not None else parallel.make_mesh(devices=jax.devices()[:1])


def check_images(images, prompts: Optional[Sequence[str]] = None) -> np.ndarray:
    """images as a (N, H, W, 3) uint8 array; prompts (when given) must be N strings."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    if prompts is not None:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of N strings, got one string")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    return images


def clip_crops(images: np.ndarray, cfg: pp.ImageProcessorConfig) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, h, w, 3) uint8: CLIPImageProcessor's resize and centre crop
    (PIL, on the host; an image already at the crop size passes through unchanged)."""
    from PIL import Image
    if images.shape[0] == 0:
        return np.zeros((0,) + tuple(cfg.out_hw) + (3,), np.uint8)
    return np.stack([pp.resize_and_crop(Image.fromarray(im), cfg) for im in images])


def unique_prompts(prompts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(unique prompts in first-seen order, (N,) index of each prompt into them)."""
    index: dict[str, int] = {}
    rows = np.array([index.setdefault(p, len(index)) for p in prompts], np.int64)
    return list(index), rows


class Scorer:
    """Base of the evaluation scorers: see the module docstring."""
    name: str = ""
    definition: str = ""
    higher_is_better: bool = True

    def score(self, images, prompts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.name}: {self.definition})"


def load_image_tower(path: str, *, dtype=jnp.float32, attention_impl: str = "auto"):
    """A CLIPVisionModelWithProjection (its `image_embeds` = transformers' get_image_features)
    from a folder holding either a dual CLIPModel (only `vision_model.*` and
    `visual_projection.weight` are read; the text tower is skipped) or a vision tower with
    projection."""
    from fifa_jax.models import clip_io
    from fifa_jax.models.clip import CLIPVisionModelWithProjection
    from fifa_jax.models.clip_config import CLIPConfig, read_config
    from fifa_jax.models.safetensors_io import RenamedTensors
    config, _ = read_config(path)
    if not isinstance(config, CLIPConfig):
        model = clip_io.load_vision_encoder(path, dtype=dtype, attention_impl=attention_impl)
        if not isinstance(model, CLIPVisionModelWithProjection):
            raise InputError(f"{path}: a vision tower without visual_projection; image "
                             f"features need the projection")
        return model
    vcfg = dataclasses.replace(config.vision_config, projection_dim=config.projection_dim)
    file, tensors = clip_io.read_weights(path)
    keep = {k: k for k in tensors
            if k.startswith("vision_model.") or k == "visual_projection.weight"}
    abstract = clip_io.build(vcfg, CLIPVisionModelWithProjection, dtype=dtype,
                             attention_impl=attention_impl)
    return clip_io.fill(abstract, RenamedTensors(tensors, keep), file)


def image_features_fn(graphdef, image_cfg: pp.ImageProcessorConfig):
    """jitted fn(state, crops (B, h, w, 3) uint8) -> (B, P) float32 unit-norm image features,
    for the state of a CLIPModel or a CLIPVisionModelWithProjection split into `graphdef`."""
    @jax.jit
    def fn(state, crops):
        m = nnx.merge(graphdef, state)
        x = pp.normalize(crops, image_cfg)
        feats = m.get_image_features(x) if hasattr(m, "get_image_features") else m(x).image_embeds
        return l2_normalize(feats)
    return fn


def text_features_fn(graphdef):
    """jitted fn(state, ids (B, L), mask (B, L)) -> (B, P) float32 unit-norm text features."""
    @jax.jit
    def fn(state, ids, mask):
        return l2_normalize(embeddings.text_tower_features(nnx.merge(graphdef, state), ids, mask))
    return fn


class _CLIPTextImage(Scorer):
    """Shared part of CLIP score and PickScore: tokenizer, crops, unit-norm features. The
    model is split once and its state replicated once; the jitted functions live as long as
    the scorer (one compile per batch shape)."""

    def __init__(self, model, tokenizer, image_cfg, *, batch_size: int, mesh, state=None):
        self.model, self.tokenizer, self.image_cfg = model, tokenizer, image_cfg
        self.batch_size, self.mesh = int(batch_size), default_mesh(mesh)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_length = embeddings.clip_max_length(model)
        graphdef, own_state = nnx.split(model)
        self._state = jax.device_put(own_state if state is None else state,
                                     parallel.replicated(self.mesh))
        self._image_fn = image_features_fn(graphdef, image_cfg)
        self._text_fn = text_features_fn(graphdef)

    def text_features(self, prompts: Sequence[str]) -> np.ndarray:
        """(U, P) unit-norm text features (padding to 77, truncation keeps the EOS token)."""
        tok = embeddings.tokenize(self.tokenizer, list(prompts), self.max_length)
        return embeddings.run_batched(self._text_fn, self._state, [tok.ids, tok.mask],
                                      self.batch_size, self.mesh, what=f"{self.name} text")

    def image_features(self, images) -> np.ndarray:
        """(N, P) unit-norm image features of (N, H, W, 3) uint8 images."""
        crops = clip_crops(check_images(images), self.image_cfg)
        return embeddings.run_batched(self._image_fn, self._state, [crops], self.batch_size,
                                      self.mesh, what=f"{self.name} images")

    def cosines(self, images, prompts: Sequence[str]) -> np.ndarray:
        """(N,) float32 cos(image_i, prompt_i)."""
        images = check_images(images, prompts)
        texts, rows = unique_prompts(prompts)
        if not texts:
            return np.zeros((0,), np.float32)
        img = self.image_features(images)
        txt = self.text_features(texts)[rows]
        return np.sum(img.astype(np.float32) * txt.astype(np.float32), axis=-1)


class CLIPScore(_CLIPTextImage):
    name = "clip_score"

    def __init__(self, model, tokenizer, image_cfg, *, batch_size: int = 16, mesh=None,
                 source: str = ""):
        super().__init__(model, tokenizer, image_cfg, batch_size=batch_size, mesh=mesh)
        self.definition = ("CLIP score (torchmetrics): max(100 * cos(E_I, E_C), 0) per image, "
                           f"E = get_image_features / get_text_features of {source or 'CLIP'} "
                           "(openai/clip-vit-large-patch14 by default); torchmetrics' CLIPScore "
                           "metric clamps the mean instead (equal when no cosine is negative)")

    def score(self, images, prompts: Sequence[str]) -> np.ndarray:
        return clip_score_from_cosines(self.cosines(images, prompts))


def clip_score_from_cosines(cos: np.ndarray) -> np.ndarray:
    """(N,) cosines -> (N,) float32 max(100 * cos, 0)."""
    return np.maximum(np.float32(100.0) * np.asarray(cos, np.float32), np.float32(0.0))


def load_clip_score(path: str, *, processor_path: str = "", dtype="float32",
                    batch_size: int = 16, mesh=None, attention_impl: str = "auto") -> CLIPScore:
    """CLIP score with a transformers CLIPModel folder (config.json, safetensors, tokenizer
    files, preprocessor_config.json; the last two from `processor_path` when given)."""
    from fifa_jax.models.clip_io import load_clip
    proc = processor_path or path
    model = load_clip(path, dtype=compute_dtype(dtype), attention_impl=attention_impl)
    return CLIPScore(model, embeddings.load_tokenizer(proc), pp.load_config(proc),
                     batch_size=batch_size, mesh=mesh, source=path)


class PickScore(_CLIPTextImage):
    """exp(logit_scale) * cos with the score stage's `RewardModel` and its jitted step."""
    name = "pickscore"

    def __init__(self, reward, *, batch_size: int = 16, mesh=None):
        from fifa_jax.scoring.score_step import make_score_step
        model = reward.ensure_model()
        state, self._step = make_score_step(model, reward.image_cfg,
                                            compute_dtype(reward.dtype, "score.reward.dtype"))
        super().__init__(model, reward.tokenizer, reward.image_cfg, batch_size=batch_size,
                         mesh=mesh, state=state)
        self.reward = reward
        self.definition = ("PickScore: exp(logit_scale) * cos(E_I, E_C) with "
                           f"{reward.path} (yuvalkirstain/PickScore_v1: logit_scale.exp() ~ 100; "
                           "softmax over a prompt's images gives preference probabilities)")

    def score(self, images, prompts: Sequence[str]) -> np.ndarray:
        images = check_images(images, prompts)
        texts, rows = unique_prompts(prompts)
        if not texts:
            return np.zeros((0,), np.float32)
        txt = np.asarray(self.text_features(texts), np.float32)[rows]
        crops = clip_crops(images, self.image_cfg)
        out = embeddings.run_batched(self._step, self._state, [crops, txt],
                                     self.batch_size, self.mesh, what="pickscore")
        return np.asarray(out, np.float32)


def load_pickscore(path: str, *, processor_path: str = "", dtype="float32",
                   batch_size: int = 16, mesh=None, attention_impl: str = "auto") -> PickScore:
    """PickScore from a CLIPModel folder (PickScore_v1) and its processor folder
    (laion/CLIP-ViT-H-14-laion2B-s32B-b79K keeps the tokenizer and preprocessor_config.json);
    loaded with the score stage's `load_reward`."""
    from fifa_jax.scoring.margins import load_reward
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    reward = load_reward(path, name, processor_path, attention_impl)
    return PickScore(reward, batch_size=batch_size, mesh=mesh)
