"""Pretrain the demo base: an SD1.5-layout UNet and its CLIP text encoder, trained jointly.

Data: world images (the three generators, skills 0.5 / 0.7 / 0.85, so the targets themselves
are imperfect) of world prompts, encoded once by the trained demo VAE into posterior moments;
each step draws z ~ q(z | x), scales it by the VAE's `scaling_factor`, and minimises the SD
epsilon loss on the SD1.5 scaled_linear schedule:

    t ~ U{0..999}, eps ~ N(0, I), x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps
    L = mean (unet(x_t, t, text_encoder(ids).last_hidden_state) - eps)^2

with the prompt replaced by the empty prompt for 10 % of the rows (classifier-free guidance).
The text encoder (the demo reward's text-tower config: 32 wide, 2 layers) starts at PyTorch
default scales and learns with the UNet; DPO later trains the UNet alone.
UNet: CrossAttnDownBlock2D + DownBlock2D, block_out_channels (32, 64), 1 layer per block,
2 heads, on 4 x 16 x 16 latents. Small and briefly trained: its samples look like world
images (shapes, counts, noise) but follow the prompt's colour / position only near chance
(shipped build: colour 13 %, position 19 % by `measure.classify`; chance 14 % / 20 %; the
world's generators 66 % / 62 %), which leaves DPO a lot of room. The prompt barely moves its
prediction: at t = 500 the epsilon of "two red circles on the left" and "... blue ..."
differ by 0.2 % of the epsilon's scale. Tried and not shipped (2026-12-02): conditioning on
the reward's frozen text tower instead (commit 7ccb963's variant), 800 steps of 32 from the
shipped VAE: the context's effect grows to 1.5 % but colour (17 %) and position (20 %) stay
at chance. What would likely change it: many more steps (it learns the images long before
the prompts) or a pooled text embedding added to the time embedding.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fifa_jax.demo import loop, world_data
from fifa_jax.training import noise_schedule as ns
from fifa_jax.training.demo_base import (DIFFUSERS_VERSION, SCHEDULER_CONFIG, init_tensors,
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
}


def init_unet(seed: int):
    from fifa_jax.models.torch_names import fill_from_torch
    from fifa_jax.models.unet_io import UNET_RENAMES, abstract_unet, unet_name_map
    abstract = abstract_unet(UNET_CONFIG)
    tensors = init_tensors(unet_name_map(abstract), np.random.default_rng([seed, 1]))
    return fill_from_torch(abstract, tensors, UNET_RENAMES, "demo unet init")


def init_text_encoder(seed: int):
    from fifa_jax.models import clip_io
    from fifa_jax.models.clip_config import config_from_dict
    from fifa_jax.scoring.demo_checkpoints import tokenizer_files
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


def loss_fn(unet_graph, text_graph, scaling: float, schedule: ns.NoiseSchedule):
    def loss(params, batch, key):
        unet = nnx.merge(unet_graph, params["unet"])
        text = nnx.merge(text_graph, params["text"])
        k_z, k_eps, k_t = jax.random.split(key, 3)
        mom = batch["moments"]
        mean, logvar = mom[:, 0], jnp.clip(mom[:, 1], -30.0, 20.0)
        z = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_z, mean.shape)) * scaling
        eps = jax.random.normal(k_eps, z.shape)
        t = jax.random.randint(k_t, (z.shape[0],), 0, schedule.num_train_timesteps)
        xt = ns.add_noise(schedule, z, eps, t)
        ctx = text(batch["ids"]).last_hidden_state
        return jnp.mean((unet(xt, t, ctx) - ns.target(schedule, z, eps, t)) ** 2)
    return loss


def train(vae, *, steps: int, batch: int, n_images: int, lr: float = 1e-3, seed: int = 0):
    """-> (unet, text_encoder, info). `vae`: the trained demo VAE (its scaling_factor)."""
    data = world_data.draw(n_images, seed=200 + seed)
    moments = encode_moments(vae, data.images)
    ids = world_data.tokenize(data.texts)
    empty = world_data.tokenize([""])[0]
    unet, text = init_unet(seed), init_text_encoder(seed)
    unet_graph, unet_params = nnx.split(unet)
    text_graph, text_params = nnx.split(text)
    schedule = ns.from_scheduler_config(SCHEDULER_CONFIG)

    def batch_fn(i):
        rng = np.random.default_rng([seed, 5, i])
        idx = rng.integers(0, n_images, batch)
        drop = rng.random(batch) < CFG_DROPOUT
        return {"moments": moments[idx], "ids": np.where(drop[:, None], empty[None], ids[idx])}

    params, losses = loop.fit({"unet": unet_params, "text": text_params},
                              loss_fn(unet_graph, text_graph, float(vae.scaling_factor),
                                      schedule),
                              batch_fn, steps=steps, lr=lr, seed=seed, name="unet")
    return (nnx.merge(unet_graph, params["unet"]), nnx.merge(text_graph, params["text"]),
            {"final_loss": float(losses[-50:].mean()), "first_loss": float(losses[:10].mean())})
