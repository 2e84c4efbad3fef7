"""Pallas flash attention for TPUs: jax's Mosaic kernel behind our (B, T, N, H) attention API.

    flash_attention(q, k, v, scale=None) -> (B, T, N, H)   # softmax(q k^T * scale) v
    applies(q, k) -> bool                                  # shapes / dtypes / mesh it handles

q is (B, T, N, H), k and v (B, S, N, H) (no mask, bias or grouped heads); the output is in q's
dtype; the scale defaults to H ** -0.5; the kernel keeps the softmax in float32. The kernel is
`jax.experimental.pallas.ops.tpu.flash_attention` (it has its own custom VJP: forward, dK/dV and
dQ kernels). Its shape rules, and what this wrapper does about them (`plan`):

- key blocks must be multiples of 128 lanes that divide S (the backward tiles the row
  statistics 128 lanes wide per key block): keys and values are padded with zeros up to a
  multiple of 128 (the 77 text tokens -> 128, the 64 tokens of an 8 x 8 latent -> 128) and the
  padding is masked by segment ids (every query 1, real keys 1, padding 0);
- query blocks must divide T and be multiples of 8 (sublanes) unless they span T: lengths up
  to 128 are padded to a multiple of 8 and run as one block, longer ones to a multiple of 128.
  Padded query rows are sliced off; their cotangent is zero, so they add nothing to dK / dV;
- the forward kernel that loops over several key blocks broadcasts its row statistics over
  the head dimension, so a head dimension above 128 must then be a multiple of 128 (SD1.5's 160
  only meets keys of at most 256, a single block, where this does not apply): such heads are
  padded with zeros (the scale stays that of the real H) and the output is sliced back.

Blocks are 512 queries x 512 keys where the lengths allow (else 256, 128 or the whole padded
length): fewer grid steps than the kernel's default 128 while a block's float32 scores
(1 MiB) and its backward's (p, dp, ds) stay well inside VMEM.

Mosaic kernels are not partitioned by XLA: under a mesh in context (`jax.set_mesh`) the kernel
runs inside `jax.shard_map` over the batch axes ("data", "fsdp"), each device on its batch rows.
With no mesh, a one-device mesh, or inside a shard_map already manual over those axes it is
called directly. The kernel lowers only for TPUs: callers pick it by
`platform.choose(..., tpu=flash_attention)`; on the CPU it runs in Pallas' TPU interpret mode
(`pltpu.force_tpu_interpret_mode()`, the tests).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import flash_attention as _fa
from jax.sharding import PartitionSpec as P

from fifa_jax.parallel.mesh import BATCH_AXES

LANES = 128          # key blocks: multiples of this (the kernel's MIN_BLOCK_SIZE / NUM_LANES)
SUBLANES = 8         # query blocks shorter than the whole length: multiples of this
MAX_BLOCK = 512      # largest query / key block tried
MAX_HEAD_DIM = 256   # largest head dimension checked to compile (v5e, forward + backward)
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _block(n: int) -> int:
    """The largest of 512, 256, 128 dividing n (n a multiple of 128)."""
    return next(b for b in (MAX_BLOCK, 256, LANES) if n % b == 0)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Padded lengths and blocks for one (T, S, H): see the module docstring for the rules."""
    t_pad: int
    s_pad: int
    h_pad: int
    block_q: int
    block_k: int

    @property
    def block_sizes(self) -> _fa.BlockSizes:
        bq, bk = self.block_q, self.block_k
        return _fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                              block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk,
                              block_q_dkv=bq, block_k_major_dq=bk, block_k_dq=bk,
                              block_q_dq=bq)


def plan(t: int, s: int, h: int) -> Plan:
    """Padding and blocks for queries of length t, keys of length s, heads of dimension h."""
    t_pad = _round_up(t, SUBLANES) if t <= LANES else _round_up(t, LANES)
    block_q = t_pad if t_pad <= LANES else _block(t_pad)
    s_pad = _round_up(s, LANES)
    block_k = _block(s_pad)
    single_key_block = block_k == s_pad
    h_pad = h if h <= LANES or h % LANES == 0 or single_key_block else _round_up(h, LANES)
    return Plan(t_pad, s_pad, h_pad, block_q, block_k)


