"""Text to image with a diffusers pipeline folder: text states, guided sampling, VAE decode.

    gen = TextToImage.load("path/to/pipeline", unet_dir=None, sampler="ddim", num_steps=50,
                           guidance_scale=7.5)
    images = gen(["a red circle"], seeds=[0])        # (N, H, W, 3) uint8

What diffusers' StableDiffusion(XL)Pipeline does, in our models: prompt states as the pipeline
builds them (SD1/2: the text encoder's last hidden state; SDXL: both encoders' penultimate
states and the second's pooled embedding, with add_time_ids (H, W, 0, 0, H, W)); the empty
prompt as the negative; start noise N(0, 1) of shape (C, H/f, W/f) drawn per (prompt key,
seed) from `start_noise`, so two models (base and tuned) sampled for the same prompt and seed
start from the same noise, whatever the batch; `fifa_jax.sampling.denoise`'s loop; the VAE
decode of latents / scaling_factor (+ shift); images as diffusers' `(x / 2 + 0.5).clamp(0, 1)`,
then `round(x * 255)` to uint8.
"""
from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fifa_jax import parallel
from fifa_jax.dtypes import DTYPES
from fifa_jax.errors import InputError
from fifa_jax.models import platform
from fifa_jax.sampling.denoise import make_denoise


def default_guidance(is_sdxl: bool) -> float:
    """method.md section 4: 7.5 for SD1.x / 2.x, 5.0 for SDXL."""
    return 5.0 if is_sdxl else 7.5


def prompt_key(text: str) -> int:
    """A stable 32-bit key of a prompt (crc32 of its UTF-8 bytes)."""
    return zlib.crc32(text.encode("utf-8")) & 0x7FFFFFFF


def start_noise(seed: int, keys: Sequence[int], seeds: Sequence[int], shape) -> np.ndarray:
    """(N, *shape) float32 unit Gaussians; row i from fold_in(fold_in(key(seed), keys[i]),
    seeds[i]): the same (prompt, seed) gives the same noise in any batch."""
    base = jax.random.key(seed)

    def one(k, s):
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(base, k), s), shape)
    return np.asarray(jax.vmap(one)(jnp.asarray(keys, jnp.uint32),
                                    jnp.asarray(seeds, jnp.uint32)))


def unet_model_fn(graphdef, is_sdxl: bool):
    """model_fn(params, x (n, C, h, w), t, ctx) -> the UNet's output, for `make_denoise`; ctx
    is the text states (n, L, D), or SDXL's dict of them, `text_embeds` and `time_ids`."""
    def model_fn(params, x, t, ctx):
        unet = nnx.merge(graphdef, params)
        if is_sdxl:
            return unet(x, t, ctx["encoder_hidden_states"],
                        {"text_embeds": ctx["text_embeds"], "time_ids": ctx["time_ids"]})
        return unet(x, t, ctx)
    return model_fn


def to_uint8(images) -> np.ndarray:
    """(N, 3, H, W) decoder output in [-1, 1] -> (N, H, W, 3) uint8, as diffusers does."""
    x = np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0.0, 1.0)
    return np.round(np.transpose(x, (0, 2, 3, 1)) * 255).astype(np.uint8)


