"""Training data for the demo models, drawn straight from the demo world's own generators.

    draw(n, seed, size=64) -> Draw: images (n, size, size, 3) uint8, prompts (n,) texts,
                              prompt dicts and scene dicts (the world's `make_image` output)
    tokenize(texts) -> (n, 77) int32 ids of the demo CLIP tokenizer (EOS-padded)
    match_reward(prompt, scene) -> the world's true reward of `scene` judged against `prompt`

Prompts come from `world.make_prompts` (the world's style mix, 5 % harmful) and images
from `world.make_image` with one of the world's three generators chosen uniformly, so the
data are as imperfect as the world's (skills 0.5 / 0.7 / 0.85). Everything is numpy-seeded.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import tempfile

import numpy as np

from fifa_jax.demo import world as dw

IMAGE_SIZE = 64
MAX_LENGTH = 77


@dataclasses.dataclass
class Draw:
    images: np.ndarray        # (n, H, W, 3) uint8
    texts: list               # (n,) prompt text of each image
    prompts: list             # (n,) prompt dicts (world.make_prompts)
    scenes: list              # (n,) scene dicts (world.make_image)


def prompt_pool(n_prompts: int, seed: int) -> list:
    return dw.make_prompts(n_prompts, np.random.default_rng([seed, 1]), harmful_fraction=0.05)


def draw(n: int, seed: int, *, size: int = IMAGE_SIZE, n_prompts: int = 600,
         models=None) -> Draw:
    """n images of prompts drawn uniformly from a pool of `n_prompts` world prompts."""
    pool = prompt_pool(n_prompts, seed)
    rng = np.random.default_rng([seed, 2])
    names = list(models or dw.MODELS)
    ims, texts, prompts, scenes = [], [], [], []
    for _ in range(n):
        p = pool[int(rng.integers(len(pool)))]
        im, scene = dw.make_image(p, names[int(rng.integers(len(names)))], size, rng)
        ims.append(np.asarray(im, np.uint8))
        texts.append(p["text"])
        prompts.append(p)
        scenes.append(scene)
    return Draw(np.stack(ims), texts, prompts, scenes)


def match_reward(prompt: dict, scene: dict) -> float:
    """The world's reward formula for `scene` against `prompt` (unasked attributes count as
    right; `scene`'s own aesthetic), as `make_image` computes it for its own prompt."""
    w = dw.REWARD_WEIGHTS
    ok = {k: prompt[k] is None or prompt[k] == scene[k]
          for k in ("colour", "shape", "count", "position")}
    r = sum(w[k] * ok[k] for k in ok) + w["aesthetic"] * scene["aesthetic"]
    if "true_reward" in scene and all(scene[f"{k}_ok"] == ok[k] for k in ok):
        return float(scene["true_reward"])  # the world's own value (it may add terms)
    return float(r)


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The demo CLIP tokenizer (the files of `scoring.demo_reward.tokenizer_files`)."""
    from fifa_jax.models.tokenizers import load_tokenizer
    from fifa_jax.demo.reward import tokenizer_files
    tmp = tempfile.mkdtemp(prefix="demo_tok_")
    for name, data in tokenizer_files().items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    return load_tokenizer(tmp)


def tokenize(texts, max_length: int = MAX_LENGTH) -> np.ndarray:
    """(n, max_length) int32 ids, truncated and EOS-padded as the pipelines tokenize."""
    enc = tokenizer()(list(texts), padding="max_length", truncation=True,
                      max_length=max_length, return_tensors="np")
    return enc["input_ids"].astype(np.int32)


def to_model_images(images: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float32 in [-1, 1] (the VAE's input)."""
    return np.transpose(images.astype(np.float32) / 127.5 - 1.0, (0, 3, 1, 2))


def map_images(fn, state, images: np.ndarray, batch: int) -> np.ndarray:
    """fn(state, x (batch, 3, H, W) model images) over (n, H, W, 3) uint8 images in
    fixed-size batches (the last padded with copies of its first image, then cut), so one
    compiled `fn` serves every batch; returns the outputs concatenated."""
    out = []
    for lo in range(0, len(images), batch):
        x = to_model_images(images[lo:lo + batch])
        pad = batch - len(x)
        x = np.concatenate([x, np.repeat(x[:1], pad, 0)]) if pad else x
        out.append(np.asarray(fn(state, x))[:batch - pad])
    return np.concatenate(out)
