"""Stable Diffusion AutoencoderKL in Flax NNX (diffusers layout and config).

encode: image (B, 3, H, W) in [-1, 1] -> DiagonalGaussian over latents (B, 4, H/f, W/f);
decode: latents (B, 4, h, w) -> image (B, 3, h*f, w*f); f = 2**(len(block_out_channels)-1).
Latents fed to the UNet are `(z - shift_factor) * scaling_factor`; `scale_latents` /
`unscale_latents` apply that. Params float32, compute in `dtype`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct

from fifa_jax.models.layers import Conv2D, GroupNorm, KeyGen, Linear
from fifa_jax.models.attention import dot_product_attention
from fifa_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from fifa_jax.models.unet_config import UnsupportedConfigError

_VAE_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,),
    "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32,
    "sample_size": 32, "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None,
    "latents_std": None, "force_upcast": True, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}
_EPS = 1e-6  # diffusers' Encoder / Decoder use eps=1e-6 everywhere


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Resolved AutoencoderKL hyper-parameters."""
    in_channels: int
    out_channels: int
    block_out_channels: tuple
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    scaling_factor: float
    shift_factor: float | None
    use_quant_conv: bool
    use_post_quant_conv: bool
    mid_block_add_attention: bool
    raw_json: str


def parse_vae_config(cfg: Mapping[str, Any]) -> VAEConfig:
    """Validate a diffusers AutoencoderKL config dict."""
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in _VAE_DEFAULTS)
    if unknown:
        raise UnsupportedConfigError(f"VAE config has keys this model does not know: {unknown}")
    c = {**_VAE_DEFAULTS, **cfg}
    n = len(c["block_out_channels"])
    if tuple(c["down_block_types"]) != ("DownEncoderBlock2D",) * n:
        raise UnsupportedConfigError(f"VAE config down_block_types={c['down_block_types']!r}: "
                                     f"only {n} x DownEncoderBlock2D is supported")
    if tuple(c["up_block_types"]) != ("UpDecoderBlock2D",) * n:
        raise UnsupportedConfigError(f"VAE config up_block_types={c['up_block_types']!r}: "
                                     f"only {n} x UpDecoderBlock2D is supported")
    for key in ("latents_mean", "latents_std"):
        if c[key] is not None:
            raise UnsupportedConfigError(f"VAE config {key}={c[key]!r}: per-channel latent "
                                         "normalisation is not supported")
    if c["act_fn"] not in ("silu", "swish"):
        raise UnsupportedConfigError(f"VAE config act_fn={c['act_fn']!r} not supported")
    return VAEConfig(
        in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
        block_out_channels=tuple(int(v) for v in c["block_out_channels"]),
        layers_per_block=int(c["layers_per_block"]),
        latent_channels=int(c["latent_channels"]), norm_num_groups=int(c["norm_num_groups"]),
        scaling_factor=float(c["scaling_factor"]),
        shift_factor=None if c["shift_factor"] is None else float(c["shift_factor"]),
        use_quant_conv=bool(c["use_quant_conv"]),
        use_post_quant_conv=bool(c["use_post_quant_conv"]),
        mid_block_add_attention=bool(c["mid_block_add_attention"]),
        raw_json=json.dumps(dict(cfg), sort_keys=True))


class SpatialSelfAttention(nnx.Module):
    """Single-head self-attention over H*W positions with GroupNorm and residual.

    x: (B, H, W, C) -> (B, H, W, C). Names as diffusers' Attention (group_norm, to_q, ...).
    """

    def __init__(self, channels: int, groups: int, *, impl: str, dtype, keys: KeyGen):
        self.impl, self.dtype = impl, dtype
        self.group_norm = GroupNorm(groups, channels, _EPS, dtype=dtype)
        self.to_q = Linear(channels, channels, keys=keys, dtype=dtype)
        self.to_k = Linear(channels, channels, keys=keys, dtype=dtype)
        self.to_v = Linear(channels, channels, keys=keys, dtype=dtype)
        self.to_out = Linear(channels, channels, keys=keys, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        h = self.group_norm(x).reshape(b, hh * ww, 1, c)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        o = dot_product_attention(q, k, v, impl=self.impl).astype(self.dtype)
        return self.to_out(o.reshape(b, hh, ww, c)) + x


class MidBlock(nnx.Module):
    """UNetMidBlock2D without time: resnet -> (attention) -> resnet."""

    def __init__(self, channels: int, groups: int, *, add_attention: bool, impl: str, dtype,
                 keys: KeyGen):
        kw = dict(temb_channels=None, groups=groups, eps=_EPS, dtype=dtype, keys=keys)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, **kw) for _ in range(2)])
        self.attentions = nnx.List([SpatialSelfAttention(
            channels, groups, impl=impl, dtype=dtype, keys=keys)]) if add_attention else None

    def __call__(self, h):
        h = self.resnets[0](h)
        if self.attentions is not None:
            h = self.attentions[0](h)
        return self.resnets[1](h)


class EncoderBlock(nnx.Module):
    """DownEncoderBlock2D: resnets then an (asymmetrically padded) stride-2 conv."""

    def __init__(self, cin, cout, n, groups, *, add_downsample, dtype, keys):
        self.resnets = nnx.List([ResnetBlock2D(cin if j == 0 else cout, cout, temb_channels=None,
                                               groups=groups, eps=_EPS, dtype=dtype, keys=keys)
                                 for j in range(n)])
        self.downsamplers = nnx.List([Downsample2D(cout, padding=0, dtype=dtype, keys=keys)]) \
            if add_downsample else None

    def __call__(self, h):
        for r in self.resnets:
            h = r(h)
        return self.downsamplers[0](h) if self.downsamplers is not None else h