def _mesh_batch_axes():
    """(mesh, batch axes to shard_map over, their device count) for the mesh in context.

    Axes: those of BATCH_AXES in the mesh and not already manual (an enclosing shard_map).
    None when the mesh has another automatic axis of more than one device (the kernel would be
    replicated over it by XLA, which it cannot partition)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return mesh, (), 1
    manual = set(mesh.manual_axes)
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and a not in manual)
    others = [a for a in mesh.axis_names
              if a not in axes and a not in manual and mesh.shape[a] > 1]
    if others:
        return None
    return mesh, axes, int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def applies(q, k) -> bool:
    """Whether `flash_attention` takes these (B, T, N, H) / (B, S, N, H) operands (shapes and
    dtypes only: arrays or ShapeDtypeStructs) under the mesh in context: rank 4, the same batch,
    heads and head dimension (<= 256), float32 or bfloat16, and a batch that splits evenly over
    the mesh's batch axes."""
    if q.ndim != 4 or k.ndim != 4:
        return False
    b, _, n, h = q.shape
    if k.shape[0] != b or k.shape[2] != n or k.shape[3] != h or h > MAX_HEAD_DIM:
        return False
    if jnp.dtype(q.dtype) not in DTYPES or min(q.shape + k.shape) == 0:
        return False
    found = _mesh_batch_axes()
    return found is not None and b % found[2] == 0


def _local_attention(q, k, v, scale: float):
    """The kernel on one device's rows: (b, T, N, H) -> (b, T, N, H), padding as `plan` says."""
    b, t, _, h = q.shape
    s = k.shape[1]
    p = plan(t, s, h)
    # (B, T, N, H) -> the kernel's (B, N, T, H), zero-padded.
    q = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, p.t_pad - t), (0, p.h_pad - h)))
    k, v = (jnp.pad(x.transpose(0, 2, 1, 3),
                    ((0, 0), (0, 0), (0, p.s_pad - s), (0, p.h_pad - h))) for x in (k, v))
    segment_ids = None
    if p.s_pad != s:
        segment_ids = _fa.SegmentIds(
            q=jnp.ones((b, p.t_pad), jnp.int32),
            kv=jnp.broadcast_to((jnp.arange(p.s_pad) < s).astype(jnp.int32), (b, p.s_pad)))
    o = _fa.flash_attention(q, k, v, segment_ids=segment_ids, sm_scale=scale,
                            block_sizes=p.block_sizes)
    return o[:, :, :t, :h].transpose(0, 2, 1, 3)


def flash_attention(q, k, v, scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale) v with the Pallas TPU kernel (float32 softmax).

    Args:
      q: (B, T, N, H); k, v: (B, S, N, H), cast to q's dtype (float32 or bfloat16).
      scale: logits scale, default H ** -0.5 (of the real H, also when heads are padded).
    Returns:
      (B, T, N, H) in q's dtype. Differentiable in q, k, v (the kernel's custom VJP).
    Raises:
      ValueError: where `applies(q, k)` is False.
    """
    if not applies(q, k):
        raise ValueError(f"TPU flash attention does not apply to q {q.shape} {q.dtype}, "
                         f"k {k.shape} {k.dtype} under mesh {jax.sharding.get_abstract_mesh()}")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    mesh, axes, n = _mesh_batch_axes()
    if n == 1:
        return _local_attention(q, k, v, scale)
    spec = P(axes)
    return jax.shard_map(lambda q, k, v: _local_attention(q, k, v, scale), mesh=mesh,
                         in_specs=(spec, spec, spec), out_specs=spec, axis_names=set(axes),
                         check_vma=False)(q, k, v)
