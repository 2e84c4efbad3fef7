"""train.timestep_weighting: w(t) against a numpy transcription of the formulas on random
timesteps of SD's schedule; the DPO loss with the weighting equals the per-pair loss computed
by hand with beta * w(t); the config refuses unknown names and ipo."""
import numpy as np
import pytest

from fifa_jax.errors import ConfigError
from fifa_jax.training import pref_loss, train
from fifa_jax.training import timestep_weighting as tw


def _sd_alphas_cumprod():
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_weights_match_numpy(pred):
    abar = _sd_alphas_cumprod()
    t = np.random.default_rng(0).integers(0, 1000, 64)
    snr = abar[t].astype(np.float64) / (1.0 - abar[t])
    gamma = 5.0
    want_min = np.minimum(snr, gamma) / (snr + 1.0 if pred == "v_prediction" else snr)
    want_inv = np.maximum(1.0, 1.0 / snr)
    np.testing.assert_allclose(np.asarray(tw.weights("min_snr", abar, t, gamma, pred)),
                               want_min, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(tw.weights("inverse_snr", abar, t, gamma, pred)),
                               want_inv, rtol=1e-5)
    assert tw.weights("none", abar, t) is None
    assert (want_min[snr < gamma] == (1.0 if pred == "epsilon" else want_min[snr < gamma])).all()


def test_weighted_dpo_loss_equals_hand_computation():
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=16) * 1e-3).astype(np.float32)   # DPO logits are small
    w = rng.uniform(0.1, 3.0, 16).astype(np.float32)
    beta = 5000.0
    import jax.numpy as jnp
    got = np.asarray(pref_loss.pair_losses(jnp.asarray(logits), beta, "dpo", jnp.asarray(w)))
    want = np.logaddexp(0.0, -(0.5 * beta * w * logits).astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_config_checks():
    tc = train.default_config()
    assert tc.timestep_weighting == "none"       # off by default (the paper's recipes)
    pref_loss.check_config(tc)
    tc.timestep_weighting = "snr"
    with pytest.raises(ConfigError, match="train.timestep_weighting"):
        pref_loss.check_config(tc)
    tc.timestep_weighting, tc.loss = "min_snr", "ipo"
    with pytest.raises(ConfigError, match="cannot take"):
        pref_loss.check_config(tc)


def test_weighting_reaches_the_step():
    """In a train step: min_snr with a gamma above every SNR is plain DPO exactly
    (epsilon: w = 1); inverse_snr (w >= 1, > 1 at the noisy steps) makes the gradient larger."""
    import dataclasses

    from fifa_jax.training.train_step import StepConfig
    from tests.training import _tiny
    from tests.training.test_pref_loss import _trainer
    base = StepConfig(beta=50.0, caption_dropout=0.0, scaling_factor=0.5)
    flat = {k: v for k, v in _tiny.pairs(4, seed=7).items() if "flip" not in k}
    plain = _trainer(base).step(_tiny.as_steps(flat, 1))
    same = _trainer(dataclasses.replace(base, timestep_weighting="min_snr",
                                        snr_gamma=1e30)).step(_tiny.as_steps(flat, 1))
    noisy = _trainer(dataclasses.replace(base, timestep_weighting="inverse_snr")).step(
        _tiny.as_steps(flat, 1))
    for key in ("loss", "grad_norm"):
        assert float(plain[key]) == float(same[key]), key
    # the first step's loss is log 2 (policy = reference); its gradient carries w(t)
    assert float(noisy["grad_norm"]) > float(plain["grad_norm"])


def test_timestep_range_draws_within_it_and_keeps_the_full_range_draws():
    """train.min_timestep / max_timestep: training draws t ~ U{lo..hi} (uniform: every value
    seen, counts within binomial noise); the default range draws exactly the old
    U{0..T-1} values; held-out inputs (train=False) always use the whole range."""
    import dataclasses

    import jax.numpy as jnp

    from fifa_jax.training import train_step as tstep
    from tests.training import _tiny
    n = 4000
    flat = {k: np.repeat(v[:1], n, axis=0) for k, v in _tiny.pairs(1, seed=0).items()
            if "flip" not in k}
    keys = tstep.pair_keys(jnp.array([3, 4], jnp.uint32), 0, n)
    base = tstep.StepConfig(beta=1.0, caption_dropout=0.0, scaling_factor=0.5)
    T = _tiny.SCHED.num_train_timesteps

    def draws(cfg, train=True):
        _, t, _, _ = tstep.micro_batch_inputs(keys, flat, _tiny.CONSTS, _tiny.SCHED, cfg,
                                              train=train)
        return np.asarray(t[0::2]).astype(int)

    full = draws(base)
    want = np.asarray([int(jax_randint(k, T)) for k in keys[:50]])
    np.testing.assert_array_equal(full[:50], want)
    ranged = dataclasses.replace(base, min_timestep=T // 2, max_timestep=T // 2 + 9)
    t = draws(ranged)
    assert t.min() == T // 2 and t.max() == T // 2 + 9
    counts = np.bincount(t - T // 2, minlength=10)
    assert (np.abs(counts - n / 10) < 5 * np.sqrt(n / 10)).all()
    np.testing.assert_array_equal(draws(ranged, train=False), draws(base, train=False))
    only_high = draws(dataclasses.replace(base, min_timestep=T - 1))
    assert (only_high == T - 1).all()


def jax_randint(key, T):
    """The pair's timestep as drawn without a range: randint(split(key, 7)[3], 0, T)."""
    import jax
    return jax.random.randint(jax.random.split(key, 7)[3], (), 0, T)


def test_timestep_range_config_checks():
    tc = train.default_config()
    assert (tc.min_timestep, tc.max_timestep) == (0, -1)     # the whole range by default
    for lo, hi in ((-1, -1), (500, 100)):
        tc.min_timestep, tc.max_timestep = lo, hi
        with pytest.raises(ConfigError, match="train.min_timestep"):
            pref_loss.check_config(tc)
    tc.min_timestep, tc.max_timestep = 250, -1
    pref_loss.check_config(tc)
