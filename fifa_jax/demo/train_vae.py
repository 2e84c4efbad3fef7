"""Train the demo AutoencoderKL: 64 x 64 RGB world images <-> 4 x 16 x 16 latents.

Config: 3 levels (block_out_channels 16, 32, 64; factor 4), one resnet per level, mid-block
attention, 8 norm groups. Loss per image:

    L = mean|x - x^| + mean (x - x^)^2 + KL_WEIGHT * KL(q(z|x) || N(0, I)) / (3 H W)

with x^ = decode(z), z ~ q(z|x) (reparameterised). After training, `scaling_factor` is set to
1 / std of the posterior means over the training images, so the UNet sees unit-scale latents.
Trained on random 32 x 32 crops (see `train`). Init: PyTorch default scales from a numpy RNG (`demo/base.py: init_tensors`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fifa_jax.demo import loop, world_data
from fifa_jax.demo.base import init_tensors

DIFFUSERS_VERSION = "0.30.0"
KL_WEIGHT = 1e-3
VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64], "layers_per_block": 1, "act_fn": "silu",
    "norm_num_groups": 8, "sample_size": world_data.IMAGE_SIZE, "scaling_factor": 1.0,
}


def init_vae(config: dict, seed: int):
    from fifa_jax.models.torch_names import fill_from_torch
    from fifa_jax.models.vae_io import VAE_RENAMES, abstract_vae, vae_name_map
    abstract = abstract_vae(config)
    tensors = init_tensors(vae_name_map(abstract), np.random.default_rng([seed, 2]))
    return fill_from_torch(abstract, tensors, VAE_RENAMES, "demo vae init")


def loss_fn(graphdef):
    def loss(params, x, key):
        vae = nnx.merge(graphdef, params)
        post = vae.encode(x)
        rec = vae.decode(post.sample(key))
        kl = 0.5 * jnp.sum(post.mean ** 2 + jnp.exp(post.logvar) - 1.0 - post.logvar,
                           axis=(1, 2, 3))
        err = rec - x
        per_pixel = jnp.mean(jnp.abs(err)) + jnp.mean(err ** 2)
        return per_pixel + KL_WEIGHT * jnp.mean(kl) / np.prod(x.shape[1:])
    return loss


def encode_means(vae, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """(n, H, W, 3) uint8 -> (n, 4, H/4, W/4) float32 posterior means (unscaled)."""
    graphdef, state = nnx.split(vae)
    enc = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x).mean)
    return world_data.map_images(enc, state, images, batch)


def reconstruct(vae, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """(n, H, W, 3) uint8 -> decode(mean) as (n, H, W, 3) uint8."""
    graphdef, state = nnx.split(vae)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    out = []
    for lo in range(0, len(images), batch):
        x = world_data.to_model_images(images[lo:lo + batch])
        y = np.asarray(fn(state, x))
        out.append(np.round(np.clip(np.transpose(y, (0, 2, 3, 1)) / 2 + 0.5, 0, 1) * 255))
    return np.concatenate(out).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def train(*, steps: int, batch: int, n_images: int, crop: int = 32, lr: float = 2e-3,
          seed: int = 0):
    """-> (trained AutoencoderKL with scaling_factor set, info dict). Trains on random
    `crop` x `crop` windows (at multiples of 4) of the 64 x 64 images: the VAE is
    convolutional, and the crops cost a quarter of the full images."""
    data = world_data.draw(n_images, seed=100 + seed)
    vae = init_vae(VAE_CONFIG, seed)
    graphdef, params = nnx.split(vae)

    def batch_fn(i):
        rng = np.random.default_rng([seed, 3, i])
        idx = rng.integers(0, n_images, batch)
        y, x = 4 * rng.integers(0, (world_data.IMAGE_SIZE - crop) // 4 + 1, 2)
        return world_data.to_model_images(data.images[idx, y:y + crop, x:x + crop])

    params, losses = loop.fit(params, loss_fn(graphdef), batch_fn, steps=steps, lr=lr,
                              seed=seed, name="vae")
    vae = nnx.merge(graphdef, params)
    means = encode_means(vae, data.images[:512])
    scale = float(1.0 / means.std())
    config = dict(VAE_CONFIG, scaling_factor=round(scale, 5))
    trained = init_vae(config, seed)
    nnx.update(trained, nnx.state(vae, nnx.Param))
    return trained, {"final_loss": float(losses[-20:].mean()), "scaling_factor": config[
        "scaling_factor"], "latent_std": float(means.std())}
