"""Pretrain the demo base: an SD1.5-layout UNet on the demo reward's frozen CLIP text tower.

Data: world images (the three generators, skills 0.5 / 0.7 / 0.85, so the targets themselves
are imperfect) of world prompts, encoded once by the trained demo VAE into posterior moments;
each step draws z ~ q(z | x), scales it by the VAE's `scaling_factor`, and minimises the SD
epsilon loss on the SD1.5 scaled_linear schedule, weighted per row by max(1, 1 / SNR_t):

    t ~ U{0..999}, eps ~ N(0, I), x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps
    L = mean_b max(1, (1 - abar_t) / abar_t) * mean (unet(x_t, t, ctx) - eps)^2,
    ctx = text_encoder(ids).last_hidden_state

with the prompt replaced by the empty prompt for 10 % of the rows (classifier-free guidance).
The text encoder is the demo reward's text tower, frozen (like SD1.5 on OpenAI's CLIP); DPO
later trains the UNet alone. UNet: CrossAttnDownBlock2D + DownBlock2D, block_out_channels
(32, 64), 1 layer per block, 2 heads, on 4 x 16 x 16 latents, and diffusers'
`addition_embed_type="text"`: the context, attention-pooled, is added to the time embedding.

Why these three choices (measured 2026-12-02 with `measure.sample_report` and the loss with
the right vs a shuffled prompt on 64 world images): with plain epsilon loss and a text
encoder trained jointly, the base followed colour / position at chance (13 % / 19 %; chance
14 % / 20 %) and the right prompt did not lower the loss at any t: the jointly trained
encoder's states hardly vary between prompts (std across prompts 0.04 against a scale of
0.7; the reward tower's: 0.84), and plain epsilon loss gives almost no weight to the high-noise
steps, where only the prompt tells the content (at t = 999 it is abar = 0.5 % of the x0
error). The pooled path alone (1800 steps) and the SNR weight alone (600) left it at chance;
all three together, 600 steps: colour 21 %, and the right prompt lowers the loss by 2-4 %.
The shipped build's figures are in `models/measurements.json` ("samples"); it stays
deliberately imperfect, which leaves DPO room.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fifa_jax.demo import loop, world_data
from fifa_jax.training import noise_schedule as ns
from fifa_jax.demo.base import (DIFFUSERS_VERSION, SCHEDULER_CONFIG, init_tensors,
                                         text_encoder_config)

CFG_DROPOUT = 0.1
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
    "sample_size": world_data.IMAGE_SIZE // 4, "in_channels": 4, "out_channels": 4,
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "only_cross_attention": False,
    "block_out_channels": [32, 64], "layers_per_block": 1, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 8, "norm_eps": 1e-5,
    "cross_attention_dim": 32, "attention_head_dim": 2, "use_linear_projection": False,
    "addition_embed_type": "text", "addition_embed_type_num_heads": 2,
}


def unet_config(channels=None) -> dict:
    """UNET_CONFIG, with `block_out_channels` = channels (two ints) when given: the demo's
    wider-base diagnosis (`build_models --unet_channels 64,128`, benchmarks/RESULTS.md)."""
    if channels is None:
        return dict(UNET_CONFIG)
    groups = UNET_CONFIG["norm_num_groups"]
    try:
        ints = [int(c) for c in channels]
    except (TypeError, ValueError):
        ints = []
    if len(ints) != 2 or any(c <= 0 or c % groups for c in ints):
        raise ValueError(f"demo unet_channels {channels!r}: need two positive integer "
                         f"multiples of norm_num_groups={groups}")
    return dict(UNET_CONFIG, block_out_channels=ints)


def init_unet(seed: int, config: dict | None = None):
    from fifa_jax.models.torch_names import fill_from_torch
    from fifa_jax.models.unet_io import UNET_RENAMES, abstract_unet, unet_name_map
    abstract = abstract_unet(config or UNET_CONFIG)
    tensors = init_tensors(unet_name_map(abstract), np.random.default_rng([seed, 1]))
    return fill_from_torch(abstract, tensors, UNET_RENAMES, "demo unet init")


def init_text_encoder(seed: int):
    from fifa_jax.models import clip_io
    from fifa_jax.models.clip_config import config_from_dict
    from fifa_jax.demo.reward import tokenizer_files
    vocab = json.loads(tokenizer_files()["vocab.json"])
    abstract = clip_io.build(config_from_dict(text_encoder_config(vocab), "demo text encoder"))
    tensors = init_tensors(clip_io.name_map(abstract), np.random.default_rng([seed, 3]))
    return clip_io.fill(abstract, tensors, "demo text encoder init")


def encode_moments(vae, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """(n, H, W, 3) uint8 -> (n, 2, 4, h, w) float32 posterior (mean, logvar)."""
    graphdef, state = nnx.split(vae)

    def enc(s, x):
        post = nnx.merge(graphdef, s).encode(x)
        return jnp.stack([post.mean, post.logvar], axis=1)
    enc = jax.jit(enc)
    return world_data.map_images(enc, state, images, batch)


def snr_weight(schedule: ns.NoiseSchedule, t: jax.Array) -> jax.Array:
    """max(1, 1 / SNR_t) = max(1, (1 - abar_t) / abar_t) per row: the epsilon error turned into
    the x0 error where the noise dominates (SNR < 1), where only the prompt can tell the
    content; plain epsilon loss elsewhere. (B,) float32."""
    abar = jnp.asarray(schedule.alphas_cumprod)[t]
    return jnp.maximum(1.0, (1.0 - abar) / abar)


def loss_fn(unet_graph, text_graph, scaling: float, schedule: ns.NoiseSchedule,
            frozen_text=None):
    """frozen_text: the text encoder's state, held fixed (params then hold the UNet only)."""
    def loss(params, batch, key):
        unet = nnx.merge(unet_graph, params["unet"])
        text = nnx.merge(text_graph, params["text"] if frozen_text is None else frozen_text)
        k_z, k_eps, k_t = jax.random.split(key, 3)
        mom = batch["moments"]
        mean, logvar = mom[:, 0], jnp.clip(mom[:, 1], -30.0, 20.0)
        z = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_z, mean.shape)) * scaling
        eps = jax.random.normal(k_eps, z.shape)
        t = jax.random.randint(k_t, (z.shape[0],), 0, schedule.num_train_timesteps)
        xt = ns.add_noise(schedule, z, eps, t)
        ctx = text(batch["ids"]).last_hidden_state
        err = jnp.mean((unet(xt, t, ctx) - ns.target(schedule, z, eps, t)) ** 2, axis=(1, 2, 3))
        return jnp.mean(snr_weight(schedule, t) * err)
    return loss


