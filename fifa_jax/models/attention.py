"""Scaled dot-product attention with a selectable implementation.

One function every model calls, so the attention kernel is chosen in one place:

    impl = "xla"   -> jax.nn.dot_product_attention(implementation="xla")
    impl = "cudnn" -> cuDNN flash attention (GPU only; fails loudly elsewhere)
    impl = "auto"  -> cuDNN on GPU when dtype and shapes allow it, XLA otherwise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def _cudnn_ok(q: jax.Array, k: jax.Array, bias, mask, local_window_size) -> bool:
    """cuDNN's fused attention: GPU, half precision, head_dim a multiple of 8 up to 128,
    no bias, and a mask (if any) that already has the full (T, S) extent."""
    if jax.default_backend() != "gpu":
        return False
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > 128 or bias is not None or local_window_size is not None:
        return False
    if mask is not None and tuple(mask.shape[-2:]) != (q.shape[1], k.shape[1]):
        return False
    return True


def dot_product_attention(q, k, v, *, bias=None, mask=None, is_causal: bool = False,
                          scale: float | None = None, impl: str = "auto",
                          local_window_size=None):
    """Attention over (B, T, N, H) arrays.

    Args:
      q: (B, T, N, H) queries; k, v: (B, S, K, H) with N a multiple of K (grouped query).
      bias: optional additive bias broadcastable to (B, N, T, S).
      mask: optional boolean mask broadcastable to (B, N, T, S); True = attend.
      is_causal: apply a causal mask.
      scale: logits scale, default 1/sqrt(H).
      impl: "auto" | "xla" | "cudnn".
    Returns:
      (B, T, N, H), the dtype of q.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        impl = "cudnn" if _cudnn_ok(q, k, bias, mask, local_window_size) else "xla"
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale,
        implementation=impl, local_window_size=local_window_size)