class DecoderBlock(nnx.Module):
    """UpDecoderBlock2D: resnets then nearest 2x + conv."""

    def __init__(self, cin, cout, n, groups, *, add_upsample, dtype, keys):
        self.resnets = nnx.List([ResnetBlock2D(cin if j == 0 else cout, cout, temb_channels=None,
                                               groups=groups, eps=_EPS, dtype=dtype, keys=keys)
                                 for j in range(n)])
        self.upsamplers = nnx.List([Upsample2D(cout, dtype=dtype, keys=keys)]) \
            if add_upsample else None

    def __call__(self, h):
        for r in self.resnets:
            h = r(h)
        return self.upsamplers[0](h) if self.upsamplers is not None else h


class Encoder(nnx.Module):
    """(B, H, W, Cin) -> (B, H/f, W/f, 2 * latent_channels) (mean and logvar moments)."""

    def __init__(self, cfg: VAEConfig, *, impl: str, dtype, keys: KeyGen):
        boc, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2D(cfg.in_channels, boc[0], 3, keys=keys, dtype=dtype)
        blocks, cout = [], boc[0]
        for i in range(len(boc)):
            cin, cout = cout, boc[i]
            blocks.append(EncoderBlock(cin, cout, cfg.layers_per_block, g,
                                       add_downsample=i < len(boc) - 1, dtype=dtype, keys=keys))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(boc[-1], g, add_attention=cfg.mid_block_add_attention,
                                  impl=impl, dtype=dtype, keys=keys)
        self.conv_norm_out = GroupNorm(g, boc[-1], _EPS, dtype=dtype)
        self.conv_out = Conv2D(boc[-1], 2 * cfg.latent_channels, 3, keys=keys, dtype=dtype)

    def __call__(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    """(B, h, w, latent_channels) -> (B, h*f, w*f, out_channels)."""

    def __init__(self, cfg: VAEConfig, *, impl: str, dtype, keys: KeyGen):
        boc, g = cfg.block_out_channels, cfg.norm_num_groups
        rboc = tuple(reversed(boc))
        self.conv_in = Conv2D(cfg.latent_channels, boc[-1], 3, keys=keys, dtype=dtype)
        self.mid_block = MidBlock(boc[-1], g, add_attention=cfg.mid_block_add_attention,
                                  impl=impl, dtype=dtype, keys=keys)
        blocks, cout = [], rboc[0]
        for i in range(len(boc)):
            cin, cout = cout, rboc[i]
            blocks.append(DecoderBlock(cin, cout, cfg.layers_per_block + 1, g,
                                       add_upsample=i < len(boc) - 1, dtype=dtype, keys=keys))
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = GroupNorm(g, boc[0], _EPS, dtype=dtype)
        self.conv_out = Conv2D(boc[0], cfg.out_channels, 3, keys=keys, dtype=dtype)

    def __call__(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


@struct.dataclass
class DiagonalGaussian:
    """Latent posterior; mean, logvar: (B, C, h, w) float32 (logvar clipped to [-30, 20])."""
    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """mean + std * N(0, 1) noise drawn from `rng`."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


class AutoencoderKL(nnx.Module):
    """vae.encode(x) -> DiagonalGaussian; vae.decode(z) -> image; NCHW in and out."""

    def __init__(self, config: Mapping[str, Any] | VAEConfig, *, dtype=jnp.float32,
                 attention_impl: str = "auto", rngs: nnx.Rngs):
        cfg = config if isinstance(config, VAEConfig) else parse_vae_config(config)
        keys = KeyGen(rngs.params())
        self.config, self.dtype = cfg, dtype
        self.scaling_factor, self.shift_factor = cfg.scaling_factor, cfg.shift_factor
        c2 = 2 * cfg.latent_channels
        self.encoder = Encoder(cfg, impl=attention_impl, dtype=dtype, keys=keys)
        self.decoder = Decoder(cfg, impl=attention_impl, dtype=dtype, keys=keys)
        self.quant_conv = Conv2D(c2, c2, 1, keys=keys, dtype=dtype) if cfg.use_quant_conv \
            else None
        self.post_quant_conv = Conv2D(cfg.latent_channels, cfg.latent_channels, 1, keys=keys,
                                    dtype=dtype) if cfg.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """x: (B, C, H, W) image in [-1, 1] -> posterior over (B, latent, H/f, W/f)."""
        f = 2 ** (len(self.config.block_out_channels) - 1)
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {x.shape[2:]} must be a multiple of {f}")
        h = self.encoder(jnp.transpose(x, (0, 2, 3, 1)).astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        h = jnp.transpose(h, (0, 3, 1, 2)).astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z: jax.Array) -> jax.Array:
        """z: (B, latent, h, w) unscaled latents -> (B, out, h*f, w*f) float32."""
        h = jnp.transpose(z, (0, 2, 3, 1)).astype(self.dtype)
        if self.post_quant_conv is not None:
            h = self.post_quant_conv(h)
        return jnp.transpose(self.decoder(h), (0, 3, 1, 2)).astype(jnp.float32)

    def scale_latents(self, z: jax.Array) -> jax.Array:
        """VAE latents -> UNet latents: (z - shift_factor) * scaling_factor."""
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def unscale_latents(self, z: jax.Array) -> jax.Array:
        """UNet latents -> VAE latents: z / scaling_factor + shift_factor."""
        return z / self.scaling_factor + (self.shift_factor or 0.0)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Reconstruction: decode(sample or mode of encode(x)). (B, C, H, W)."""
        post = self.encode(x)
        return self.decode(post.mode() if rng is None else post.sample(rng))
