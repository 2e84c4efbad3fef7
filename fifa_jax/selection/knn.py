"""Exact k-nearest neighbours (Euclidean, self excluded), tiled and sharded.

    dist, idx = knn(x, k)        x: (N, d) -> dist (N, k) float32 ascending, idx (N, k) int32

Algorithm (no N x N matrix ever exists):
1. Square tiles of `tile` rows. The tile pairs (r, c) with c >= r (the distance matrix is
   symmetric, so half the work) are dealt round-robin to the devices of `mesh` (all axes);
   inside `shard_map` each device walks its list with a `fori_loop`.
2. Per tile pair, one matmul gives the score tile s = -||x_i - x_j||^2 through augmented
   rows [x_i, |x_i|^2, 1] . [2 x_j, -1, -|x_j|^2] (bf16 inputs, float32 accumulation and
   output in the fast mode; float32 at HIGHEST precision in the exact mode; for
   d <= `direct_max_dim` the differences are formed directly). A hierarchical top-k reduces
   the tile to kc = k + 1 + margin candidates per row (maxima of groups of `group` columns,
   recursively; the kc best entries lie in the kc groups with the largest maxima, so only
   kc * group entries per level go through `lax.top_k`: exact, and far cheaper than a top_k
   over whole tile rows), and the same over the tile's columns gives
   the column points' candidates without transposing. Each list is merged into its rows'
   running candidate lists (N, kc) in the order (score descending, index ascending): a strict
   total order, so the merged lists are the kc best of all tiles whatever the order of the
   merges, and the same for any device count and visiting order.
3. Each device's lists are exchanged with one `all_to_all` (rows to their owner), which merges
   the n_dev lists of each of its rows the same way.
4. Re-rank: the kc candidates of every row get their float32 squared distance
   sum((x_i - x_j)^2) from the points as given (the matmuls see centred points, and centring
   rounds: points a few ulps apart far from the mean can merge); the point itself (by index, so a duplicate is still a neighbour at
   distance 0) and padding are dropped; sort by (distance, index) and keep k.
5. Certificate (float32 mode): a point outside the candidates scored no better than the worst
   candidate, so it is at least that far less the matmul's rounding bound and the centring's
   (2^-23 of the centred norms); rows whose k-th
   neighbour is not clearly nearer (near-duplicate clusters, where |x|^2 + |y|^2 - 2xy loses
   every digit) are recomputed in float64 on the host.
Memory per device: x replicated, the two matmul operands (N, d + 2 rounded up to 16) (bf16 in
the fast mode), the candidate lists N * kc * 8 bytes (twice while the all_to_all exchanges
them), and one tile's scores (tile^2 * 4 bytes) with its top-k temporaries.
The fast mode is exact whenever the true k neighbours are among the kc bf16 candidates (a margin
of candidates absorbs bf16 rounding); `exact_f32=True` ranks candidates in float32.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fifa_jax.errors import InputError
from fifa_jax.models.platform import device_platform

log = logging.getLogger(__name__)

_BIG = 1e30          # pushes padded points out of every candidate list
# Width of the float32 matmul rounding bound (see _build), in units of sqrt(D) 2^-24 (|x_i| +
# |x_j|)^2: the largest error seen over 64M pairs (d = 64, 768; Gaussian and unit vectors) was
# 0.28 units, and 0.94 on adversarial structured data (constant vectors, all-ones mantissas,
# far clusters; d = 9 to 768), so 4 leaves a factor of 4.
CERT_SIGMAS = 4.0
_SENTINEL = np.iinfo(np.int32).max


def default_tile(mesh: Optional[Mesh] = None) -> int:
    """Tile edge for the platform of `mesh`'s devices (None: the default device's): GPU / TPU
    big tiles, CPU cache-sized."""
    return 5120 if device_platform(mesh) == "cpu" else 8192


def _check_finite(x) -> None:
    """NaN/inf rows, or values whose squared norms overflow float32, have no neighbours."""
    xn = np.asarray(jnp.isfinite(x).all(axis=1)) if isinstance(x, jax.Array) else \
        np.isfinite(x).all(axis=1)
    if not xn.all():
        raise InputError(f"knn: x has NaN or inf in rows {np.flatnonzero(~xn)[:5].tolist()}")
    big = float(jnp.max(jnp.abs(x))) if isinstance(x, jax.Array) else float(np.abs(x).max())
    if big * big * x.shape[1] > 1e36:
        raise InputError(f"knn: |x| up to {big:.3g}: squared distances would overflow float32; "
                         f"rescale the data")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _group_size(tile: int, kc: int, group: int) -> int:
    """Largest g <= group dividing tile with at least kc groups per tile row (1: plain top_k)."""
    g = group
    while g > 1 and (tile % g or tile // g < kc):
        g //= 2
    return max(g, 1)


def _topk_rows(v, kc, g):
    """Exact top-kc of every row of v (R, L): values (R, kc), positions (R, kc).

    Hierarchical: the kc best entries lie in the kc groups (of g entries) with the largest
    maxima, so the group maxima are reduced the same way (recursively) and only those kc * g
    entries go through `top_k`: far fewer elements than a top_k over the whole row. Ties go to
    the smaller position, as in `lax.top_k` over the whole row.
    """
    r, n = v.shape
    if g <= 1 or n % g or n // g < kc:
        return lax.top_k(v, kc)
    vg = v.reshape(r, n // g, g)
    _, gid = _topk_rows(jnp.max(vg, axis=2), kc, g)               # (R, kc) group ids
    gid = jnp.sort(gid, axis=1)     # members in index order: top_k's ties go to the smaller
    return _expand(jnp.take_along_axis(vg, gid[:, :, None], axis=1), gid, kc, g)


def _expand(cand, gid, kc, g):
    """Top-kc of the gathered members cand (M, kc, g) of groups gid (M, kc), gid ascending
    (so the members are in index order and `top_k`, which breaks ties by position, breaks them
    by index: the result is the kc best by (value descending, index ascending))."""
    m = cand.shape[0]
    v, pos = lax.top_k(cand.reshape(m, kc * g), kc)
    members = (gid[:, :, None] * g + jnp.arange(g, dtype=gid.dtype)).reshape(m, kc * g)
    return v, jnp.take_along_axis(members, pos, axis=1)


def _row_candidates(s, kc, g):
    """kc best entries of every row of s (R, C): values (R, kc), column indices (R, kc)."""
    return _topk_rows(s, kc, g)


def _col_candidates(s, kc, g):
    """kc best entries of every column of s (R, C), as (C, kc) values and row indices.

    The first level reduces groups of g rows in place (no transpose of s); the small
    (C, R / g) array of group maxima then goes through `_topk_rows`.
    """
    r, c = s.shape
    if g <= 1 or r % g or r // g < kc:
        return lax.top_k(s.T, kc)
    gmax = jnp.max(s.reshape(r // g, g, c), axis=1).T              # (C, R/g)
    _, gid = _topk_rows(gmax, kc, g)                                # (C, kc)
    gid = jnp.sort(gid, axis=1)
    rows = gid[:, :, None] * g + jnp.arange(g, dtype=gid.dtype)     # (C, kc, g)
    return _expand(s[rows, jnp.arange(c)[:, None, None]], gid, kc, g)


def _pair_table(nt: int, n_dev: int) -> np.ndarray:
    """(n_dev, ppd, 3) int32 tile pairs (r, c, valid), c >= r, dealt round-robin.

    A device with fewer pairs pads its list with (0, 0, 0): visited, merged as nothing.
    """
    pairs = [(r, c) for r in range(nt) for c in range(r, nt)]
    ppd = -(-len(pairs) // n_dev)
    table = np.zeros((n_dev, ppd, 3), np.int32)
    for dev in range(n_dev):
        mine = pairs[dev::n_dev]
        table[dev, :len(mine), :2] = mine
        table[dev, :len(mine), 2] = 1
    return table


def _best(v, i, kc):
    """The kc best candidates of every row, best first: (R, L) scores and indices -> (R, kc).

    Best = larger score, then smaller index: a strict total order on distinct points, so
    keeping the kc best of lists merged in any order gives the kc best of their union.
    """
    neg, i = lax.sort((-v, i), dimension=1, num_keys=2)
    return -neg[:, :kc], i[:, :kc]


@functools.lru_cache(maxsize=32)
def _build(n_pad: int, d: int, k: int, kc: int, tile: int, exact: bool, direct: bool,
           group: int, mesh: Optional[Mesh]):
    """Compile-once k-NN for fixed shapes: f(x_pad (n_pad, d) f32, mean (d,) f32, table, n)
    -> (dist, idx, certified)."""
    axes = tuple(mesh.axis_names) if mesh is not None else ()
    n_dev = mesh.size if mesh is not None else 1
    nb = n_pad // n_dev                    # rows owned per device after the exchange
    cdtype = jnp.float32 if exact else jnp.bfloat16
    prec = lax.Precision.HIGHEST if exact else lax.Precision.DEFAULT
    # Rounding bound of a float32 matmul score: CERT_SIGMAS standard deviations of a random
    # walk of D roundings of at most (|x_i| + |x_j|)^2 (the augmented rows' |a| |b|). Only the
    # float32 mode is certified; bf16 candidates are exact only up to the margin (docstring).
    certify = exact and not direct
    # On the CPU a lax.cond skips the column pass of diagonal tiles (about 1/nt of the pairs);
    # on accelerators a conditional costs a host round trip per step, so the pass is masked.
    skip_by_cond = device_platform(mesh) == "cpu"
    cert_c = CERT_SIGMAS * math.sqrt(_round_up(d + 2, 16)) * 2.0 ** -24

    def operands(x, mean, n):
        """Row and column operands (n_pad, D) whose product is -||x_i - x_j||^2, from the
        centred points (the matmul form cancels catastrophically far from the origin); the
        padding mask (n_pad,); the centred squared norms (n_pad,) (the certificate's scale)."""
        pad = (jnp.arange(n_pad) >= n)
        xc = x - mean
        sq = jnp.sum(xc * xc, axis=1)
        if direct:
            return x, x, pad, sq
        big = jnp.where(pad, _BIG, 0.0)
        one = jnp.ones_like(sq)
        a = jnp.concatenate([xc, (sq + big)[:, None], one[:, None]], axis=1)
        b = jnp.concatenate([2.0 * xc, -one[:, None], -(sq + big)[:, None]], axis=1)
        dd = _round_up(a.shape[1], 16)
        a = jnp.pad(a, ((0, 0), (0, dd - a.shape[1])))
        b = jnp.pad(b, ((0, 0), (0, dd - b.shape[1])))
        return a.astype(cdtype), b.astype(cdtype), pad, sq

    def score_tile(a_r, b_c, pad_r, pad_c):
        if direct:
            diff = a_r[:, None, :] - b_c[None, :, :]
            s = -jnp.sum(diff * diff, axis=-1)
            return jnp.where(pad_r[:, None] | pad_c[None, :], -_BIG, s)
        # float32 out in both modes: a bf16 output would round -d^2 (about -2 for unit
        # vectors) to 2^-8 and blur neighbours; bf16 inputs alone err by about 1e-4.
        return jnp.dot(a_r, b_c.T, precision=prec, preferred_element_type=jnp.float32)

    def local_pass(a, b, pad, table):
        """Walk this device's tile pairs; returns its candidate lists (n_pad, kc) values and
        indices, best first ((-inf, sentinel) where nothing was seen)."""
        table = table.reshape(-1, 3)
        v0 = jnp.full((n_pad, kc), -jnp.inf, jnp.float32)
        i0 = jnp.full((n_pad, kc), _SENTINEL, jnp.int32)

        def merge_into(vals, ids, tv, ti, keep, row0, col0):
            """Merge tile candidates tv/ti (tile, kc) (ti relative to col0) into rows row0..;
            keep=False merges nothing (masked, so no conditional is needed)."""
            tv = jnp.where(keep, tv.astype(jnp.float32), -jnp.inf)
            ti = jnp.where(keep, ti + col0, _SENTINEL)
            mv, mi = _best(jnp.concatenate([lax.dynamic_slice_in_dim(vals, row0, tile), tv], 1),
                           jnp.concatenate([lax.dynamic_slice_in_dim(ids, row0, tile), ti], 1),
                           kc)
            return (lax.dynamic_update_slice_in_dim(vals, mv, row0, 0),
                    lax.dynamic_update_slice_in_dim(ids, mi, row0, 0))

        def body(p, carry):
            vals, ids = carry
            r, c, valid = table[p, 0], table[p, 1], table[p, 2] > 0
            r0, c0 = r * tile, c * tile
            s = score_tile(lax.dynamic_slice_in_dim(a, r0, tile),
                           lax.dynamic_slice_in_dim(b, c0, tile),
                           lax.dynamic_slice_in_dim(pad, r0, tile),
                           lax.dynamic_slice_in_dim(pad, c0, tile))
            vals, ids = merge_into(vals, ids, *_row_candidates(s, kc, group), valid, r0, c0)
            # a diagonal tile's column pass would add the same pairs again
            keep = valid & (c != r)
            col = lambda v_i: merge_into(*v_i, *_col_candidates(s, kc, group), keep, c0, r0)
            if skip_by_cond:     # skipping is exact: merging nothing leaves the lists as they are
                return lax.cond(keep, col, lambda v_i: v_i, (vals, ids))
            return col((vals, ids))

        return lax.fori_loop(0, table.shape[0], body, (v0, i0))

    def rerank(x, rows_x, cand, worst, sq, row_base, n):
        """Float32 distances of the candidates from differences of the input points (not the
        centred ones: centring rounds, and can merge points a few ulps apart);
        (nb, kc) -> (nb, k) dist, idx, and (nb,) `certified`: whether no point outside the
        candidates can be nearer than the k-th (the worst candidate's matmul score, less its
        rounding bound and the centring's, says so). sq: (n_pad,) centred squared norms."""
        rt = tile
        nrt = nb // rt
        real = jnp.arange(n_pad) < n
        norms = jnp.sqrt(sq)
        rmax = jnp.max(jnp.where(real, norms, 0.0))

        def one(t, out):
            od, oi, oc = out
            r0 = t * rt
            xr = lax.dynamic_slice_in_dim(rows_x, r0, rt)
            ci = lax.dynamic_slice_in_dim(cand, r0, rt)
            xg = jnp.take(x, jnp.clip(ci, 0, n_pad - 1), axis=0)        # (rt, kc, d)
            diff = xr[:, None, :] - xg
            d2 = jnp.sum(diff * diff, axis=-1)
            me = row_base + r0 + jnp.arange(rt, dtype=jnp.int32)
            bad = (ci == me[:, None]) | (ci >= n) | (ci < 0)
            d2 = jnp.where(bad, jnp.inf, d2)
            ci = jnp.where(bad, _SENTINEL, ci)
            d2, ci = lax.sort((d2, ci), dimension=1, num_keys=2)
            # any point j outside the candidates has matmul score <= the worst candidate's,
            # so its centred squared distance is >= -worst - bound; centring moved each point by
            # at most 2^-24 of its centred norm (float32 rounding; 2^-23 taken), so the true
            # distance is >= sqrt(that) - cen. The k found are exact when the k-th is nearer.
            nr = lax.dynamic_slice_in_dim(norms, row_base + r0, rt)
            bound = cert_c * (nr + rmax) ** 2
            cen = 2.0 ** -23 * (nr + rmax)
            wr = lax.dynamic_slice_in_dim(worst, r0, rt)
            lo = jnp.square(jnp.maximum(jnp.sqrt(jnp.maximum(-wr - bound, 0.0)) - cen, 0.0))
            # k exact duplicates found: no distance can be smaller (which k of a larger group
            # of identical points are returned is then not by index)
            ok = (d2[:, k - 1] * (1.0 + 1e-6) < lo) | (d2[:, k - 1] == 0.0)
            od = lax.dynamic_update_slice_in_dim(od, jnp.sqrt(d2[:, :k]), r0, 0)
            oi = lax.dynamic_update_slice_in_dim(oi, ci[:, :k], r0, 0)
            oc = lax.dynamic_update_slice_in_dim(oc, ok | (not certify), r0, 0)
            return od, oi, oc

        init = (jnp.zeros((nb, k), jnp.float32), jnp.zeros((nb, k), jnp.int32),
                jnp.zeros((nb,), bool))
        return lax.fori_loop(0, nrt, one, init)

    if mesh is None:
        def run(x, mean, table, n):
            a, b, pad, sq = operands(x, mean, n)
            vals, ids = local_pass(a, b, pad, table)
            return rerank(x, x, ids, vals[:, kc - 1], sq, 0, n)
        return jax.jit(run)

    def device_fn(x, mean, table, n):
        a, b, pad, sq = operands(x, mean, n)
        vals, ids = local_pass(a, b, pad, table)
        # send rows [j*nb, (j+1)*nb) to device j; receive every device's lists for my rows
        vals = lax.all_to_all(vals.reshape(n_dev, nb, kc), axes, 0, 0, tiled=False)
        ids = lax.all_to_all(ids.reshape(n_dev, nb, kc), axes, 0, 0, tiled=False)
        flat = lambda y: jnp.moveaxis(y, 0, 1).reshape(nb, n_dev * kc)
        vals, ids = _best(flat(vals), flat(ids), kc)
        worst = vals[:, kc - 1]
        me = lax.axis_index(axes)
        base = (me * nb).astype(jnp.int32)
        rows_x = lax.dynamic_slice_in_dim(x, base, nb)
        return rerank(x, rows_x, ids, worst, sq, base, n)

    sm = jax.shard_map(device_fn, mesh=mesh, in_specs=(P(), P(), P(axes), P()),
                       out_specs=(P(axes), P(axes), P(axes)), check_vma=False)
    return jax.jit(sm)


def knn(x, k: int, *, mesh: Optional[Mesh] = None, tile: Optional[int] = None,
        exact_f32: Optional[bool] = None, margin: Optional[int] = None,
        direct_max_dim: int = 8, group: int = 16) -> Tuple[np.ndarray, np.ndarray]:
    """Exact k nearest other points of every row of x.

    Args:
      x: (N, d) float array (host or device); N need not divide the tile or device count.
      k: neighbours per point, 1 <= k < N.
      mesh: rows/tile pairs are split over all devices of this mesh (None: default device).
      tile: largest square tile edge (rows = columns; default 8192 on accelerators, 5120 on
        CPU); shrunk so that N pads little, raised to 2 (k + 1 + margin) if smaller.
      exact_f32: rank candidates in float32 at HIGHEST precision and certify them (None: True
        on CPU, where it is the fast path, False on accelerators: bf16 candidates re-ranked in
        float32, exact only when the margin absorbs bf16 rounding). Certified: a row whose
        k-th neighbour is not nearer than the worst candidate by more than the float32 matmul's
        rounding bound (near-duplicate clusters) is recomputed in float64 on the host
        (`exact_rows_f64`), so the distances are exact on any input, ties by index (except
        among more exact duplicates of a point than the candidate list holds: any k of them).
      margin: extra candidates kept per row before the exact re-rank (default: 2 exact, which
        leaves few rows to recompute on random data, 5 fast).
      direct_max_dim: for d <= this, distances are formed from differences (no cancellation).
      group: entries per group at each level of the hierarchical per-tile top-k (1: plain
        `lax.top_k` over whole tile rows).
    Returns:
      dist (N, k) float32 ascending Euclidean distances, idx (N, k) int32; ties by index.
    """
    x = np.asarray(x, dtype=np.float32) if not isinstance(x, jax.Array) else x.astype(jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"knn expects x of shape (N, d), got {x.shape}")
    n, d = x.shape
    if not 1 <= k < n:
        raise ValueError(f"knn needs 1 <= k < N, got k={k}, N={n}")
    _check_finite(x)
    # Distances do not change under translation, but the matmul form -||a-b||^2 =
    # 2ab - |a|^2 - |b|^2 cancels catastrophically for points far from the origin (a common
    # offset of 1000 in d = 64 gives wrong neighbours): the candidates come from centred
    # points; the distances from the points as given.
    if isinstance(x, jax.Array):
        mean = jnp.mean(x, axis=0)
    else:
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    if exact_f32 is None:
        exact_f32 = device_platform(mesh) == "cpu"
    if margin is None:
        margin = 2 if exact_f32 else 5
    direct = d <= direct_max_dim
    n_dev = mesh.size if mesh is not None else 1
    # as few tiles as `tile` allows, each as small as possible (little padding); the tile does
    # not depend on the device count, so every device count computes the same tiles and gives
    # bit-identical results. Devices get whole tiles: the tile count rounds up to n_dev.
    # A tile must hold k + 1 + margin candidates per row; the shrinking below can halve it.
    ntiles = -(-n // max(int(tile or default_tile(mesh)), 2 * (k + 1 + margin)))
    tile = -(-n // ntiles)
    tile = _round_up(tile, 128 if tile >= 1024 else 8)
    ntd = -(-(-(-n // tile)) // n_dev)
    kc = min(k + 1 + margin, tile)
    if kc < k + 1:
        raise ValueError(f"tile {tile} too small for k={k}")
    nt = ntd * n_dev
    n_pad = nt * tile
    table = _pair_table(nt, n_dev)
    group = _group_size(tile, kc, int(group))
    fn = _build(n_pad, d, k, kc, tile, bool(exact_f32) or direct, direct, group, mesh)
    if isinstance(x, jax.Array):
        xp = jnp.pad(x, ((0, n_pad - n), (0, 0)))
    else:
        xp = np.pad(x, ((0, n_pad - n), (0, 0)))
    if mesh is not None:
        xp = jax.device_put(xp, NamedSharding(mesh, P()))
        mean = jax.device_put(mean, NamedSharding(mesh, P()))
        table = jax.device_put(table, NamedSharding(mesh, P(tuple(mesh.axis_names))))
    dist, idx, cert = fn(xp, mean, table, np.int32(n))
    if not dist.is_fully_addressable:     # several hosts: every process gets the whole result
        from jax.experimental import multihost_utils
        dist, idx, cert = (np.asarray(v) for v in
                           multihost_utils.process_allgather((dist, idx, cert), tiled=True))
    redo = np.flatnonzero(~np.asarray(cert)[:n])
    if redo.size == 0:
        return dist[:n], idx[:n]
    # near-ties inside float32 matmul rounding (near-duplicate clusters): exact in float64
    log.info("knn: %d of %d rows have neighbours closer than float32 matmul rounding; "
             "recomputing them in float64", redo.size, n)
    dist, idx = np.array(dist[:n]), np.array(idx[:n])
    dist[redo], idx[redo] = exact_rows_f64(np.asarray(x, np.float32), redo, k)
    return dist, idx


def exact_rows_f64(x: np.ndarray, rows: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The k nearest other points of x[rows] in float64 on the host: a float64 matmul finds
    every point within rounding of the k-th, then their distances from differences (exact
    duplicates at exactly 0) sorted by (distance, index). x (N, d); -> (R, k) dist, idx."""
    n, d = x.shape
    mu = x.mean(axis=0, dtype=np.float64)   # the filter's matmul on centred points; the
    cols = min(n, 8192)                     # distances from differences of x itself
    buf = np.empty((cols, d))          # one reused float64 buffer: converting all of x at once
    sq = np.empty(n)                   # costs more in fresh memory pages than in arithmetic
    for c0 in range(0, n, cols):
        m = min(cols, n - c0)
        np.subtract(x[c0:c0 + m], mu, out=buf[:m])
        sq[c0:c0 + m] = np.einsum("ij,ij->i", buf[:m], buf[:m])
    rmax = float(np.sqrt(sq.max()))
    out_d = np.empty((rows.size, k), np.float32)
    out_i = np.empty((rows.size, k), np.int32)
    step = max(1, min(256, (1 << 25) // max(n, 1)))               # (step, N) float64 <= 256 MiB
    for r0 in range(0, rows.size, step):
        r = rows[r0:r0 + step]
        xr = x[r].astype(np.float64)
        xrc = xr - mu
        g = np.empty((r.size, n))
        for c0 in range(0, n, cols):
            m = min(cols, n - c0)
            np.subtract(x[c0:c0 + m], mu, out=buf[:m])
            g[:, c0:c0 + m] = sq[r][:, None] + sq[None, c0:c0 + m] - 2.0 * (xrc @ buf[:m].T)
        g[np.arange(r.size), r] = np.inf
        kth = np.partition(g, k - 1, axis=1)[:, k - 1]
        tol = 2 * CERT_SIGMAS * math.sqrt(d + 2) * 2.0 ** -53 * (np.sqrt(sq[r]) + rmax) ** 2
        for t, i in enumerate(r):
            cand = np.flatnonzero(g[t] <= kth[t] + 2 * tol[t])
            cand = cand[cand != i]
            diff = x[cand].astype(np.float64) - xr[t]
            d2 = np.einsum("ij,ij->i", diff, diff)
            order = np.lexsort((cand, d2))[:k]
            out_d[r0 + t] = np.sqrt(d2[order])
            out_i[r0 + t] = cand[order]
    return out_d, out_i


__all__ = ["knn", "default_tile", "exact_rows_f64"]
