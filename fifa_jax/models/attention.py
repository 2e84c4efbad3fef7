"""Scaled dot-product attention with a selectable implementation.

One function every model calls, so the attention kernel is chosen in one place:

    impl = "xla"    -> jax.nn.dot_product_attention(implementation="xla")
    impl = "cudnn"  -> cuDNN flash attention (GPU only; fails loudly elsewhere)
    impl = "einsum" -> two einsums and a softmax normalised after the value product
                       (no mask, bias, causal or local window; heads not grouped)
    impl = "fused"  -> our C++ CPU kernel (`cpu_attention.py`): the scores are never
                       materialised; same restrictions as "einsum"; CPU only
    impl = "auto"   -> chosen when the program is lowered, by the platform it is lowered for
                       (`platform.py`): on the CPU "fused" where it applies and compiled (else
                       "einsum", with a warning); on a TPU Pallas flash attention
                       (`tpu_attention.py`) where its shape rules allow; on a GPU cuDNN
                       (`gpu_attention.py`: half precision, odd key lengths padded and masked);
                       XLA's attention otherwise, and on every platform under the accelerator
                       forms (except the TPU / GPU kernels, which stay theirs).

Why "einsum" on the CPU: in a train step XLA's CPU backend ran `jax.nn.dot_product_attention`
about 2x slower than this form (the 1024-token self-attention of a 32 x 32 latent: 847 ms
against 292 ms forward + backward; the scale multiplied after the QK product materialises a
(B, N, T, S) broadcast). Same values: the row maximum is subtracted (without gradient, the
softmax does not depend on it) and the rows are divided by their sums after the value product.
Why "fused" on the CPU: the einsum form still materialises the (B, N, T, S) scores and runs
the softmax as separate memory-bound passes over them; the kernel never does (the 1024-token
self-attention of two 32 x 32 latents, 8 heads of 8: 26 ms against the einsum's 110 ms forward
+ backward; the 77-token cross-attention of four: 8.7 ms against 15 ms). Before it, the
odd-length cross-attention also fell to XLA's form on the CPU (a rule meant for cuDNN).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fifa_jax.models import cpu_attention, gpu_attention, platform, tpu_attention

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "einsum", "fused")
# implementations that exist on one platform only (the CPU kernel's custom call; cuDNN)
PLATFORM_ONLY = {"fused": "cpu", "cudnn": "gpu"}


def platform_error(impl: str, platform_name: str, key: str) -> str | None:
    """The one-line config error for attention `impl` on devices of `platform_name`, or None
    when it runs there. `key` names the config key."""
    need = PLATFORM_ONLY.get(impl)
    if need is None or need == platform_name:
        return None
    return (f"config key {key!r} = {impl!r} runs on {need.upper()} devices only, but the mesh "
            f"is on {platform_name.upper()}; use 'auto' (each platform its fastest form)")


def _cudnn_masked_ok(q, k, bias, mask, local_window_size) -> bool:
    """cuDNN's fused attention with a mask or causal: half precision, head_dim a multiple of 8
    up to 128, no bias, and a mask (if any) that already has the full (T, S) extent."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > 128 or bias is not None or local_window_size is not None:
        return False
    return mask is None or tuple(mask.shape[-2:]) == (q.shape[1], k.shape[1])


def _einsum_ok(q, k, bias, mask, is_causal, local_window_size) -> bool:
    return (bias is None and mask is None and not is_causal and local_window_size is None
            and q.shape[2] == k.shape[2])


def einsum_attention(q, k, v, scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale) v over (B, T, N, H) / (B, S, N, H); float32 softmax."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = jnp.einsum("btnh,bsnh->bnts", q * jnp.asarray(scale, q.dtype), k,
                   preferred_element_type=jnp.float32)
    e = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True)))
    o = jnp.einsum("bnts,bsnh->btnh", e, v.astype(jnp.float32))
    return (o / jnp.swapaxes(e.sum(-1), 1, 2)[..., None]).astype(q.dtype)


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
      impl: "auto" | "xla" | "cudnn" | "einsum" | "fused".
    Returns:
      (B, T, N, H), the dtype of q.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    einsum_ok = _einsum_ok(q, k, bias, mask, is_causal, local_window_size)
    if impl in ("fused", "einsum"):
        if not einsum_ok:
            raise ValueError(f"attention impl {impl!r} takes no mask, bias, causal or local "
                             "window and ungrouped heads; use 'xla'")
        fn = cpu_attention.fused_attention if impl == "fused" else einsum_attention
        return fn(q, k, v, scale)

    def library(implementation):
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale,
            implementation=implementation, local_window_size=local_window_size)

    xla = library("xla")
    if impl != "auto":
        return library(impl)(q, k, v)
    if not einsum_ok:      # masks, causal (the text towers): cuDNN on GPUs where it takes them
        cudnn = library("cudnn") if _cudnn_masked_ok(q, k, bias, mask,
                                                     local_window_size) else None
        return platform.choose(q, k, v, default=xla, cuda=cudnn)
    cpu = (lambda q, k, v: cpu_attention.fused_attention(q, k, v, scale)) \
        if cpu_attention.available() else (lambda q, k, v: einsum_attention(q, k, v, scale))
    return platform.choose(q, k, v, cpu=cpu, default=xla, tpu=_tpu_branch(q, k, scale),
                           cuda=_cuda_branch(q, k, scale))


def _tpu_branch(q, k, scale):
    """Pallas flash attention where its shape rules allow, else None (XLA's attention)."""
    if not tpu_attention.applies(q, k):
        return None
    return lambda q, k, v: tpu_attention.flash_attention(q, k, v, scale)


def _cuda_branch(q, k, scale):
    """cuDNN attention where its rules allow (half precision, ...), else None."""
    if not gpu_attention.applies(q, k):
        return None
    return lambda q, k, v: gpu_attention.cudnn_attention(q, k, v, scale)
