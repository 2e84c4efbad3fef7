"""Train the demo proxy reward: a tiny CLIP-layout dual encoder, PickScore-style.

Data: pairs of the world (a prompt, two images from random world generators, JPEG q90 as the
world stores them, preprocessed exactly as `scoring.margins` does: bicubic resize to 32 x 32,
OpenAI mean / std). Per batch of B pairs the logits are
    s_ij = exp(logit_scale) * cos(text_i, image_j)   over all 2B images of the batch,
and prompt i's target puts p_i = sigmoid(2 (r_i0 - r_i1)) on its own first image, 1 - p_i on
its second (r: the world's true rewards; 2 = the world's Bradley-Terry beta, i.e. the expected
human label) and 0 on the other prompts' images: contrastive over the batch, PickScore's
preference loss between the prompt's own pair. Small (32 wide, 2 + 2 layers) and briefly
trained, so it is imperfect on purpose; `margin_correlation` measures how much.
"""
from __future__ import annotations

import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from fifa_jax.demo import world as dw
from fifa_jax.models.clip import clip_score
from fifa_jax.demo import loop, world_data
from fifa_jax.scoring import preprocess as pp
from fifa_jax.demo.reward import BOS, EOS, model_config, tokenizer_files
from fifa_jax.demo.base import init_tensors

IMAGE_SIZE = 32
BT_BETA = 2.0


def reward_config() -> dict:
    vocab = json.loads(tokenizer_files()["vocab.json"])
    cfg = model_config(len(vocab), vocab[BOS], vocab[EOS])
    cfg["vision_config"] = dict(cfg["vision_config"], image_size=IMAGE_SIZE, patch_size=4)
    cfg["logit_scale_init_value"] = math.log(1 / 0.07)
    return cfg


def image_config() -> pp.ImageProcessorConfig:
    return pp.ImageProcessorConfig(shortest_edge=IMAGE_SIZE, crop_hw=(IMAGE_SIZE, IMAGE_SIZE))


def init_clip(seed: int):
    from fifa_jax.models import clip_io
    from fifa_jax.models.clip_config import config_from_dict
    cfg = reward_config()
    abstract = clip_io.build(config_from_dict(cfg, "demo reward"))
    names = clip_io.name_map(abstract)
    special = {k: v for k, v in names.items() if v[0][-1] in ("logit_scale", "class_embedding")}
    rng = np.random.default_rng([seed, 7])
    tensors = init_tensors({k: v for k, v in names.items() if k not in special}, rng)
    for key, (_, _, shape) in sorted(special.items()):
        tensors[key] = (np.asarray(cfg["logit_scale_init_value"], np.float32)
                        if key == "logit_scale" else
                        (rng.standard_normal(shape) / math.sqrt(shape[0])).astype(np.float32))
    return clip_io.fill(abstract, tensors, "demo reward init")


def _jpeg_crop(image: np.ndarray, cfg: pp.ImageProcessorConfig) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        return pp.resize_and_crop(im, cfg)


def draw_pairs(n: int, seed: int, n_prompts: int = 600) -> dict:
    """n world pairs: ids (n, 77), pixels (n, 2, 32, 32, 3) uint8, rewards (n, 2)."""
    pool = world_data.prompt_pool(n_prompts, seed)
    rng = np.random.default_rng([seed, 8])
    names, cfg = list(dw.MODELS), image_config()
    texts, pix, rewards = [], [], []
    for _ in range(n):
        p = pool[int(rng.integers(len(pool)))]
        side = []
        for _ in range(2):
            im, scene = dw.make_image(p, names[int(rng.integers(len(names)))],
                                      world_data.IMAGE_SIZE, rng)
            side.append((_jpeg_crop(np.asarray(im), cfg), scene["true_reward"]))
        texts.append(p["text"])
        pix.append(np.stack([s[0] for s in side]))
        rewards.append([s[1] for s in side])
    return {"ids": world_data.tokenize(texts), "pixels": np.stack(pix),
            "rewards": np.asarray(rewards, np.float32), "texts": texts}