@dataclasses.dataclass
class TextToImage:
    """A loaded pipeline ready to sample. Build with `TextToImage.load`."""
    path: str
    unet_config: object
    unet_graph: object
    unet_params: object
    vae: object
    text_config: ml_collections.ConfigDict
    scheduler_config: dict
    sampler: str
    num_steps: int
    guidance_scale: float
    is_sdxl: bool
    mesh: object
    batch_size: int = 8
    noise_seed: int = 0
    dtype: str = "float32"       # the compute dtype in use ("auto" resolved)
    image_size: int | None = None  # image side in pixels (None: the UNet's sample_size)

    @classmethod
    def load(cls, path: str, *, unet_dir: str | None = None, sampler: str = "ddim",
             num_steps: int = 50, guidance_scale: float | None = None,
             dtype: str = "auto", attention_impl: str = "auto", batch_size: int = 8,
             noise_seed: int = 0, mesh=None, lora_dir: str | None = None) -> "TextToImage":
        """`path`: a diffusers pipeline folder; `unet_dir`: another UNet folder (e.g. a tuned
        one) to use instead of path/unet; `lora_dir`: a diffusers LoRA folder or file (e.g.
        export/lora) merged into the UNet's kernels (training/lora.py); guidance None: the
        model's default; dtype "auto": bfloat16 on accelerators, float32 on the CPU."""
        from fifa_jax.models.pipeline import load_pipeline
        from fifa_jax.models.unet_io import load_unet
        mesh = mesh if mesh is not None else parallel.make_mesh(None)
        dtype = platform.compute_dtype_name(dtype, mesh)
        pipe = load_pipeline(path, dtype=DTYPES[dtype], attention_impl=attention_impl,
                             components=("vae", "scheduler", "unet") if unet_dir is None
                             else ("vae", "scheduler"))
        unet = pipe.unet if unet_dir is None else load_unet(
            unet_dir, dtype=DTYPES[dtype], attention_impl=attention_impl)
        for what, value in (("unet", unet), ("vae", pipe.vae),
                            ("scheduler", pipe.scheduler_config)):
            if value is None:
                raise InputError(f"{path}: the pipeline has no {what}")
        if lora_dir:
            from fifa_jax.training.lora import merge_file_into
            merge_file_into(unet, lora_dir)
        graph, params = nnx.split(unet)
        text_config = ml_collections.ConfigDict({
            "text_dtype": dtype, "attention_impl": attention_impl, "variant": "",
            "dtype": "float32", "batch_size": batch_size})
        return cls(path=path, unet_config=unet.config, unet_graph=graph,
                   unet_params=jax.device_put(params, parallel.replicated(mesh)),
                   vae=pipe.vae, text_config=text_config,
                   scheduler_config=pipe.scheduler_config, sampler=sampler,
                   num_steps=int(num_steps),
                   guidance_scale=float(default_guidance(pipe.is_sdxl) if guidance_scale is None
                                        else guidance_scale),
                   is_sdxl=pipe.is_sdxl, mesh=mesh, batch_size=int(batch_size),
                   noise_seed=int(noise_seed), dtype=dtype)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w): `image_size` / the VAE factor when set, else diffusers' default size,
        the UNet config's sample_size."""
        import json
        if self.image_size:
            side = int(self.image_size) // self.vae_factor
            return (self.unet_config.in_channels, side, side)
        size = json.loads(self.unet_config.raw_json).get("sample_size") or 64
        size = size if isinstance(size, (list, tuple)) else (size, size)
        return (self.unet_config.in_channels, int(size[0]), int(size[1]))

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's
        downsampling (2 per level after the first): `resolution.size_multiple`."""
        from fifa_jax.training.resolution import size_multiple
        return size_multiple(len(self.vae.config.block_out_channels),
                             len(self.unet_config.block_out_channels))[1]

    @property
    def default_image_size(self) -> int:
        import json
        size = json.loads(self.unet_config.raw_json).get("sample_size") or 64
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_factor

    def text_states(self, texts: Sequence[str]) -> dict:
        """prompt_embeds (N, L, D) [, pooled (N, P)] float32 for `texts`."""
        from fifa_jax.training.encode import text_states
        return text_states(list(texts), self.path, self.text_config, self.mesh)

    def context(self, states: dict, rows) -> object:
        """The model context of rows `rows` of `states`: (n, L, D), or SDXL's dict."""
        emb = states["prompt_embeds"][rows]
        if not self.is_sdxl:
            return emb
        h, w = self.latent_shape[1] * self.vae_factor, self.latent_shape[2] * self.vae_factor
        ids = np.tile(np.array([h, w, 0, 0, h, w], np.float32), (len(emb), 1))
        return {"encoder_hidden_states": emb, "text_embeds": states["pooled"][rows],
                "time_ids": ids}

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @functools.cached_property
    def _denoise(self):
        return make_denoise(unet_model_fn(self.unet_graph, self.is_sdxl),
                            scheduler_config=self.scheduler_config,
                            sampler=self.sampler, num_steps=self.num_steps,
                            guidance_scale=self.guidance_scale)

    @functools.cached_property
    def _decode(self):
        graph, state = nnx.split(self.vae)
        state = jax.device_put(state, parallel.replicated(self.mesh))

        def decode(st, z):
            vae = nnx.merge(graph, st)
            return vae.decode(vae.unscale_latents(z))
        return functools.partial(jax.jit(decode), state)

    def sample(self, cond, uncond, noise: np.ndarray, step_key: int = 0) -> np.ndarray:
        """Images (n, H, W, 3) uint8 from contexts and start noise (n, C, h, w)."""
        n = noise.shape[0]
        multiple = parallel.batch_multiple(self.mesh)
        pad = (-n) % multiple

        def padded(x):
            return np.concatenate([x, np.repeat(x[:1], pad, axis=0)]) if pad else x
        cond, uncond = jax.tree.map(padded, cond), jax.tree.map(padded, uncond)
        sharded = lambda x: parallel.shard_batch(np.asarray(x), self.mesh)  # noqa: E731
        with jax.set_mesh(self.mesh):     # the models keep activations split by batch
            latents = self._denoise(self.unet_params, sharded(padded(noise)),
                                    jax.tree.map(sharded, cond), jax.tree.map(sharded, uncond),
                                    jax.random.key(step_key) if self.sampler == "euler_a"
                                    else None)
        return to_uint8(parallel.to_host(self._decode(latents)))[:n]   # gathered over hosts

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int],
                 on_cut=None) -> np.ndarray:
        """One image per (prompts[i], seeds[i]): (N, H, W, 3) uint8. `on_cut(texts,
        max_length)` hears of the prompts longer than the text encoder reads (they are cut)."""
        if len(prompts) != len(seeds):
            raise ValueError("prompts and seeds must have the same length")
        unique = sorted(set(prompts))
        states = self.text_states(unique + [""])
        cut = [t for t, c in zip(unique, states.get("truncated", ())) if c]
        if cut and on_cut is not None:
            on_cut(cut, int(states["max_length"]))
        row = {t: i for i, t in enumerate(unique)}
        empty = len(unique)
        out = []
        for lo in range(0, len(prompts), self.batch_size):
            texts, ss = prompts[lo:lo + self.batch_size], seeds[lo:lo + self.batch_size]
            rows = np.array([row[t] for t in texts])
            noise = start_noise(self.noise_seed, [prompt_key(t) for t in texts], ss,
                                self.latent_shape)
            out.append(self.sample(self.context(states, rows),
                                   self.context(states, np.full(len(rows), empty)), noise,
                                   step_key=lo))
        return np.concatenate(out) if out else np.zeros((0,), np.uint8)

