"""cuDNN fused attention for GPUs behind our (B, T, N, H) attention API.

    cudnn_attention(q, k, v, scale=None) -> (B, T, N, H)   # softmax(q k^T * scale) v
    applies(q, k) -> bool                                  # shapes / dtypes it handles
    padded_attention(q, k, v, scale, implementation)       # the same padding, any backend

q is (B, T, N, H), k and v (B, S, N, H) (no mask, bias or grouped heads), bfloat16 or float16
(cuDNN's flash attention takes only half precision); the output is in q's dtype, the scale
defaults to H ** -0.5, cuDNN keeps the softmax in float32.

Padding (`pad_operands`), shared by the cuDNN call and its CPU test (`implementation="xla"`):
- sequence lengths: the 77 text tokens of cross-attention fail in cuDNN's backward
  ("Unsupported sequence length Q 1024, KV 77"); keys and values are padded with zeros to a
  multiple of 64 and the padding masked by `key_value_seq_lengths` (cuDNN's padding mask; the
  query lengths default to the padded T, every query row real). Queries not a multiple of 64
  are padded too and their rows sliced off (zero cotangent: nothing flows into dK / dV);
- head dimension: cuDNN takes multiples of 8 (up to 128, or 256 on Hopper and later, jax's
  `check_is_flash_attention`): smaller or odd heads (the tiny test models' 2..8) are padded
  with zeros, the scale stays that of the real H, and the output is sliced back.
Lengths already multiples of 64 (SD's 64..4096 latent tokens) run unpadded and unmasked.

`jax.nn.dot_product_attention(implementation="cudnn")` checks for cuDNN and the GPU while
tracing, so the cuDNN call can only be traced in a process with a GPU backend (callers pick it
by `platform.choose(..., cuda=cudnn_attention)`, which leaves it out elsewhere). Under a mesh
XLA partitions it by batch itself (jax's cuDNN attention has sharding rules): no shard_map.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

SEQ_MULTIPLE = 64    # sequence lengths cuDNN's fused kernels take forward and backward
HEAD_MULTIPLE = 8    # head dimensions: multiples of 8 ...
HEAD_MAX = 128       # ... up to 128 before Hopper,
HEAD_MAX_HOPPER = 256  # 256 on compute capability 9.0 and later
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def head_dim_limit() -> int:
    """Largest head dimension cuDNN takes on this process's first GPU (128 without one)."""
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return HEAD_MAX
    cc = getattr(gpus[0], "compute_capability", None) if gpus else None
    try:
        major = int(str(cc).split(".")[0])
    except ValueError:
        return HEAD_MAX
    return HEAD_MAX_HOPPER if major >= 9 else HEAD_MAX


def applies(q, k) -> bool:
    """Whether `cudnn_attention` takes these (B, T, N, H) / (B, S, N, H) operands (shapes and
    dtypes only): rank 4, the same batch, heads and head dimension, bfloat16 or float16, and a
    head dimension that pads (to a multiple of 8) within cuDNN's limit. Says nothing about
    whether a GPU is present: that is the caller's platform dispatch."""
    if q.ndim != 4 or k.ndim != 4:
        return False
    b, _, n, h = q.shape
    if k.shape[0] != b or k.shape[2] != n or k.shape[3] != h or min(q.shape + k.shape) == 0:
        return False
    if jnp.dtype(q.dtype) not in DTYPES:
        return False
    return _round_up(h, HEAD_MULTIPLE) <= head_dim_limit()


def pad_operands(q, k, v):
    """Zero-pad (B, T, N, H) q and (B, S, N, H) k, v for cuDNN (rules in the module docstring).

    Returns (q, k, v, kv_lengths): kv_lengths is the int32 (B,) real key count to mask the
    padded keys with, or None when S needed no padding."""
    t, s, h = q.shape[1], k.shape[1], q.shape[3]
    t_pad, s_pad = _round_up(t, SEQ_MULTIPLE), _round_up(s, SEQ_MULTIPLE)
    h_pad = _round_up(h, HEAD_MULTIPLE)

    def pad(x, length, padded):
        if padded == length and h_pad == h:
            return x
        return jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, h_pad - h)))

    q, k, v = pad(q, t, t_pad), pad(k, s, s_pad), pad(v, s, s_pad)
    lengths = None if s_pad == s else jnp.full((k.shape[0],), s, jnp.int32)
    return q, k, v, lengths


def padded_attention(q, k, v, scale: float | None = None, implementation: str = "cudnn"):
    """`jax.nn.dot_product_attention` on the operands as `pad_operands` pads them, the output
    sliced back to (B, T, N, H). `implementation` "cudnn" on GPUs; "xla" runs the same padded,
    masked call anywhere (the tests)."""
    t, h = q.shape[1], q.shape[3]
    scale = float(h ** -0.5 if scale is None else scale)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    qp, kp, vp, lengths = pad_operands(q, k, v)
    o = jax.nn.dot_product_attention(qp, kp, vp, scale=scale, key_value_seq_lengths=lengths,
                                     implementation=implementation)
    return o[:, :t, :, :h]


def cudnn_attention(q, k, v, scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale) v with cuDNN's fused attention (GPU only).

    Args:
      q: (B, T, N, H) bfloat16 / float16; k, v: (B, S, N, H), cast to q's dtype.
      scale: logits scale, default H ** -0.5 of the real H.
    Returns:
      (B, T, N, H) in q's dtype; differentiable (cuDNN's backward).
    Raises:
      ValueError: where `applies(q, k)` is False.
    """
    if not applies(q, k):
        raise ValueError(f"cuDNN attention does not apply to q {q.shape} {q.dtype}, "
                         f"k {k.shape} {k.dtype}")
    return padded_attention(q, k, v, scale, "cudnn")
