"""Down, mid and up blocks of the SD UNet (NHWC), named as in diffusers.

Down blocks return (h, skips); up blocks consume skips (last first), concatenating on channels.
As in diffusers, `resnet_out_scale_factor` does not reach these four block types (their
resnets use output_scale_factor 1); `mid_block_scale_factor` does reach the mid block.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from fifa_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from fifa_jax.models.transformer2d import Transformer2DModel


def _transformer(channels, heads, layers, context_dim, cfg, impl, dtype, keys):
    return Transformer2DModel(channels, heads, num_layers=layers, context_dim=context_dim,
                              groups=cfg.norm_num_groups,
                              use_linear_projection=cfg.use_linear_projection,
                              upcast=cfg.upcast_attention, impl=impl, dtype=dtype, keys=keys)


def _resnet(cin, cout, cfg, temb, scale, dtype, keys):
    return ResnetBlock2D(cin, cout, temb_channels=temb, groups=cfg.norm_num_groups,
                         eps=cfg.norm_eps, output_scale_factor=scale, dtype=dtype, keys=keys)


class DownBlock(nnx.Module):
    """CrossAttnDownBlock2D (with_attention) or DownBlock2D.

    h: (B, H, W, Cin) -> (B, H', W', Cout) and a tuple of skip activations.
    """

    def __init__(self, i: int, cin: int, cout: int, *, cfg, with_attention: bool,
                 add_downsample: bool, impl: str, dtype, keys: KeyGen):
        n, temb = cfg.layers_per_block[i], cfg.time_embed_dim
        self.resnets = nnx.List([_resnet(cin if j == 0 else cout, cout, cfg, temb,
                                         1.0, dtype, keys)
                                 for j in range(n)])
        self.attentions = nnx.List([
            _transformer(cout, cfg.num_heads[i], cfg.transformer_layers[i],
                         cfg.cross_attention_dim[i], cfg, impl, dtype, keys)
            for _ in range(n)]) if with_attention else None
        self.downsamplers = nnx.List([Downsample2D(cout, padding=cfg.downsample_padding,
                                                   dtype=dtype, keys=keys)]) \
            if add_downsample else None

    def __call__(self, h, temb, context):
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[j](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, tuple(skips)


class MidBlockCrossAttn(nnx.Module):
    """UNetMidBlock2DCrossAttn: resnet -> transformer -> resnet. (B, H, W, C) -> same."""

    def __init__(self, channels: int, *, cfg, impl: str, dtype, keys: KeyGen):
        temb, s = cfg.time_embed_dim, cfg.mid_block_scale_factor
        self.resnets = nnx.List([_resnet(channels, channels, cfg, temb, s, dtype, keys)
                                 for _ in range(2)])
        self.attentions = nnx.List([_transformer(
            channels, cfg.num_heads[-1], cfg.transformer_layers[-1],
            cfg.cross_attention_dim[-1], cfg, impl, dtype, keys)])

    def __call__(self, h, temb, context):
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, temb)


class UpBlock(nnx.Module):
    """CrossAttnUpBlock2D (with_attention) or UpBlock2D, block `i` in up order.

    h: (B, H, W, Cprev), skips: the matching down skips (consumed last first)
    -> (B, 2H, 2W, Cout) (no 2x on the final block).
    """

    def __init__(self, i: int, *, cin: int, cout: int, cprev: int, cfg, with_attention: bool,
                 add_upsample: bool, impl: str, dtype, keys: KeyGen):
        rev = lambda t: tuple(reversed(t))
        n = rev(cfg.layers_per_block)[i] + 1
        temb = cfg.time_embed_dim
        resnets = []
        for j in range(n):
            skip = cin if j == n - 1 else cout
            rin = cprev if j == 0 else cout
            resnets.append(_resnet(rin + skip, cout, cfg, temb, 1.0,
                                   dtype, keys))
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List([
            _transformer(cout, rev(cfg.num_heads)[i], rev(cfg.transformer_layers)[i],
                         rev(cfg.cross_attention_dim)[i], cfg, impl, dtype, keys)
            for _ in range(n)]) if with_attention else None
        self.upsamplers = nnx.List([Upsample2D(cout, dtype=dtype, keys=keys)]) \
            if add_upsample else None

    def __call__(self, h, skips, temb, context):
        skips = list(skips)
        for j, resnet in enumerate(self.resnets):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[j](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h
