"""2-D convolution (NHWC, HWIO) whose gradient XLA's CPU backend runs fast.

Why not just `lax.conv_general_dilated` and autodiff: inside a whole train step, XLA's CPU
backend leaves the kernel gradient of a convolution in the form `f01b_i01o->01bf` (batch as
the feature dimension, the whole feature map as the window), which its fast convolution does
not take; the step then spends ~70% of its time there (benchmarks/RESULTS.md, the train-step
profile), and its convolutions (YNNPACK) run at 100-160 GFLOP/s on two AVX-512 cores where
PyTorch's oneDNN reaches 200-300. On the CPU this module therefore runs them itself:

  forward          stride 1 with Cout a multiple of 16: our C++ kernel (`kernels/conv_cpu.cc`,
                   output pixels x output channels in registers; 1.5-2.5x XLA's on SD-sized
                   layers); other strides or channel counts, or without a C++ compiler: XLA.

  input gradient   stride 1: the forward convolution (above) of the output gradient with the
                   kernel flipped in space and its in/out axes swapped (padding k - 1 - p); other
                   strides: autodiff of the forward (XLA's own transposed convolution).
  kernel gradient  dW[i, j] = sum_{b,h,w} x_pad[b, h*s + i, w*s + j, :]^T g[b, h, w, :]
                   ((Cin, Cout) a tap): our C++ kernel (`kernels/conv_cpu.cc`, a custom
                   call that reads x and g in place) for kernels larger than 1x1 with Cout a
                   multiple of 16; otherwise, or without a C++ compiler
                   (`cpu_kernels.available()`), one XLA matrix product per tap, which makes
                   XLA copy nine shifted views of x first.

Both are the exact gradients (the same sums in another order: float32 rounding apart). On other
platforms (GPU, TPU), and on the CPU under the accelerator forms, the plain autodiff of the
forward is used: cuDNN and the TPU compiler handle convolution gradients themselves. The form
is chosen when the program is lowered, by the platform it is lowered for (`platform.py`). The C++ kernels are custom calls that XLA does not
partition: under a sharded `jit` on several CPU devices their operands are gathered onto every
device (the same values, the work repeated on each), as with the CPU attention kernel. Tested
against autodiff of `lax.conv_general_dilated` in tests/models/test_conv.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fifa_jax.models import cpu_kernels, platform

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _forward(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)),
        dimension_numbers=DIMENSIONS)


def _forward_cpu(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
    """The forward on the CPU: our kernel where it applies, XLA's convolution otherwise."""
    kh, kw, _, cout = w.shape
    ho, wo = x.shape[1] + 2 * padding - kh + 1, x.shape[2] + 2 * padding - kw + 1
    if stride != 1 or cout % 16 or ho < 1 or wo < 1 or not cpu_kernels.available():
        return _forward(x, w, stride, padding)
    call = jax.ffi.ffi_call("fifa_conv_forward",
                            jax.ShapeDtypeStruct((x.shape[0], ho, wo, cout), jnp.float32),
                            vmap_method="sequential")
    y = call(x.astype(jnp.float32), w.astype(jnp.float32), pad=np.int64(padding))
    return y.astype(jnp.result_type(x.dtype, w.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_cpu_grad(x, w, stride, padding):
    return _forward_cpu(x, w, stride, padding)


def _fwd(x, w, stride, padding):
    return _forward_cpu(x, w, stride, padding), (x, w)


def _input_grad(g, x, w, stride: int, padding: int) -> jax.Array:
    kh, kw = w.shape[:2]
    if stride == 1 and kh == kw and padding <= kh - 1:
        flipped = jnp.swapaxes(w[::-1, ::-1], 2, 3)           # (kh, kw, Cout, Cin)
        return _forward_cpu(g, flipped, 1, kh - 1 - padding)
    _, vjp = jax.vjp(lambda x_: _forward(x_, w, stride, padding), x)
    return vjp(g)[0]


def _kernel_grad(g, x, w, stride: int, padding: int) -> jax.Array:
    kh, kw, _, cout = w.shape
    if kh * kw > 1 and cout % 16 == 0 and cpu_kernels.available():
        return _kernel_grad_cpu(g, x, w.shape, stride, padding).astype(w.dtype)
    return _kernel_grad_taps(g, x, w, stride, padding)


def _kernel_grad_cpu(g, x, shape, stride: int, padding: int) -> jax.Array:
    """The kernel gradient by our C++ kernel, in float32."""
    call = jax.ffi.ffi_call("fifa_conv_kernel_grad", jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.float32), g.astype(jnp.float32), stride=np.int64(stride),
                pad=np.int64(padding))


def _kernel_grad_taps(g, x, w, stride: int, padding: int) -> jax.Array:
    """The kernel gradient as one XLA matrix product per kernel tap."""
    kh, kw, cin, _ = w.shape
    b, ho, wo, _ = g.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    taps = []
    for i in range(kh):
        for j in range(kw):
            patch = jax.lax.slice(
                xp, (0, i, j, 0), (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, cin),
                (1, stride, stride, 1))                        # (B, Ho, Wo, Cin)
            taps.append(jnp.einsum("bhwc,bhwo->co", patch, g))
    return jnp.stack(taps).reshape(w.shape).astype(w.dtype)


def _bwd(stride, padding, res, g):
    x, w = res
    return (_input_grad(g, x, w, stride, padding).astype(x.dtype),
            _kernel_grad(g, x, w, stride, padding))


_conv_cpu_grad.defvjp(_fwd, _bwd)


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1, padding: int = 0) -> jax.Array:
    """(B, H, W, Cin) x (kh, kw, Cin, Cout) -> (B, Ho, Wo, Cout); `padding` pixels each side.

    Lowered for the CPU: the CPU-friendly gradient above; for other platforms (and under the
    accelerator forms): XLA's convolution and its autodiff.
    """
    stride, padding = int(stride), int(padding)
    return platform.choose(x, w, cpu=lambda x, w: _conv_cpu_grad(x, w, stride, padding),
                           default=lambda x, w: _forward(x, w, stride, padding))
