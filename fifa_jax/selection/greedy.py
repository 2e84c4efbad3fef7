"""Greedy set maximisation of the FiFA objective with incremental, sharded gain updates.

    F(S) = sum_{i in S} a_i + gamma * [|S| > k] * sum_{i in S} log max(rho_k^S(i), eps)

a_i = m_i + alpha q(c_i) per candidate pair; rho_k^S(i) is the k-th smallest distance from i
to the *other* members of S, distances between pairs being distances between their prompts'
embeddings (two pairs of one prompt, or of two prompts with bitwise identical embeddings, sit
at 0, floored at eps: the duplicate policy). Each step adds the candidate with the largest gain
F(S + j) - F(S), smallest index on ties (method.md 2; gains within the float32 rounding of
their entropy terms, `TIE_RTOL`, count as tied):

    gain_j = a_j + gamma * [ log rho_k(j; S) + pen(j) ]          (|S| >= k; a_j if |S| < k)
    pen(j) = sum_{i in S} c_i(d_ij),  c_i(d) = [d < r_i^(k)] (log max(d, r_i^(k-1)) - log r_i^(k))

with r_i^(1..k) member i's sorted floored distances to the other members (r^(0) = 0; while a
member has only k - 1 others, log r^(k) counts as 0, which gives the |S| = k step its whole
entropy sum). Everything but a_j depends on j only through its prompt, so the state is per
unique prompt U (sharded over the mesh like the per-pair arrays):
  own (U, k)  k smallest floored distances from each prompt to the members;
  pen (U,)    the penalty above;  member lists (K, k) replicated.
After a pick s: (1) one (U, d) pass gives d(., s), inserted into `own` and into the lists of
the members; (2) s's own term and (3) the terms of the members whose list s changed (about k)
are re-added to `pen` with one (U, d) x (d, B) pass per chunk of B members. Cost per step: a few
passes over the unique-prompt embeddings, never an N x |S| matrix.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fifa_jax.errors import InputError

log = logging.getLogger(__name__)

# Two gains count as tied (smallest index wins) when they differ by less than TIE_RTOL times
# the float32 magnitudes summed into their entropy terms (gamma (1 + |log r_k| + sum |c_i|)),
# a bound on the rounding those sums carry; while |S| < k the gains are a_j, compared exactly.
TIE_RTOL = 2e-6


def duplicate_groups(emb: np.ndarray) -> np.ndarray:
    """(U, d) -> (U,) int32: for each row, the smallest index of a row bitwise equal to it
    (prompts that embed identically, e.g. ones differing only in case or spacing under CLIP's
    tokenizer, are duplicates: distance exactly 0, floored at eps)."""
    if emb.shape[0] == 0:
        return np.zeros(0, np.int32)
    _, first, inverse = np.unique(np.ascontiguousarray(emb), axis=0, return_index=True,
                                  return_inverse=True)
    return first[inverse.reshape(-1)].astype(np.int32)


class GreedyResult(NamedTuple):
    order: np.ndarray   # (K,) int64 candidate indices in pick order
    gains: np.ndarray   # (K,) float64 gain of each pick when it was made


class _State(NamedTuple):
    chosen: jax.Array      # (N,) bool
    own: jax.Array         # (U, k) float32
    pen: jax.Array         # (U,) float32
    pen_abs: jax.Array     # (U,) float32 sum of |terms| added into pen (its rounding scale)
    mem_pair: jax.Array    # (Kp,) int32
    mem_prompt: jax.Array  # (Kp,) int32
    mem_list: jax.Array    # (Kp, k) float32
    mem_gain: jax.Array    # (Kp,) float32
    count: jax.Array       # (U,) int32 members per prompt
    m: jax.Array           # () int32, members so far


def _insert(lists, v):
    """Insert v (...,) into ascending lists (..., k), keeping the k smallest (branch-free)."""
    prev = jnp.concatenate([jnp.full_like(lists[..., :1], -jnp.inf), lists[..., :-1]], axis=-1)
    return jnp.minimum(lists, jnp.maximum(prev, v[..., None]))


def _contrib(dist, lists, k):
    """c_i(d) for a block of members: dist (U, B), lists (B, k) -> (U, B)."""
    r1 = lists[:, k - 2] if k >= 2 else jnp.zeros_like(lists[:, 0])
    r2 = lists[:, k - 1]
    log_r2 = jnp.where(jnp.isfinite(r2), jnp.log(r2), 0.0)
    val = jnp.log(jnp.maximum(dist, r1[None, :])) - log_r2[None, :]
    return jnp.where(dist < r2[None, :], val, 0.0)


@functools.lru_cache(maxsize=16)
def _build(n_pad: int, u_pad: int, kp: int, k: int, chunk: int, gamma: float, eps: float,
           cap: int, mesh: Optional[Mesh]):
    """jit(run_steps(state, n_steps, a, pid, emb, emb_rep, sq, grp, grp_rep) -> state)."""

    def dist_to(emb, sq, grp, q, qgrp):
        """Floored distances (U, B) from every prompt to B prompts with rows q (B, d) and
        duplicate groups qgrp (B,); grp (U,) are the rows' groups."""
        g = jnp.dot(emb, q.T, precision=lax.Precision.HIGHEST)
        d2 = sq[:, None] + jnp.sum(q * q, axis=1)[None, :] - 2.0 * g
        dist = jnp.sqrt(jnp.maximum(d2, 0.0))
        # same embedding (the same prompt, or two prompts that embed identically): exactly 0;
        # the matmul form would leave about 1e-7 |x|^2 of rounding, above a small eps
        dist = jnp.where(grp[:, None] == qgrp[None, :], 0.0, dist)
        return jnp.maximum(dist, eps)

    def step(st: _State, a, pid, emb, emb_rep, sq, grp, grp_rep):
        m = st.m
        log_own = jnp.log(st.own[:, k - 1])
        ent = log_own + st.pen
        gain = a + jnp.where(m >= k, gamma * ent[pid], 0.0)
        blocked = st.chosen
        if cap > 0:
            blocked = blocked | (st.count[pid] >= cap)
        gain = jnp.where(blocked, -jnp.inf, gain)
        # smallest index among the gains tied with the best up to float32 rounding (the
        # penalties are float32 sums, so exact ties of the float64 objective drift apart)
        scale = jnp.where(jnp.isfinite(log_own), jnp.abs(log_own), 0.0) + st.pen_abs
        tol = jnp.where(m >= k, TIE_RTOL * abs(gamma) * (1.0 + scale[pid]), 0.0)
        first = jnp.argmax(gain)
        best = gain[first]
        tied = gain >= best - tol - tol[first]
        s = jnp.where(jnp.isfinite(best), jnp.argmax(tied), first).astype(jnp.int32)
        g = gain[s]
        ps = pid[s]
        dv = dist_to(emb, sq, grp, emb_rep[ps][None, :], grp_rep[ps][None])[:, 0]   # (U,)
        r_s = st.own[ps]
        slots = jnp.arange(kp, dtype=jnp.int32)
        old = st.mem_list
        d_mem = dv[st.mem_prompt]
        is_mem = slots < m
        new = jnp.where(is_mem[:, None], _insert(old, d_mem), old)
        new = jnp.where((slots == m)[:, None], r_s[None, :], new)
        changed = is_mem & (d_mem < old[:, k - 1])
        m1 = m + 1
        proc = jnp.where(m1 == k, slots < m1, (m1 > k) & (changed | (slots == m)))
        has_old = (m1 > k) & (slots != m)
        pen = jnp.where(m1 == k, jnp.zeros_like(st.pen), st.pen)
        pen_abs = jnp.where(m1 == k, jnp.zeros_like(st.pen_abs), st.pen_abs)
        order = jnp.argsort(jnp.logical_not(proc), stable=True).astype(jnp.int32)
        n_proc = jnp.sum(proc.astype(jnp.int32))

        def chunk_body(carry):
            c, pen, pen_abs = carry
            sl = lax.dynamic_slice_in_dim(order, c * chunk, chunk)
            valid = (c * chunk + jnp.arange(chunk)) < n_proc
            qp = st.mem_prompt.at[m].set(ps)[sl]
            dist = dist_to(emb, sq, grp, emb_rep[qp], grp_rep[qp])              # (U, B)
            delta = _contrib(dist, new[sl], k)
            delta = delta - jnp.where(has_old[sl][None, :], _contrib(dist, old[sl], k), 0.0)
            delta = jnp.where(valid[None, :], delta, 0.0)
            return (c + 1, pen + jnp.sum(delta, axis=1),
                    pen_abs + jnp.sum(jnp.abs(delta), axis=1))

        _, pen, pen_abs = lax.while_loop(lambda cp: cp[0] * chunk < n_proc, chunk_body,
                                         (0, pen, pen_abs))
        return _State(chosen=st.chosen.at[s].set(True), own=_insert(st.own, dv), pen=pen,
                      pen_abs=pen_abs,
                      mem_pair=st.mem_pair.at[m].set(s), mem_prompt=st.mem_prompt.at[m].set(ps),
                      mem_list=new, mem_gain=st.mem_gain.at[m].set(g),
                      count=st.count.at[ps].add(1), m=m1)

    def run_steps(st, n_steps, a, pid, emb, emb_rep, sq, grp, grp_rep):
        return lax.fori_loop(0, n_steps,
                             lambda _, s: step(s, a, pid, emb, emb_rep, sq, grp, grp_rep), st)

    if mesh is None:
        return jax.jit(run_steps, donate_argnums=(0,))
    ax = tuple(mesh.axis_names)
    sh, rep = NamedSharding(mesh, P(ax)), NamedSharding(mesh, P())
    st_sh = _State(chosen=sh, own=sh, pen=sh, pen_abs=sh, mem_pair=rep, mem_prompt=rep,
                   mem_list=rep, mem_gain=rep, count=sh, m=rep)
    return jax.jit(run_steps, donate_argnums=(0,),
                   in_shardings=(st_sh, rep, sh, sh, NamedSharding(mesh, P(ax, None)), rep, sh, sh,
                                 rep),
                   out_shardings=st_sh)


