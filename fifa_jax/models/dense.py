"""x @ w (a linear layer's product) whose weight gradient XLA's CPU backend runs fast.

Autodiff of `jnp.dot` gives the weight gradient x^T g, which XLA's CPU backend runs as a
transposing copy of g plus a matrix product at 50-130 GFLOP/s on two AVX-512 cores for the
UNet's token counts (e.g. (4096, 64)^T (4096, 64): 0.67 ms). On the CPU the gradient here sums
the same outer products with the convolution kernel-gradient kernel (`kernels/conv_cpu.cc`, a
1x1 kernel over one row of N pixels: no copies; 0.28 ms for that case, 1.5-2.4x on the
UNet's linear layers). The forward and the input gradient stay XLA's. Other platforms (chosen
when lowering, `platform.py`), the accelerator forms, output sizes that are not a multiple of
16, or no C++ compiler: plain autodiff. Tested against
autodiff of `jnp.dot` in tests/models/test_conv.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fifa_jax.models import conv, cpu_kernels, platform


@jax.custom_vjp
def _dense_cpu(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(x, w)


def _fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _bwd(res, g):
    x, w = res
    din, dout = w.shape
    dx = jnp.dot(g, w.T.astype(g.dtype)).astype(x.dtype)
    dw = conv._kernel_grad_cpu(g.reshape(1, 1, -1, dout), x.reshape(1, 1, -1, din),
                               (1, 1, din, dout), 1, 0).reshape(din, dout)
    return dx, dw.astype(w.dtype)


_dense_cpu.defvjp(_fwd, _bwd)


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """(..., Din) @ (Din, Dout) -> (..., Dout), with the CPU weight gradient above."""
    kernel_ok = (w.ndim == 2 and w.shape[1] % 16 == 0 and x.shape[-1] == w.shape[0]
                 and cpu_kernels.available())
    return platform.choose(x, w, cpu=_dense_cpu if kernel_ok else None, default=jnp.dot)