def train(vae, *, steps: int, batch: int, n_images: int, lr: float = 1e-3, seed: int = 0,
          text_encoder=None, config: dict | None = None):
    """-> (unet, text_encoder, info). `vae`: the trained demo VAE (its scaling_factor).
    text_encoder: a CLIPTextModel to condition on, frozen (None: a fresh one trained jointly);
    config: the UNet's config (None: the shipped UNET_CONFIG; `unet_config` widens it)."""
    data = world_data.draw(n_images, seed=200 + seed)
    moments = encode_moments(vae, data.images)
    ids = world_data.tokenize(data.texts)
    empty = world_data.tokenize([""])[0]
    unet = init_unet(seed, config)
    text = init_text_encoder(seed) if text_encoder is None else text_encoder
    unet_graph, unet_params = nnx.split(unet)
    text_graph, text_params = nnx.split(text)
    schedule = ns.from_scheduler_config(SCHEDULER_CONFIG)

    def batch_fn(i):
        rng = np.random.default_rng([seed, 5, i])
        idx = rng.integers(0, n_images, batch)
        drop = rng.random(batch) < CFG_DROPOUT
        return {"moments": moments[idx], "ids": np.where(drop[:, None], empty[None], ids[idx])}

    frozen = None if text_encoder is None else text_params
    params = {"unet": unet_params} if frozen is not None else {"unet": unet_params,
                                                               "text": text_params}
    params, losses = loop.fit(params,
                              loss_fn(unet_graph, text_graph, float(vae.scaling_factor),
                                      schedule, frozen),
                              batch_fn, steps=steps, lr=lr, seed=seed, name="unet")
    text_state = params["text"] if frozen is None else frozen
    return (nnx.merge(unet_graph, params["unet"]), nnx.merge(text_graph, text_state),
            {"final_loss": float(losses[-50:].mean()), "first_loss": float(losses[:10].mean())})