def greedy_select(a, prompt_id, emb, k_pairs: int, *, knn_k: int = 5, gamma: float = 1.0,
                  eps: float = 1e-4, cap_per_prompt: int = 0, mesh: Optional[Mesh] = None,
                  chunk: int = 16,
                  steps_per_call: int = 256, progress: bool = True) -> GreedyResult:
    """Greedy maximisation of F over candidate pairs.

    Args:
      a: (N,) per-candidate term a_i = m_i + alpha q_i (after normalisation); -inf never picked.
      prompt_id: (N,) int prompt of each candidate, indexing rows of emb.
      emb: (U, d) prompt embeddings.
      k_pairs: K, the number of picks (<= N).
      knn_k: k of the entropy term; gamma: its weight; eps: the distance floor (> 0).
        Note: with k >= 2 a prompt can hold up to k members before the floor bites (a
        member's k-th neighbour is then still another prompt); cap_per_prompt limits that.
      cap_per_prompt: at most this many picks per prompt (0: no cap); capped prompts' pairs
        are simply not candidates (the brute-force definition with the same rule).
      mesh: candidates and prompts are sharded over all its devices (None: one device).
      chunk: members re-scored per (U, d) x (d, chunk) pass.
    Returns:
      GreedyResult(order (K,), gains (K,)).
    """
    a = np.asarray(a, np.float32)
    pid = np.asarray(prompt_id, np.int64)
    emb = np.asarray(emb, np.float32)
    n, u = a.shape[0], emb.shape[0]
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1)) if u else np.zeros(0, int)
    if bad.size:
        raise InputError(f"emb has NaN or inf in rows {bad[:5].tolist()}")
    big = float(np.abs(emb).max()) if emb.size else 0.0
    if big * big * emb.shape[1] > 1e36:
        raise InputError(f"emb values up to {big:.3g}: squared distances would overflow "
                         f"float32; rescale the embeddings")
    # distances come from |x|^2 + |y|^2 - 2xy in float32: centre first, or an offset far from
    # the origin cancels every digit (translation does not change any distance)
    emb = (emb - emb.mean(axis=0, dtype=np.float64)).astype(np.float32) if u else emb
    if pid.shape != (n,):
        raise ValueError(f"prompt_id must have shape ({n},), got {pid.shape}")
    if n and (pid.min() < 0 or pid.max() >= u):
        bad = np.flatnonzero((pid < 0) | (pid >= u))[:5]
        raise ValueError(f"prompt_id out of range [0, {u}) at candidates {bad.tolist()}")
    if not 0 < k_pairs <= n:
        raise ValueError(f"k_pairs must be in [1, {n}], got {k_pairs}")
    if eps <= 0:
        raise ValueError(f"eps (duplicate floor) must be > 0, got {eps}")
    if knn_k < 1:
        raise ValueError(f"knn_k must be >= 1, got {knn_k}")
    n_dev = mesh.size if mesh is not None else 1
    n_pad = -(-n // n_dev) * n_dev
    u_pad = -(-u // n_dev) * n_dev
    kp = -(-(k_pairs + 1) // chunk) * chunk
    k = int(knn_k)
    a_p = np.full(n_pad, -np.inf, np.float32)
    a_p[:n] = a
    pid_p = np.zeros(n_pad, np.int32)
    pid_p[:n] = pid
    emb_p = np.zeros((u_pad, emb.shape[1]), np.float32)
    emb_p[:u] = emb
    sq = np.sum(emb_p.astype(np.float32) ** 2, axis=1, dtype=np.float32)
    grp = np.arange(u_pad, dtype=np.int32)
    grp[:u] = duplicate_groups(emb)
    chosen = np.zeros(n_pad, bool)
    chosen[n:] = True
    st = _State(chosen=chosen, own=np.full((u_pad, k), np.inf, np.float32),
                pen=np.zeros(u_pad, np.float32), pen_abs=np.zeros(u_pad, np.float32),
                mem_pair=np.zeros(kp, np.int32),
                mem_prompt=np.zeros(kp, np.int32), mem_list=np.full((kp, k), np.inf, np.float32),
                mem_gain=np.zeros(kp, np.float32), count=np.zeros(u_pad, np.int32),
                m=np.int32(0))
    cap = int(cap_per_prompt or 0)
    if np.isnan(a).any():
        raise ValueError(f"a has NaN at candidates {np.flatnonzero(np.isnan(a))[:5].tolist()}")
    # pickable candidates: finite-or-+inf a, at most cap per prompt. Asking for more would leave
    # every gain at -inf and argmax would re-pick candidate 0.
    per_prompt = np.bincount(pid[a > -np.inf], minlength=u)
    pickable = int(np.minimum(per_prompt, cap).sum() if cap > 0 else per_prompt.sum())
    if k_pairs > pickable:
        raise ValueError(f"k_pairs={k_pairs} exceeds the {pickable} pickable candidates "
                         f"(a > -inf" + (f", at most cap_per_prompt={cap} per prompt)" if cap > 0
                                         else ")"))
    fn = _build(n_pad, u_pad, kp, k, int(chunk), float(gamma), float(eps), cap, mesh)
    args = [a_p, pid_p, emb_p, emb_p, sq, grp, grp]
    if mesh is not None:
        ax = tuple(mesh.axis_names)
        sh = NamedSharding(mesh, P(ax))
        rep = NamedSharding(mesh, P())
        args = [jax.device_put(a_p, sh), jax.device_put(pid_p, sh),
                jax.device_put(emb_p, NamedSharding(mesh, P(ax, None))),
                jax.device_put(emb_p, rep), jax.device_put(sq, sh), jax.device_put(grp, sh),
                jax.device_put(grp, rep)]
        st = _State(*[jax.device_put(v, s) for v, s in
                      zip(st, (sh, sh, sh, sh, rep, rep, rep, rep, sh, rep))])
    else:
        st = _State(*[jnp.asarray(v) for v in st])
    done, t0 = 0, time.time()
    while done < k_pairs:
        steps = min(steps_per_call, k_pairs - done)
        st = fn(st, np.int32(steps), *args)
        done += steps
        if progress:
            jax.block_until_ready(st.m)
            el = time.time() - t0
            log.info("greedy: %d/%d picks, %.1f picks/s, ETA %.0f s", done, k_pairs,
                     done / max(el, 1e-9), (k_pairs - done) * el / done)
    order = np.asarray(st.mem_pair)[:k_pairs].astype(np.int64)
    gains = np.asarray(st.mem_gain)[:k_pairs].astype(np.float64)
    return GreedyResult(order=order, gains=gains)


def exact_gains(a, prompt_id, emb, order, *, knn_k: int = 5, gamma: float = 1.0,
                eps: float = 1e-4) -> np.ndarray:
    """(K,) float64 gains F(S_t) - F(S_{t-1}) of the picks `order`, recomputed on the host.

    Independent of the device count and of float32 rounding on the device, so a manifest
    written from them is byte-identical on any mesh. O(K^2 d) once, then O(K k) per pick.
    """
    order = np.asarray(order, np.int64)
    kk, k = order.size, int(knn_k)
    pid = np.asarray(prompt_id)[order]
    e = np.asarray(emb, np.float64)[pid]
    sq = np.sum(e * e, axis=1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * e @ e.T, 0.0))
    dist[pid[:, None] == pid[None, :]] = 0.0
    dist = np.maximum(dist, eps)
    lists = np.full((kk, k), np.inf)              # k smallest distances to earlier members
    gains = np.asarray(a, np.float64)[order].copy()
    ent_prev = 0.0
    for t in range(kk):
        if t:
            col = dist[:t, t]
            prev = np.concatenate([np.full((t, 1), -np.inf), lists[:t, :-1]], axis=1)
            lists[:t] = np.minimum(lists[:t], np.maximum(prev, col[:, None]))
            row = np.sort(dist[t, :t])[:k]
            lists[t, :row.size] = row
        if t + 1 > k:
            ent = float(np.sum(np.log(lists[:t + 1, k - 1])))
            gains[t] += gamma * (ent - ent_prev)
            ent_prev = ent
    return gains


def set_objective(a, prompt_id, emb, members, *, knn_k: int = 5, gamma: float = 1.0,
                  eps: float = 1e-4) -> dict:
    """F(S) and its terms for the candidate indices `members` (float64, host; |S| x |S|).

    For reports on up to a few thousand members. Returns dict(sum_a, entropy_sum, F).
    """
    members = np.asarray(members, np.int64)
    a = np.asarray(a, np.float64)[members]
    e = np.asarray(emb, np.float64)[np.asarray(prompt_id)[members]]
    pid = np.asarray(prompt_id)[members]
    ent = 0.0
    if members.size > knn_k:
        sq = np.sum(e * e, axis=1)
        d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * e @ e.T, 0.0))
        d[pid[:, None] == pid[None, :]] = 0.0
        d = np.maximum(d, eps)
        np.fill_diagonal(d, np.inf)
        rho = np.partition(d, knn_k - 1, axis=1)[:, knn_k - 1]
        ent = float(np.sum(np.log(rho)))
    return {"sum_a": float(a.sum()), "entropy_sum": ent, "F": float(a.sum() + gamma * ent)}


__all__ = ["greedy_select", "GreedyResult", "exact_gains", "set_objective"]
