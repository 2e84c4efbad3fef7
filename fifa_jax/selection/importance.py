"""Importance-score top-K (the paper's approximation) and the score-based baselines.

    s_i = m_i + alpha * q(c_i) + gamma * log rho_k(c_i)          (method.md section 2)

Every term is a per-pair column (per-prompt terms gathered by prompt id), normalised over the
candidate pairs by `normalize`: none | zscore (mean 0, std 1; a constant column becomes 0) |
rank (average rank of ties, scaled to [0, 1]). Top-K orders by (score desc, pair index asc), so
ties break deterministically, and optionally keeps at most `cap_per_prompt` pairs per prompt.
All host-side float64 numpy: sorting 10^6 scores takes milliseconds.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

NORMALIZATIONS = ("none", "zscore", "rank")


def normalize(values: np.ndarray, method: str) -> np.ndarray:
    """(P,) float64 normalised copy of values over all P entries."""
    v = np.asarray(values, np.float64)
    if method == "none":
        return v.copy()
    if method == "zscore":
        if v.size == 0:
            return v.copy()
        std = v.std()
        return (v - v.mean()) / std if std > 0 else np.zeros_like(v)
    if method == "rank":
        return average_rank(v) / max(v.size - 1, 1)
    raise ValueError(f"select.normalize must be one of {NORMALIZATIONS}, got {method!r}")


def average_rank(v: np.ndarray) -> np.ndarray:
    """0-based ranks of v ascending, ties get the mean of their ranks (float64)."""
    v = np.asarray(v, np.float64)
    order = np.argsort(v, kind="stable")
    sv = v[order]
    n = v.size
    starts = np.r_[0, np.flatnonzero(sv[1:] != sv[:-1]) + 1] if n else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], n]
    mean_rank = (starts + ends - 1) / 2.0
    ranks = np.empty(n, np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def margin_term(margin_signed: np.ndarray, margin_abs: np.ndarray, kind: str) -> np.ndarray:
    """The margin column chosen by select.margin: absolute | signed."""
    if kind == "absolute":
        return np.asarray(margin_abs, np.float64)
    if kind == "signed":
        return np.asarray(margin_signed, np.float64)
    raise ValueError(f"select.margin must be 'absolute' or 'signed', got {kind!r}")


def combined_score(m: np.ndarray, q: np.ndarray, div: np.ndarray, alpha: float,
                   gamma: float) -> np.ndarray:
    """s = m + alpha q + gamma div, with 0 * term dropped (so an unused -inf term is harmless)."""
    s = np.asarray(m, np.float64).copy()
    if alpha != 0:
        s += alpha * np.asarray(q, np.float64)
    if gamma != 0:
        s += gamma * np.asarray(div, np.float64)
    return s


def top_k_pairs(score: np.ndarray, k: int, prompt_id: Optional[np.ndarray] = None,
                cap_per_prompt: int = 0) -> np.ndarray:
    """Indices (into score) of the k best by (score desc, index asc), at most cap per prompt.

    cap_per_prompt <= 0 means no cap. Returns fewer than k indices only if the cap leaves
    fewer eligible pairs.
    """
    score = np.asarray(score, np.float64)
    if np.isnan(score).any():
        bad = np.flatnonzero(np.isnan(score))[:5].tolist()
        raise ValueError(f"importance scores contain NaN at rows {bad}")
    order = np.lexsort((np.arange(score.size), -score))
    if cap_per_prompt and cap_per_prompt > 0:
        if prompt_id is None:
            raise ValueError("cap_per_prompt needs prompt_id")
        pid = np.asarray(prompt_id)[order]
        # occurrence number of each prompt along the order: position minus the prompt's first
        by_prompt = np.argsort(pid, kind="stable")
        sp = pid[by_prompt]
        first = np.r_[0, np.flatnonzero(sp[1:] != sp[:-1]) + 1]
        run_start = np.repeat(first, np.diff(np.r_[first, sp.size]))
        occ = np.empty(sp.size, np.int64)
        occ[by_prompt] = np.arange(sp.size) - run_start
        order = order[occ < cap_per_prompt]
    return order[:k]


__all__ = ["NORMALIZATIONS", "normalize", "average_rank", "margin_term", "combined_score",
           "top_k_pairs"]
