"""Kozachenko-Leonenko k-NN differential entropy (nats), method.md section 2.

    H_hat = psi(N) - psi(k) + log V_d + (d / N) * sum_i log rho_k(i)
    log V_d = (d / 2) log(pi) - lgamma(d / 2 + 1)         (unit-radius Euclidean ball)

rho_k(i) is the Euclidean distance from point i to its k-th nearest *other* point (exact k-NN,
float32 ranking). Duplicates give rho = 0 (log = -inf) unless a floor `eps` > 0 is given.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from jax.sharding import Mesh

from fifa_jax.selection.knn import knn


def digamma(x: float) -> float:
    """psi(x) for x > 0 (recurrence to x >= 6, then the asymptotic series), float64."""
    if x <= 0:
        raise ValueError(f"digamma needs x > 0, got {x}")
    acc = 0.0
    while x < 10.0:
        acc -= 1.0 / x
        x += 1.0
    inv = 1.0 / x
    inv2 = inv * inv
    series = inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 * (1 / 252 - inv2 * (1 / 240 - inv2 / 132))))
    return acc + math.log(x) - 0.5 * inv - series


def log_unit_ball_volume(d: int) -> float:
    """log V_d of the unit Euclidean ball in d dimensions."""
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0)


def log_rho_k(x, k: int, *, eps: float = 0.0, mesh: Optional[Mesh] = None,
              **knn_kwargs) -> np.ndarray:
    """(N,) float64 log of the distance to the k-th nearest other point, floored at eps."""
    dist, _ = knn(x, k, mesh=mesh, exact_f32=knn_kwargs.pop("exact_f32", True), **knn_kwargs)
    rho = np.asarray(dist[:, k - 1], np.float64)
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(rho, eps))


def kl_entropy_from_log_rho(log_rho: np.ndarray, k: int, d: int) -> float:
    """KL estimate from precomputed per-point log rho_k (N,)."""
    n = int(log_rho.shape[0])
    return (digamma(n) - digamma(k) + log_unit_ball_volume(d)
            + d * float(np.mean(np.asarray(log_rho, np.float64))))


def kl_entropy(x, k: int = 5, *, eps: float = 0.0, mesh: Optional[Mesh] = None,
               **knn_kwargs) -> float:
    """Kozachenko-Leonenko entropy estimate (nats) of the rows of x (N, d)."""
    x = np.asarray(x) if not hasattr(x, "sharding") else x
    n, d = x.shape
    return kl_entropy_from_log_rho(log_rho_k(x, k, eps=eps, mesh=mesh, **knn_kwargs), k, d)


__all__ = ["digamma", "log_unit_ball_volume", "log_rho_k", "kl_entropy",
           "kl_entropy_from_log_rho"]
