"""ResNet block, down- and up-sampler of the SD UNet and VAE (NHWC)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fifa_jax.models.layers import Conv2D, GroupNorm, KeyGen, Linear, activation


class ResnetBlock2D(nnx.Module):
    """norm1-act-conv1 (+ time projection) -> norm2-act-conv2, plus a (1x1) shortcut.

    x: (B, H, W, Cin), temb: (B, T) or None -> (B, H, W, Cout).
    """

    def __init__(self, cin: int, cout: int, *, temb_channels: int | None, groups: int,
                 eps: float, act_fn: str = "silu", output_scale_factor: float = 1.0,
                 dtype=jnp.float32, keys: KeyGen):
        self.act = activation(act_fn)
        self.output_scale_factor = output_scale_factor
        self.dtype = dtype
        self.norm1 = GroupNorm(groups, cin, eps, dtype=dtype)
        self.conv1 = Conv2D(cin, cout, 3, keys=keys, dtype=dtype)
        self.time_emb_proj = (Linear(temb_channels, cout, keys=keys, dtype=dtype)
                              if temb_channels is not None else None)
        self.norm2 = GroupNorm(groups, cout, eps, dtype=dtype)
        self.conv2 = Conv2D(cout, cout, 3, keys=keys, dtype=dtype)
        self.conv_shortcut = Conv2D(cin, cout, 1, keys=keys, dtype=dtype) if cin != cout else None

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(self.act(self.norm1(x)))
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("ResnetBlock2D with time_emb_proj needs temb")
            h = h + self.time_emb_proj(self.act(temb))[:, None, None, :]
        h = self.conv2(self.act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. padding=0 pads one row/column at bottom/right first (the VAE's)."""

    def __init__(self, channels: int, *, padding: int = 1, dtype=jnp.float32, keys: KeyGen):
        self.padding = padding
        self.conv = Conv2D(channels, channels, 3, stride=2, padding=padding, keys=keys,
                         dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv. (B, H, W, C) -> (B, 2H, 2W, C)."""

    def __init__(self, channels: int, *, dtype=jnp.float32, keys: KeyGen):
        self.conv = Conv2D(channels, channels, 3, keys=keys, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)
