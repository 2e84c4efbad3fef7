"""Fused CPU attention: the C++ kernel in `kernels/attention_cpu.cc` as an XLA custom call.

`fused_attention(q, k, v, scale)` is softmax(q k^T * scale) v over (B, T, N, H) / (B, S, N, H)
arrays, forward and gradient, without materialising the (B, N, T, S) scores (see the .cc file
for why). The kernel is compiled on first use with the others (`cpu_kernels.py`: the
machine's C++ compiler, a cache folder, `jax.ffi`). `available()` says whether that worked;
where it did not (no compiler), `models.attention` falls back to its einsum form and says so
once.

Inputs of other dtypes are computed in float32 and cast back. Leading dimensions beyond one
batch dimension (and `jax.vmap`) are flattened into the batch by the kernel. Under a sharded
`jit` the custom call is not partitioned by XLA (its operands are gathered): the model's CPU
path is for single-device work and tests, GPUs and TPUs take their own fused kernels.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fifa_jax.models import cpu_kernels


def available() -> bool:
    """Whether the kernel compiled and is registered (builds it on the first call)."""
    return cpu_kernels.available()


def _require() -> None:
    cpu_kernels.require("the fused attention (use attention impl 'einsum')")


def _forward(q, k, v, scale: float):
    _require()
    t, n = q.shape[-3], q.shape[-2]
    call = jax.ffi.ffi_call(
        "fifa_attention_fwd",
        (jax.ShapeDtypeStruct(q.shape, jnp.float32),
         jax.ShapeDtypeStruct(q.shape[:-3] + (n, t), jnp.float32)),
        vmap_method="broadcast_all")
    return call(q, k, v, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, scale: float):
    return _forward(q, k, v, scale)[0]


def _attention_fwd(q, k, v, scale):
    o, lse = _forward(q, k, v, scale)
    return o, (q, k, v, o, lse)


def _attention_bwd(scale, res, do):
    q, k, v, o, lse = res
    _require()
    call = jax.ffi.ffi_call(
        "fifa_attention_bwd",
        (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, jnp.float32),
         jax.ShapeDtypeStruct(v.shape, jnp.float32)),
        vmap_method="broadcast_all")
    return call(q, k, v, o, lse, do.astype(jnp.float32), scale=np.float32(scale))


_attention.defvjp(_attention_fwd, _attention_bwd)


def fused_attention(q, k, v, scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale) v: q (B, T, N, H), k and v (B, S, N, H) -> (B, T, N, H), q's dtype.

    Raises RuntimeError when the kernel is unavailable (see `available()`)."""
    _require()
    if k.shape != v.shape or q.shape[-2:] != k.shape[-2:] or q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"fused attention needs q (B, T, N, H) and k, v (B, S, N, H); got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    f32 = jnp.float32
    out = _attention(q.astype(f32), k.astype(f32), v.astype(f32), scale)
    return out.astype(q.dtype)
