"""Stable Diffusion UNet2DConditionModel (SD1.5, SD2.x, SDXL) in Flax NNX.

Configured from a diffusers `config.json` dict (see `unet_config.parse_unet_config`); params
float32, compute in `dtype`; attention via `dot_product_attention(impl=attention_impl)`;
optional remat per block with a named policy (`remat.POLICIES`). Layout in and out is
PyTorch's (B, C, H, W); inside, NHWC.

Hot loops: `graphdef, state = nnx.split(model)` once, then a `jax.jit` over a function that
calls `nnx.merge(graphdef, state)(...)`. With remat on, the model must be merged inside the
traced function (closing over a live model from outside a jit trips nnx's trace check).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from fifa_jax.models.embeddings import TextTimeEmbedding, TimestepEmbedding, timestep_embedding
from fifa_jax.models.layers import Conv2D, GroupNorm, KeyGen
from fifa_jax.models.remat import maybe_remat, resolve_policy
from fifa_jax.models.unet_blocks import DownBlock, MidBlockCrossAttn, UpBlock
from fifa_jax.models.unet_config import UNetConfig, parse_unet_config


def _call_down(block, h, temb, ctx):
    return block(h, temb, ctx)


def _call_mid(block, h, temb, ctx):
    return block(h, temb, ctx)


def _call_up(block, h, skips, temb, ctx):
    return block(h, skips, temb, ctx)


class UNet2DConditionModel(nnx.Module):
    """model(sample, timestep, encoder_hidden_states, added_cond_kwargs) -> prediction."""

    def __init__(self, config: Mapping[str, Any] | UNetConfig, *, dtype=jnp.float32,
                 attention_impl: str = "auto", remat_policy: str | None = None,
                 rngs: nnx.Rngs):
        cfg = config if isinstance(config, UNetConfig) else parse_unet_config(config)
        keys = KeyGen(rngs.params())
        resolve_policy(remat_policy)  # validate early
        self.config, self.dtype = cfg, dtype
        self.attention_impl, self.remat_policy = attention_impl, remat_policy
        boc = cfg.block_out_channels
        n = len(boc)
        kw = dict(dtype=dtype, keys=keys)
        self.conv_in = Conv2D(cfg.in_channels, boc[0], cfg.conv_in_kernel, **kw)
        self.time_embedding = TimestepEmbedding(boc[0], cfg.time_embed_dim, **kw)
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim,
                                                   cfg.time_embed_dim, **kw)
        elif cfg.addition_embed_type == "text":
            self.add_embedding = TextTimeEmbedding(cfg.cross_attention_dim[0],
                                                   cfg.time_embed_dim,
                                                   cfg.addition_embed_type_num_heads, **kw)
        else:
            self.add_embedding = None
        downs, cout = [], boc[0]
        for i, t in enumerate(cfg.down_block_types):
            cin, cout = cout, boc[i]
            downs.append(DownBlock(i, cin, cout, cfg=cfg,
                                   with_attention=t == "CrossAttnDownBlock2D",
                                   add_downsample=i < n - 1, impl=attention_impl, **kw))
        self.down_blocks = nnx.List(downs)
        self.mid_block = (MidBlockCrossAttn(boc[-1], cfg=cfg, impl=attention_impl, **kw)
                          if cfg.mid_block_type is not None else None)
        rboc = tuple(reversed(boc))
        ups, cout = [], rboc[0]
        for i, t in enumerate(cfg.up_block_types):
            cprev, cout = cout, rboc[i]
            ups.append(UpBlock(i, cin=rboc[min(i + 1, n - 1)], cout=cout, cprev=cprev, cfg=cfg,
                               with_attention=t == "CrossAttnUpBlock2D",
                               add_upsample=i < n - 1, impl=attention_impl, **kw))
        self.up_blocks = nnx.List(ups)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, boc[0], cfg.norm_eps, dtype=dtype)
        self.conv_out = Conv2D(boc[0], cfg.out_channels, cfg.conv_out_kernel, **kw)

    def _time_embed(self, timestep, batch: int, added_cond_kwargs, ctx=None) -> jax.Array:
        cfg = self.config
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (batch,))
        temb = self.time_embedding(timestep_embedding(
            t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift).astype(self.dtype))
        if self.add_embedding is None:
            return temb
        if cfg.addition_embed_type == "text":
            return temb + self.add_embedding(ctx)
        if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs \
                or "time_ids" not in added_cond_kwargs:
            raise ValueError("this UNet has addition_embed_type='text_time': pass "
                             "added_cond_kwargs={'text_embeds': (B, P), 'time_ids': (B, 6)}")
        time_ids = jnp.asarray(added_cond_kwargs["time_ids"])
        tid = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                 flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        tid = tid.reshape(time_ids.shape[0], -1)
        text = jnp.asarray(added_cond_kwargs["text_embeds"]).astype(jnp.float32)
        add = jnp.concatenate([text, tid], axis=-1)
        if add.shape[-1] != cfg.projection_class_embeddings_input_dim:
            raise ValueError(f"text_embeds + time_ids embed to {add.shape[-1]} features, config "
                             f"projection_class_embeddings_input_dim is "
                             f"{cfg.projection_class_embeddings_input_dim}")
        return temb + self.add_embedding(add.astype(self.dtype))

    def __call__(self, sample: jax.Array, timestep, encoder_hidden_states: jax.Array,
                 added_cond_kwargs: Mapping[str, jax.Array] | None = None) -> jax.Array:
        """sample (B, C, H, W), timestep (B,) or scalar, encoder_hidden_states (B, L, D),
        SDXL: added_cond_kwargs {"text_embeds": (B, P), "time_ids": (B, 6)}.
        Returns the prediction (B, C_out, H, W), float32."""
        cfg = self.config
        b, _, hh, ww = sample.shape
        f = 2 ** (len(cfg.block_out_channels) - 1)
        if hh % f or ww % f:
            raise ValueError(f"sample spatial size {(hh, ww)} must be a multiple of {f}")
        x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        ctx = jnp.asarray(encoder_hidden_states).astype(self.dtype)
        temb = self._time_embed(timestep, b, added_cond_kwargs, ctx)
        h = self.conv_in(x)
        skips = [h]
        down = maybe_remat(_call_down, self.remat_policy)
        for block in self.down_blocks:
            h, s = down(block, h, temb, ctx)
            skips.extend(s)
        if self.mid_block is not None:
            h = maybe_remat(_call_mid, self.remat_policy)(self.mid_block, h, temb, ctx)
        up = maybe_remat(_call_up, self.remat_policy)
        for block in self.up_blocks:
            k = len(block.resnets)
            h = up(block, h, tuple(skips[-k:]), temb, ctx)
            skips = skips[:-k]
        h = jax.nn.silu(self.conv_norm_out(h))
        out = self.conv_out(h)
        return jnp.transpose(out, (0, 3, 1, 2)).astype(jnp.float32)
