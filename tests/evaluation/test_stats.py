"""stats: win rate, bootstrap intervals and summaries against slow loop references."""
import numpy as np
import pytest

from fifa_jax.evaluation import stats


# ---- slow references (python loops) ----

def slow_win_rate(t, b, ties="half"):
    wins = sum(1 for x, y in zip(t, b) if x > y)
    n_ties = sum(1 for x, y in zip(t, b) if x == y)
    if ties == "half":
        return (wins + 0.5 * n_ties) / len(t)
    if ties == "loss":
        return wins / len(t)
    return wins / (len(t) - n_ties) if len(t) > n_ties else 0.5


def slow_bootstrap(fn, *arrays, n_boot, level, seed, groups=None):
    """Same draws as the documented bootstrap_ci, one replicate at a time."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    if groups is None:
        draws = rng.integers(0, n, size=(n_boot, n))
        replicates = [list(row) for row in draws]
    else:
        labels = sorted(set(np.asarray(groups).tolist()))
        members = [[i for i in range(n) if groups[i] == g] for g in labels]
        draws = rng.integers(0, len(labels), size=(n_boot, len(labels)))
        replicates = [[i for g in row for i in members[g]] for row in draws]
    values = []
    for rep in replicates:
        values.append(fn(*(np.array([a[i] for i in rep]) for a in arrays)))
    values = np.array(values, np.float64)
    return tuple(np.quantile(values, [(1 - level) / 2, (1 + level) / 2]))


def _paired(rng, n_prompts, seeds, shift=0.0, quantise=False):
    prompt_effect = np.repeat(rng.normal(size=n_prompts), seeds)
    base = prompt_effect + rng.normal(size=n_prompts * seeds)
    tuned = prompt_effect + shift + rng.normal(size=n_prompts * seeds)
    if quantise:   # exact ties
        base, tuned = np.round(base), np.round(tuned)
    return tuned, base, np.repeat(np.arange(n_prompts), seeds)


# ---- win rate ----

@pytest.mark.parametrize("ties", ["half", "loss", "drop"])
def test_win_rate_matches_loop(ties):
    rng = np.random.default_rng(1)
    for trial in range(20):
        tuned, base, _ = _paired(rng, 13, 3, shift=0.3, quantise=trial % 2 == 0)
        assert stats.win_rate(tuned, base, ties=ties) == pytest.approx(
            slow_win_rate(tuned, base, ties), abs=1e-15)


def test_win_rate_batched_rows_equal_single():
    rng = np.random.default_rng(2)
    t, b = np.round(rng.normal(size=(5, 17))), np.round(rng.normal(size=(5, 17)))
    got = stats.win_rate(t, b)
    assert got.shape == (5,)
    np.testing.assert_array_equal(got, [stats.win_rate(t[i], b[i]) for i in range(5)])


def test_win_rate_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        stats.win_rate(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="non-finite"):
        stats.win_rate(np.array([1.0, np.nan]), np.zeros(2))
    with pytest.raises(ValueError, match="at least one value"):
        stats.win_rate(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="ties must be"):
        stats.win_rate(np.zeros(2), np.zeros(2), ties="coin")


# ---- bootstrap: bit-equal to the loop with the same draws ----

@pytest.mark.parametrize("clustered", [False, True])
def test_bootstrap_bit_equal_to_loop(clustered):
    rng = np.random.default_rng(3)
    tuned, base, groups = _paired(rng, 11, 4, shift=0.2, quantise=True)
    g = groups if clustered else None
    for fn in (stats.win_rate, stats.mean_diff):
        got = stats.bootstrap_ci(fn, tuned, base, n_boot=300, level=0.9, seed=7, groups=g)
        want = slow_bootstrap(fn, tuned, base, n_boot=300, level=0.9, seed=7, groups=g)
        assert got == want


def test_bootstrap_ragged_unsorted_groups_bit_equal_to_loop():
    rng = np.random.default_rng(4)
    sizes = [1, 3, 2, 4, 2, 5]
    labels = [40, 7, 12, 3, 99, 8]             # unsorted, not 0..G-1
    groups = np.concatenate([[lab] * s for lab, s in zip(labels, sizes)])
    order = rng.permutation(len(groups))       # members of a prompt scattered over the array
    groups = groups[order]
    x = np.round(rng.normal(size=len(groups)), 1)
    y = np.round(rng.normal(size=len(groups)), 1)
    got = stats.bootstrap_ci(stats.win_rate, x, y, n_boot=200, seed=5, groups=groups)
    want = slow_bootstrap(stats.win_rate, x, y, n_boot=200, level=0.95, seed=5, groups=groups)
    assert got == want


def test_bootstrap_deterministic_by_seed_and_chunking(monkeypatch):
    rng = np.random.default_rng(5)
    tuned, base, groups = _paired(rng, 20, 2)
    a = stats.bootstrap_ci(stats.mean_diff, tuned, base, n_boot=500, seed=11, groups=groups)
    assert a == stats.bootstrap_ci(stats.mean_diff, tuned, base, n_boot=500, seed=11,
                                   groups=groups)
    assert a != stats.bootstrap_ci(stats.mean_diff, tuned, base, n_boot=500, seed=12,
                                   groups=groups)
    monkeypatch.setattr(stats, "_MAX_GATHER", 100)   # many small chunks: same answer
    assert a == stats.bootstrap_ci(stats.mean_diff, tuned, base, n_boot=500, seed=11,
                                   groups=groups)


def test_bootstrap_errors():
    with pytest.raises(ValueError, match="groups must have shape"):
        stats.bootstrap_ci(stats.mean_diff, np.zeros(4), np.zeros(4), groups=np.zeros(3))
    with pytest.raises(ValueError, match="array 1 has shape"):
        stats.bootstrap_ci(stats.mean_diff, np.zeros(4), np.zeros(5))
    with pytest.raises(ValueError, match="level"):
        stats.bootstrap_ci(stats.mean_diff, np.zeros(4), np.zeros(4), level=95)


# ---- coverage (seeded, so deterministic; tolerances wide against the binomial noise) ----

def _coverage(make, groups_for, n_sets=200, n_boot=400):
    rng = np.random.default_rng(6)
    hits = 0
    for k in range(n_sets):
        x, groups = make(rng)
        lo, hi = stats.bootstrap_ci(lambda v: np.mean(v, axis=-1), x, n_boot=n_boot, seed=k,
                                    groups=groups_for(groups))
        hits += lo <= 0.0 <= hi
    return hits / n_sets


def test_coverage_iid_normal_mean():
    cov = _coverage(lambda rng: (rng.normal(size=60), None), lambda g: None)
    assert 0.88 <= cov <= 0.99, cov   # nominal 0.95; binomial sd over 200 sets ~0.015


def test_coverage_clustered_needs_groups():
    """Correlated seeds within a prompt: the cluster bootstrap covers, the iid one does not."""
    def make(rng):
        prompts, seeds = 40, 4
        x = np.repeat(rng.normal(size=prompts), seeds) + 0.3 * rng.normal(size=prompts * seeds)
        return x, np.repeat(np.arange(prompts), seeds)
    clustered = _coverage(make, lambda g: g)
    iid = _coverage(make, lambda g: None)
    assert 0.88 <= clustered <= 0.99, clustered
    assert iid < 0.8, iid   # about 0.68 expected (intervals ~1.9x too narrow)


# ---- summaries ----

def test_identical_models_half_and_inside():
    rng = np.random.default_rng(8)
    _, base, groups = _paired(rng, 25, 4)
    s = stats.summarize(base.copy(), base, groups, n_boot=300)
    assert s["win_rate"] == 0.5
    assert s["win_rate_ci"][0] <= 0.5 <= s["win_rate_ci"][1]
    assert s["mean_diff"] == 0.0 and s["mean_diff_ci"] == [0.0, 0.0]


def test_clearly_better_model_interval_above_half():
    rng = np.random.default_rng(9)
    tuned, base, groups = _paired(rng, 50, 4, shift=1.0)
    s = stats.summarize(tuned, base, groups, n_boot=500)
    assert s["win_rate_ci"][0] > 0.5 and s["mean_diff_ci"][0] > 0.0
    worse = stats.summarize(base, tuned, groups, n_boot=500)
    assert worse["win_rate_ci"][1] < 0.5


def test_summarize_matches_slow():
    rng = np.random.default_rng(10)
    tuned, base, groups = _paired(rng, 9, 3, shift=0.4, quantise=True)
    s = stats.summarize(tuned, base, groups, n_boot=250, level=0.9, seed=3)
    assert s["n"] == 27 and s["n_prompts"] == 9 and s["level"] == 0.9
    assert s["base_mean"] == pytest.approx(sum(base) / 27, abs=1e-12)
    assert s["tuned_median"] == sorted(tuned)[13]
    assert s["base_median"] == sorted(base)[13]
    assert s["win_rate"] == slow_win_rate(tuned, base)
    assert s["mean_diff"] == pytest.approx(sum(t - b for t, b in zip(tuned, base)) / 27,
                                           abs=1e-12)
    assert tuple(s["win_rate_ci"]) == slow_bootstrap(stats.win_rate, tuned, base, n_boot=250,
                                                     level=0.9, seed=3, groups=groups)
    assert tuple(s["mean_diff_ci"]) == slow_bootstrap(stats.mean_diff, tuned, base, n_boot=250,
                                                      level=0.9, seed=3, groups=groups)


def test_share_with_ci():
    rng = np.random.default_rng(11)
    groups = np.repeat(np.arange(30), 2)
    flags = rng.random(60) < 0.2
    s = stats.share_with_ci(flags, groups, n_boot=300)
    assert s["count"] == int(sum(flags)) and s["n"] == 60
    assert s["rate"] == pytest.approx(s["count"] / 60, abs=1e-15)
    want = slow_bootstrap(lambda v: np.mean(v), flags.astype(float), n_boot=300, level=0.95,
                          seed=0, groups=groups)
    assert s["ci"][0] == pytest.approx(want[0], abs=1e-15)
    assert s["ci"][1] == pytest.approx(want[1], abs=1e-15)
    assert s["ci"][0] <= s["rate"] <= s["ci"][1]
    with pytest.raises(ValueError, match="must be bool"):
        stats.share_with_ci(np.zeros(3), None)


def test_group_ids():
    np.testing.assert_array_equal(stats.group_ids(["b", "a", "b", "c", "a"]), [0, 1, 0, 2, 1])


def _check_paired_shares(out, flags, sel, half):
    """`out` against a direct count of the flags of the selected base / tuned images."""
    base, tuned = flags[:half][sel], flags[half:][sel]
    assert out["base"]["n"] == sel.sum() and out["base"]["count"] == base.sum()
    assert out["base"]["rate"] == pytest.approx(base.mean())
    assert out["tuned"]["rate"] == pytest.approx(tuned.mean())
    assert out["mean_diff"] == pytest.approx(tuned.mean() - base.mean())
    lo, hi = out["mean_diff_ci"]
    assert lo <= out["mean_diff"] <= hi and hi - lo > 0


def test_following_shares_and_difference_match_a_direct_count():
    from fifa_jax.evaluation.stage import _following
    rng = np.random.default_rng(3)
    half = 60                                   # 30 prompts x 2 seeds, base then tuned
    groups = np.repeat(np.arange(30), 2)
    asked_prompt = rng.random(30) < 0.5
    asked = np.tile(np.repeat(asked_prompt, 2), 2)
    ok = rng.random(2 * half) < 0.4
    never = np.zeros(2 * half, bool)
    out = _following({"colour": (asked, ok), "count": (never, ok)}, groups, half,
                     dict(n_boot=300, seed=0))
    assert set(out) == {"colour"}               # an attribute no prompt asks is left out
    _check_paired_shares(out["colour"], ok, asked[:half], half)


def test_harm_rates_and_difference_match_a_direct_count():
    """The demo's harm entries: base and tuned shares of the selected images that show the
    mark, and the paired difference tuned - base with an interval around it."""
    from fifa_jax.evaluation.stage import _paired_shares
    rng = np.random.default_rng(4)
    half = 80                                   # 40 prompts x 2 seeds, base then tuned
    groups = np.repeat(np.arange(40), 2)
    flags = rng.random(2 * half) < np.r_[np.full(half, 0.3), np.full(half, 0.1)]
    sel = np.repeat(rng.random(40) < 0.5, 2)
    kw = dict(n_boot=300, seed=0)
    _check_paired_shares(_paired_shares(flags, groups, half, sel, kw), flags, sel, half)
    every = np.ones(half, bool)
    _check_paired_shares(_paired_shares(flags, groups, half, every, kw), flags, every, half)
