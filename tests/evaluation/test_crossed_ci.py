"""stats.crossed_mean_ci: the interval of a mean over seeds crossed with shared prompts,
against a loop transcription of the two-way ANOVA formula and by its coverage."""
import math

import numpy as np
import pytest
from scipy import stats as sstats

from fifa_jax.evaluation import stats


def _slow(x, level=0.95):
    s, p = len(x), len(x[0])
    grand = sum(sum(r) for r in x) / (s * p)
    rows = [sum(r) / p for r in x]
    cols = [sum(x[i][j] for i in range(s)) / s for j in range(p)]
    vs = sum((r - grand) ** 2 for r in rows) / (s - 1) / s
    vp = sum((c - grand) ** 2 for c in cols) / (p - 1) / p
    mse = sum((x[i][j] - rows[i] - cols[j] + grand) ** 2
              for i in range(s) for j in range(p)) / ((s - 1) * (p - 1))
    c3 = mse / (s * p)
    v = max(vs + vp - c3, vs, vp)
    df = v ** 2 / (vs ** 2 / (s - 1) + vp ** 2 / (p - 1) + c3 ** 2 / ((s - 1) * (p - 1)))
    half = sstats.t.ppf(0.5 + level / 2, df) * math.sqrt(v)
    return grand, grand - half, grand + half


@pytest.mark.parametrize("shape", [(5, 64), (3, 10), (2, 2)])
def test_matches_the_loop_transcription(shape):
    rng = np.random.default_rng(sum(shape))
    x = (rng.normal(0, 0.3, (shape[0], 1)) + rng.normal(0, 1.0, (1, shape[1]))
         + rng.normal(0, 0.5, shape))
    got = stats.crossed_mean_ci(x)
    mean, lo, hi = _slow(x.tolist())
    assert math.isclose(got["mean"], mean, rel_tol=1e-12, abs_tol=1e-12)
    assert np.allclose(got["ci"], [lo, hi], rtol=1e-9, atol=1e-12)
    assert (got["n"], got["prompts"]) == shape


def test_one_seed_or_one_prompt_is_the_plain_student_t():
    rng = np.random.default_rng(1)
    v = rng.normal(size=12)
    for x in (v[None, :], v[:, None]):
        got = stats.crossed_mean_ci(x)
        half = sstats.t.ppf(0.975, 11) * v.std(ddof=1) / math.sqrt(12)
        assert np.allclose(got["ci"], [v.mean() - half, v.mean() + half])
    assert stats.crossed_mean_ci([[2.0]])["ci"] == [None, None]
    assert stats.crossed_mean_ci(np.ones((3, 4)))["ci"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="non-finite"):
        stats.crossed_mean_ci([[1.0, np.nan], [1.0, 2.0]])
    with pytest.raises(ValueError, match="seeds, prompts"):
        stats.crossed_mean_ci([1.0, 2.0])


def test_coverage_where_the_seeds_only_interval_is_too_narrow():
    """5 seeds x 64 shared prompts, the prompts' spread larger than the seeds': the crossed
    interval covers the true mean about 95% of the time; the Student-t over the seeds' means
    (what the study reported before) far less."""
    rng = np.random.default_rng(0)
    s, p, n = 5, 64, 1000
    x = (rng.normal(0, 0.05, (n, s, 1)) + rng.normal(0, 1.0, (n, 1, p))
         + rng.normal(0, 0.3, (n, s, p)))
    crossed = seeds_only = 0
    for xi in x:
        lo, hi = stats.crossed_mean_ci(xi)["ci"]
        crossed += lo <= 0.0 <= hi
        m = xi.mean(1)
        half = sstats.t.ppf(0.975, s - 1) * m.std(ddof=1) / math.sqrt(s)
        seeds_only += m.mean() - half <= 0.0 <= m.mean() + half
    assert 0.92 <= crossed / n <= 0.98
    assert seeds_only / n < 0.5