def loss_fn(graphdef, image_cfg):
    def loss(params, batch, key):
        del key
        m = nnx.merge(graphdef, params)
        b = batch["ids"].shape[0]
        pix = batch["pixels"].reshape((2 * b,) + batch["pixels"].shape[2:])
        t = m.get_text_features(batch["ids"])
        i = m.get_image_features(pp.normalize(pix, image_cfg))
        t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
        i = i / jnp.linalg.norm(i, axis=-1, keepdims=True)
        scale = jnp.exp(jnp.minimum(m.logit_scale[...], math.log(100.0)))
        logits = scale * (t @ i.T)                                       # (B, 2B)
        p = jax.nn.sigmoid(BT_BETA * (batch["rewards"][:, 0] - batch["rewards"][:, 1]))
        target = jnp.zeros((b, 2 * b)).at[jnp.arange(b), 2 * jnp.arange(b)].set(p)
        target = target.at[jnp.arange(b), 2 * jnp.arange(b) + 1].set(1 - p)
        return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits, axis=-1), axis=-1))
    return loss


def pair_scores(model, pairs: dict, batch: int = 128) -> np.ndarray:
    """(n, 2) exp(logit_scale) * cos of each pair's two images against its prompt."""
    graphdef, state = nnx.split(model)
    cfg = image_config()

    @jax.jit
    def score(s, ids, pix):
        m = nnx.merge(graphdef, s)
        b = ids.shape[0]
        t = jnp.repeat(m.get_text_features(ids), 2, axis=0)
        i = m.get_image_features(pp.normalize(pix.reshape((2 * b,) + pix.shape[2:]), cfg))
        return clip_score(t, i, m.logit_scale[...]).reshape(b, 2)

    out = []
    n = len(pairs["ids"])
    for lo in range(0, n, batch):
        ids, pix = pairs["ids"][lo:lo + batch], pairs["pixels"][lo:lo + batch]
        pad = batch - len(ids)
        if pad:
            ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
            pix = np.concatenate([pix, np.repeat(pix[:1], pad, 0)])
        out.append(np.asarray(score(state, ids, pix))[:batch - pad])
    return np.concatenate(out)


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def margin_correlation(scores: np.ndarray, rewards: np.ndarray) -> dict:
    """Pearson and Spearman correlation of proxy margins s0 - s1 with true r0 - r1, and the
    fraction of pairs (true margin > 0.25) that the proxy orders like the true reward."""
    dm, dr = scores[:, 0] - scores[:, 1], rewards[:, 0] - rewards[:, 1]
    clear = np.abs(dr) > 0.25
    return {"pearson": float(np.corrcoef(dm, dr)[0, 1]),
            "spearman": float(np.corrcoef(_ranks(dm), _ranks(dr))[0, 1]),
            "pair_accuracy": float(np.mean(np.sign(dm[clear]) == np.sign(dr[clear]))),
            "n_pairs": int(len(dm))}


def train(*, steps: int, batch: int, n_pairs: int, lr: float = 2e-3, seed: int = 0):
    """-> (trained CLIPModel, info). Pairs drawn with seed 300 + seed; eval uses 400 + seed."""
    pairs = draw_pairs(n_pairs, seed=300 + seed)
    model = init_clip(seed)
    graphdef, params = nnx.split(model)

    def batch_fn(i):
        idx = np.random.default_rng([seed, 9, i]).integers(0, n_pairs, batch)
        return {k: pairs[k][idx] for k in ("ids", "pixels", "rewards")}

    params, losses = loop.fit(params, loss_fn(graphdef, image_config()), batch_fn,
                              steps=steps, lr=lr, seed=seed, name="reward")
    model = nnx.merge(graphdef, params)
    model.logit_scale[...] = jnp.minimum(model.logit_scale[...], math.log(100.0))  # as trained
    return model, {"logit_scale": float(model.logit_scale[...]), "final_loss": float(losses[-20:].mean())}
