"""Importance-score top-K and normalisations against plain-python references."""
import numpy as np
import pytest

from fifa_jax.selection import average_rank, combined_score, margin_term, normalize, top_k_pairs


def reference_top_k(score, k, pid, cap):
    order = sorted(range(len(score)), key=lambda i: (-score[i], i))
    out, count = [], {}
    for i in order:
        if cap > 0 and count.get(pid[i], 0) >= cap:
            continue
        count[pid[i]] = count.get(pid[i], 0) + 1
        out.append(i)
        if len(out) == k:
            break
    return np.array(out)


def reference_rank(v):
    return np.array([np.mean([j for j, w in enumerate(sorted(v)) if w == x]) for x in v])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("norm", ["none", "zscore", "rank"])
def test_importance_top_k(seed, norm):
    rng = np.random.default_rng(seed)
    n, u = 200, 30
    pid = rng.integers(0, u, n)
    ms = rng.normal(size=n).round(1)           # rounded: ties
    q = rng.integers(0, 11, u).astype(float)[pid]
    div = rng.normal(size=u)[pid]
    alpha, gamma = 0.7, 1.3
    for kind in ("absolute", "signed"):
        m = margin_term(ms, np.abs(ms), kind)
        s = combined_score(normalize(m, norm), normalize(q, norm), normalize(div, norm), alpha,
                           gamma)
        if norm == "none":
            want_s = m + alpha * q + gamma * div
        elif norm == "zscore":
            z = lambda v: (v - v.mean()) / v.std()
            want_s = z(m) + alpha * z(q) + gamma * z(div)
        else:
            r = lambda v: reference_rank(list(v)) / (n - 1)
            want_s = r(m) + alpha * r(q) + gamma * r(div)
        np.testing.assert_allclose(s, want_s, rtol=1e-12, atol=1e-12)
        for cap in (0, 1, 3):
            np.testing.assert_array_equal(top_k_pairs(s, 25, pid, cap),
                                          reference_top_k(list(s), 25, pid, cap))


def test_normalize_edge_cases():
    assert np.all(normalize(np.full(5, 3.0), "zscore") == 0)
    np.testing.assert_array_equal(average_rank(np.array([2.0, 1.0, 2.0, 0.0])), [2.5, 1, 2.5, 0])
    with pytest.raises(ValueError, match="normalize"):
        normalize(np.zeros(3), "minmax")
    with pytest.raises(ValueError, match="margin"):
        margin_term(np.zeros(2), np.zeros(2), "relative")
    # unused (gamma = 0) -inf diversity does not poison the score
    assert np.isfinite(combined_score(np.ones(2), np.ones(2), np.full(2, -np.inf), 1.0, 0.0)).all()
