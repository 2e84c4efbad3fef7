"""The #24 diagnostic's held-out R^2 against a per-row transcription and known mixtures."""
import numpy as np
import pytest

from fifa_jax.demo.prompt_signal import explained_share


def _slow(z, groups, fit):
    z = np.asarray(z, np.float64).reshape(len(z), -1)
    overall = np.mean([z[i] for i in range(len(z)) if fit[i]], axis=0)
    num = den = 0.0
    for i in range(len(z)):
        if fit[i]:
            continue
        same = [z[j] for j in range(len(z)) if fit[j] and groups[j] == groups[i]]
        mean = np.mean(same, axis=0) if same else overall
        num += ((z[i] - mean) ** 2).sum()
        den += ((z[i] - overall) ** 2).sum()
    return 1.0 - num / den


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_transcription(seed):
    rng = np.random.default_rng(seed)
    n = 60
    groups = [str(g) for g in rng.integers(0, 7, n)]
    z = rng.normal(size=(n, 2, 3)) + np.array([int(g) for g in groups])[:, None, None] * 0.3
    fit = rng.random(n) < 0.5
    fit[:2], fit[2:4] = True, False
    assert explained_share(z, groups, fit) == pytest.approx(_slow(z, groups, fit), abs=1e-12)


def test_recovers_a_known_share_and_zero_without_signal():
    rng = np.random.default_rng(3)
    n, k = 20000, 5
    g = rng.integers(0, k, n)
    effect = rng.normal(size=(k, 4))
    effect *= np.sqrt(0.25 / effect.var(0).mean())   # between-group variance 0.25, noise 0.75
    z = effect[g] + rng.normal(scale=np.sqrt(0.75), size=(n, 4))
    fit = np.arange(n) % 2 == 0
    assert explained_share(z, g, fit) == pytest.approx(0.25, abs=0.03)
    assert abs(explained_share(rng.normal(size=(n, 4)), g, fit)) < 0.01


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="z has 4 rows, groups 3"):
        explained_share(np.zeros((4, 2)), ["a", "b", "c"], np.array([1, 0, 1, 0], bool))
    with pytest.raises(ValueError, match="rows to fit and rows to test"):
        explained_share(np.zeros((2, 2)), ["a", "b"], np.ones(2, bool))
