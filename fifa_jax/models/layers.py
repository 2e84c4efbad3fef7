"""Small layers shared by the UNet and the VAE (channels-last, NHWC).

Under a mesh in context (`jax.set_mesh`), the outputs of Linear and Conv2D are constrained
to the batch axes (`parallel.mesh.constrain_batch`): FSDP gathers weights, never activations.
Norms compute in float32 (two-pass variance, like PyTorch) and return the compute dtype, so
bfloat16 compute keeps float32 statistics. Parameter names follow nnx (`scale`, `bias`,
`kernel`); `torch_names.py` maps them to PyTorch's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fifa_jax.models.conv import conv2d
from fifa_jax.models.dense import dense
from fifa_jax.parallel.mesh import constrain_batch

PARAM_DTYPE = jnp.float32


class GroupNorm(nnx.Module):
    """GroupNorm over (B, ..., C): statistics per (sample, group) over all other axes."""

    def __init__(self, num_groups: int, num_channels: int, eps: float, *, dtype=jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels not divisible into "
                             f"{num_groups} groups")
        self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), PARAM_DTYPE))
        self.bias = nnx.Param(jnp.zeros((num_channels,), PARAM_DTYPE))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics as per-channel sums over the positions (C stays the contiguous axis, so
        # the large reductions vectorise; reducing a (B, HW, G, C/G) view over axes 1 and 3
        # runs 2-2.5x slower on the CPU for SD's 32 groups), then summed within each group.
        b, c, g = x.shape[0], x.shape[-1], self.num_groups
        xf = x.astype(jnp.float32).reshape(b, -1, c)
        count = xf.shape[1] * (c // g)

        def group_mean(channel_sums):  # (B, C) -> (B, C): each channel's group total / count
            total = channel_sums.reshape(b, g, c // g).sum(-1, keepdims=True) / count
            return jnp.broadcast_to(total, (b, g, c // g)).reshape(b, c)

        centred = xf - group_mean(xf.sum(axis=1))[:, None, :]
        var = group_mean(jnp.square(centred).sum(axis=1))
        y = centred * (jax.lax.rsqrt(var + self.eps) * self.scale[...])[:, None, :]
        return (y + self.bias[...]).reshape(x.shape).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, with affine weight and bias."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(jnp.ones((dim,), PARAM_DTYPE))
        self.bias = nnx.Param(jnp.zeros((dim,), PARAM_DTYPE))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


class KeyGen:
    """Hands out init keys fold_in(key, 0), fold_in(key, 1), ... with a Python counter.

    Used instead of passing nnx.Rngs to every layer: nnx.Rngs updates a counter Variable per
    draw, which makes `nnx.eval_shape` of an SDXL-size model quadratic in its layer count.
    """

    def __init__(self, key: jax.Array):
        self.key, self.count = key, 0

    def __call__(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


_kernel_init = jax.nn.initializers.lecun_normal()


class Linear(nnx.Module):
    """y = x @ kernel + bias; kernel (din, dout) float32, compute in `dtype` (through
    `fifa_jax.models.dense.dense`: a weight gradient XLA's CPU backend runs fast)."""

    def __init__(self, din: int, dout: int, *, keys: KeyGen, dtype=jnp.float32,
                 use_bias: bool = True):
        self.dtype = dtype
        self.kernel = nnx.Param(_kernel_init(keys(), (din, dout), PARAM_DTYPE))
        self.bias = nnx.Param(jnp.zeros((dout,), PARAM_DTYPE)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return constrain_batch(y)


class Conv2D(nnx.Module):
    """2-D conv on NHWC; kernel (kh, kw, cin, cout) float32; `padding` pixels each side
    (through `fifa_jax.models.conv.conv2d`: a gradient XLA's CPU backend runs fast)."""

    def __init__(self, cin: int, cout: int, kernel: int, *, keys: KeyGen, dtype=jnp.float32,
                 stride: int = 1, padding: int | None = None):
        self.dtype, self.stride = dtype, stride
        self.padding = (kernel - 1) // 2 if padding is None else padding
        self.kernel = nnx.Param(_kernel_init(keys(), (kernel, kernel, cin, cout), PARAM_DTYPE))
        self.bias = nnx.Param(jnp.zeros((cout,), PARAM_DTYPE))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride,
                   self.padding)
        return constrain_batch(y + self.bias[...].astype(self.dtype))


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as torch.nn.functional.gelu."""
    return jax.nn.gelu(x, approximate=False)


def activation(name: str):
    """The activation function named in a diffusers config."""
    table = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": gelu}
    if name not in table:
        raise ValueError(f"unsupported act_fn {name!r}; supported: {sorted(table)}")
    return table[name]
