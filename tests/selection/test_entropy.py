"""Kozachenko-Leonenko entropy: Gaussian closed forms (d <= 4) and exact identities at d = 768."""
import math

import numpy as np
import pytest

from fifa_jax.selection import kl_entropy, log_rho_k
from fifa_jax.selection.entropy import digamma, log_unit_ball_volume


def gaussian_entropy(cov):
    return 0.5 * np.linalg.slogdet(2 * np.pi * np.e * np.atleast_2d(cov))[1]


@pytest.mark.parametrize("d", [1, 2, 4])
def test_gaussian_closed_form(d):
    rng = np.random.default_rng(d)
    cov = 0.5 * np.eye(d) + 0.5 * np.ones((d, d)) if d > 1 else np.array([[3.0]])
    x = rng.multivariate_normal(np.zeros(d), cov, size=20000).astype(np.float32)
    for k in (3, 5):
        assert abs(kl_entropy(x, k) - gaussian_entropy(cov)) < 0.05


def test_formula_pieces():
    assert abs(digamma(1.0) + 0.5772156649015329) < 1e-10
    assert abs(digamma(20000.0) - (math.log(20000.0) - 1 / 40000 - 1 / (12 * 20000.0 ** 2))) < 1e-12
    assert abs(log_unit_ball_volume(2) - math.log(math.pi)) < 1e-12
    assert abs(log_unit_ball_volume(3) - math.log(4 / 3 * math.pi)) < 1e-12
    # the estimator is exactly psi(N) - psi(k) + log V_d + d * mean(log rho)
    x = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)
    lr = log_rho_k(x, 4)
    want = digamma(300) - digamma(4) + log_unit_ball_volume(5) + 5 * lr.mean()
    assert abs(kl_entropy(x, 4) - want) < 1e-9


@pytest.fixture(scope="module")
def high_dim():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1500, 768)).astype(np.float32)
    x[:300] += 3.0 * rng.normal(size=(1, 768)).astype(np.float32)   # two clusters
    return x, kl_entropy(x, 5)


def test_scale_identity_d768(high_dim):
    x, h = high_dim
    for s in (2.0, 0.37):
        assert abs((kl_entropy(s * x, 5) - h) - 768 * math.log(s)) < 2e-3


def test_translation_rotation_invariance_d768(high_dim):
    x, h = high_dim
    rng = np.random.default_rng(8)
    assert abs(kl_entropy(x + rng.normal(size=(1, 768)).astype(np.float32) * 0.5, 5) - h) < 2e-3
    q, _ = np.linalg.qr(rng.normal(size=(768, 768)))
    assert abs(kl_entropy((x.astype(np.float64) @ q).astype(np.float32), 5) - h) < 2e-3


def test_duplicates_floor():
    x = np.random.default_rng(1).normal(size=(50, 3)).astype(np.float32)
    x[1] = x[0]
    assert np.isneginf(log_rho_k(x, 1)[0])
    assert log_rho_k(x, 1, eps=1e-3)[0] == pytest.approx(math.log(1e-3))
