"""train.loss (ipo, hinge, and sft: the winners' error alone) and SmPO margin weighting against numpy transcriptions of the
diffusers research script's and SmPO's formulas; the step with each of them compiles in both
layer forms, and SmPO with every p = 1 (gain 1) is the plain DPO step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fifa_jax.config_check import ConfigError
from fifa_jax.training import pref_loss
from fifa_jax.training.dpo import dpo_loss
from fifa_jax.training.trainer import Trainer
from fifa_jax.training.optimizer import learning_rate_schedule
from fifa_jax.training.train_step import StepConfig
from tests.training import _tiny


def _logits(pol, ref, tgt):
    """diffusers' script: logits = ref_diff - model_diff from per-sample MSEs, winners first."""
    se = lambda p: ((p - tgt) ** 2).reshape(p.shape[0], -1).mean(1)  # noqa: E731
    mw, ml = np.split(se(pol.astype(np.float64)), 2)
    rw, rl = np.split(se(ref.astype(np.float64)), 2)
    return (rw - rl) - (mw - ml)


def _slow(kind, logits, beta_dpo, s):
    """One pair at a time, as the script writes each branch (s: the per-pair beta scale)."""
    out = []
    for x, si in zip(logits, s):
        b = beta_dpo * si
        if kind == "dpo":
            out.append(np.logaddexp(0.0, -b * x))
        elif kind == "hinge":
            out.append(max(0.0, 1.0 - b * x))
        else:
            out.append((x - 1.0 / (2.0 * beta_dpo)) ** 2)
    return float(np.mean(out))


@pytest.mark.parametrize("kind", ["dpo", "ipo", "hinge"])
@pytest.mark.parametrize("seed", [0, 1])
def test_losses_match_the_script(kind, seed):
    rng = np.random.default_rng(seed)
    pol, ref, tgt = (rng.standard_normal((10, 4, 3, 3)).astype(np.float32) for _ in range(3))
    beta = 40.0 if seed == 0 else 5000.0      # official beta; the script's beta_dpo = beta / 2
    loss, aux = dpo_loss(pol, ref, tgt, beta, loss=kind)
    logits = _logits(pol, ref, tgt)
    want = _slow(kind, logits, beta / 2, np.ones(5))
    np.testing.assert_allclose(float(loss), want, rtol=2e-4, atol=1e-6)
    # the accuracy is the sign of the same logits whatever the loss
    np.testing.assert_allclose(float(aux["implicit_acc_strict"]), np.mean(logits > 0))


@pytest.mark.parametrize("interleaved", [False, True])
def test_sft_is_the_winners_squared_error_alone(interleaved):
    rng = np.random.default_rng(9)
    pol, ref, tgt = (rng.standard_normal((8, 2, 3, 3)).astype(np.float32) for _ in range(3))
    s = rng.uniform(0.2, 3.0, 4).astype(np.float32)
    winners = np.arange(0, 8, 2) if interleaved else np.arange(4)
    se_w = ((pol[winners].astype(np.float64) - tgt[winners]) ** 2).reshape(4, -1).mean(1)
    for scale, want in ((None, se_w.mean()), (s, (s * se_w).mean())):
        loss, _ = dpo_loss(pol, ref, tgt, 5000.0, interleaved=interleaved, loss="sft",
                           beta_scale=None if scale is None else jnp.asarray(scale))
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    # neither the losers, the reference nor beta enter the loss
    grad = jax.grad(lambda p: dpo_loss(p, ref, tgt, 7.0, interleaved=interleaved,
                                       loss="sft")[0])(jnp.asarray(pol))
    losers = np.setdiff1d(np.arange(8), winners)
    assert np.all(np.asarray(grad)[losers] == 0) and np.all(np.asarray(grad)[winners] != 0)
    other, _ = dpo_loss(pol, -ref, tgt, 7.0, interleaved=interleaved, loss="sft")
    base, _ = dpo_loss(pol, ref, tgt, 5000.0, interleaved=interleaved, loss="sft")
    assert float(other) == float(base)


@pytest.mark.parametrize("kind", ["dpo", "hinge"])
def test_sft_weight_adds_the_winners_weighted_error(kind):
    """train.sft_weight: each pair's loss + lambda * u * se_w (u the pair's timestep weight),
    against a transcription; lambda 0 is the plain loss bit for bit; the held-out metrics'
    `inside` and accuracy do not change."""
    rng = np.random.default_rng(11)
    pol, ref, tgt = (rng.standard_normal((8, 2, 3, 3)).astype(np.float32) for _ in range(3))
    u = rng.uniform(0.5, 4.0, 4).astype(np.float32)
    se_w = ((pol[:4].astype(np.float64) - tgt[:4]) ** 2).reshape(4, -1).mean(1)
    logits = _logits(pol, ref, tgt)
    lam = 3.0
    want = np.mean([_slow(kind, [x], 20.0 * si, [1.0]) + lam * si * w
                    for x, si, w in zip(logits, u, se_w)])
    got, aux = dpo_loss(pol, ref, tgt, 40.0, loss=kind, beta_scale=jnp.asarray(u),
                        sft_weight=lam, sft_scale=jnp.asarray(u))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    plain, aux0 = dpo_loss(pol, ref, tgt, 40.0, loss=kind, beta_scale=jnp.asarray(u))
    zero, _ = dpo_loss(pol, ref, tgt, 40.0, loss=kind, beta_scale=jnp.asarray(u),
                       sft_weight=0.0, sft_scale=jnp.asarray(u))
    assert float(zero) == float(plain)
    np.testing.assert_array_equal(np.asarray(aux["inside"]), np.asarray(aux0["inside"]))
    # the anchor pulls the winners only: on the losers the gradient is the plain loss's
    g = jax.grad(lambda p: dpo_loss(p, ref, tgt, 40.0, loss=kind, sft_weight=lam)[0])
    g0 = jax.grad(lambda p: dpo_loss(p, ref, tgt, 40.0, loss=kind)[0])
    np.testing.assert_allclose(np.asarray(g(jnp.asarray(pol)))[4:],
                               np.asarray(g0(jnp.asarray(pol)))[4:], rtol=1e-6)
    with pytest.raises(ValueError, match="sft_weight"):
        dpo_loss(pol, ref, tgt, 40.0, loss="sft", sft_weight=1.0)


def test_dpo_default_is_bit_identical_and_hinge_is_zero_past_the_margin():
    rng = np.random.default_rng(3)
    pol, ref, tgt = (rng.standard_normal((6, 2, 2, 2)).astype(np.float32) for _ in range(3))
    a, _ = dpo_loss(pol, ref, tgt, 50.0)
    b, aux = dpo_loss(pol, ref, tgt, 50.0, loss="dpo", beta_scale=jnp.ones(3))
    assert float(a) == float(b)
    np.testing.assert_allclose(float(a), float(np.mean(np.logaddexp(0, -aux["inside"]))),
                               rtol=1e-6)
    big = np.asarray(pref_loss.pair_losses(jnp.array([1.0, -1.0]), 10.0, "hinge"))
    np.testing.assert_array_equal(big, [0.0, 6.0])        # relu(1 - 5 * logits)


@pytest.mark.parametrize("kind", ["dpo", "hinge"])
def test_smpo_weighting_matches_the_transcription(kind):
    """SmPO (JaydenLyh/SmPO train.py): raw PickScore cosines c, min-max normalised with its
    constants, p = exp(c'_w) / (exp(c'_w) + exp(c'_l)), beta * (2p - 1) * 10 per pair; our
    p comes from the score stage's margin 100 * (c_w - c_l)."""
    rng = np.random.default_rng(4)
    b = 6
    pol, ref, tgt = (rng.standard_normal((2 * b, 3, 2, 2)).astype(np.float32)
                     for _ in range(3))
    cos = rng.uniform(0.12, 0.28, (b, 2))
    lo, hi = 0.11543526500463486, 0.28201571106910706
    norm = (cos - lo) / (hi - lo)
    p_smpo = np.exp(norm[:, 0]) / (np.exp(norm[:, 0]) + np.exp(norm[:, 1]))
    margin = 100.0 * (cos[:, 0] - cos[:, 1])                  # exp(logit_scale) * cos, w - l
    p = np.asarray(pref_loss.proxy_probability(margin))
    np.testing.assert_allclose(p, p_smpo, rtol=1e-5)
    scale = pref_loss.smpo_scale(jnp.asarray(p))
    np.testing.assert_allclose(np.asarray(scale), 10 * (2 * p_smpo - 1), rtol=1e-4, atol=1e-6)
    beta = 300.0
    loss, _ = dpo_loss(pol, ref, tgt, beta, loss=kind, beta_scale=scale)
    want = _slow(kind, _logits(pol, ref, tgt), beta / 2, 10 * (2 * p_smpo - 1))
    np.testing.assert_allclose(float(loss), want, rtol=2e-4, atol=1e-6)


def test_smpo_with_probability_one_is_plain_dpo():
    rng = np.random.default_rng(5)
    pol, ref, tgt = (rng.standard_normal((8, 4, 3, 3)).astype(np.float32) for _ in range(3))
    plain, _ = dpo_loss(pol, ref, tgt, 700.0)
    smpo, _ = dpo_loss(pol, ref, tgt, 700.0,
                       beta_scale=pref_loss.smpo_scale(jnp.ones(4), gain=1.0))
    assert float(plain) == float(smpo)


def test_bad_keys_name_the_key():
    import ml_collections
    tc = ml_collections.ConfigDict({"loss": "cpo", "margin_weighting": "none",
                                    "smpo_temperature": 1.0})
    with pytest.raises(ConfigError, match="train.loss"):
        pref_loss.check_config(tc)
    tc.loss, tc.margin_weighting = "ipo", "smpo"
    with pytest.raises(ConfigError, match="train.margin_weighting"):
        pref_loss.check_config(tc)
    tc.loss = "sft"
    with pytest.raises(ConfigError, match="train.margin_weighting"):
        pref_loss.check_config(tc)
    tc.loss, tc.smpo_temperature = "dpo", 0.0
    with pytest.raises(ConfigError, match="train.smpo_temperature"):
        pref_loss.check_config(tc)
    tc.smpo_temperature, tc.margin_weighting, tc.sft_weight = 1.0, "none", -1.0
    with pytest.raises(ConfigError, match="train.sft_weight"):
        pref_loss.check_config(tc)
    tc.loss, tc.sft_weight = "sft", 2.0
    with pytest.raises(ConfigError, match="train.sft_weight"):
        pref_loss.check_config(tc)


def _trainer(step_cfg):
    cfg = _tiny.mesh_lib.default_config()
    mesh = _tiny.mesh_lib.make_mesh(cfg, devices=jax.devices()[:1])
    return Trainer(_tiny.unet(0, _tiny.TINY16, "auto"), _tiny.SCHED, step_cfg, optax.sgd(1.0),
                   mesh, seed=0, lr_fn=learning_rate_schedule(1.0, 0), consts=_tiny.CONSTS,
                   min_size=64)


# Each loss in one form by default (DPO in both: the anchor test below), the other form
# `slow`: every compile here is 40-75 s on 2 cores, in the default suite's largest file.
_DEFAULT_FORM = {"dpo": "auto", "ipo": "accelerator", "hinge": "auto", "sft": "accelerator"}
_LOSS_FORMS = [pytest.param(k, f, marks=() if _DEFAULT_FORM[k] == f else pytest.mark.slow)
               for k in _DEFAULT_FORM for f in ("auto", "accelerator")]


@pytest.mark.parametrize("kind,form", _LOSS_FORMS)
def test_step_compiles_with_each_loss(kind, form):
    """Each loss's step runs in both platform forms, one by default and the other in the slow
    suite (with SmPO weighting where allowed)."""
    from fifa_jax.models import platform
    base = StepConfig(beta=50.0, caption_dropout=0.0, scaling_factor=0.5)
    cfg = dataclasses.replace(base, loss=kind,
                              margin_weighting="none" if kind in ("ipo", "sft") else "smpo")
    flat = {k: v for k, v in _tiny.pairs(4, seed=6).items() if "flip" not in k}
    flat["proxy_prob"] = np.linspace(0.2, 0.9, 4).astype(np.float32)
    with platform.forms(form):
        m = _trainer(cfg).step(_tiny.as_steps(flat, 2))
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0


def test_step_with_the_winners_anchor_runs_in_both_forms(forms):
    """train.sft_weight in the step (both platform forms): the training loss rises by the
    anchor, the held-out metrics equal the plain step's."""
    base = StepConfig(beta=50.0, caption_dropout=0.0, scaling_factor=0.5,
                      timestep_weighting="inverse_snr")
    anchored = dataclasses.replace(base, sft_weight=5.0)
    flat = {k: v for k, v in _tiny.pairs(4, seed=8).items() if "flip" not in k}
    plain_tr, anch_tr = _trainer(base), _trainer(anchored)
    evals = [_tiny.as_steps(flat, 1)]
    e0, e1 = plain_tr.evaluate(evals, key_seed=9), anch_tr.evaluate(evals, key_seed=9)
    assert float(e0["loss"]) == float(e1["loss"])
    m0, m1 = plain_tr.step(_tiny.as_steps(flat, 1)), anch_tr.step(_tiny.as_steps(flat, 1))
    assert float(m1["loss"]) > float(m0["loss"]) and float(m1["grad_norm"]) > 0


def test_step_smpo_with_probability_one_equals_plain_dpo():
    base = StepConfig(beta=50.0, caption_dropout=0.0, scaling_factor=0.5)
    smpo = dataclasses.replace(base, margin_weighting="smpo", smpo_gain=1.0)
    flat = {k: v for k, v in _tiny.pairs(4, seed=7).items() if "flip" not in k}
    m_plain = _trainer(base).step(_tiny.as_steps(flat, 1))
    flat["proxy_prob"] = np.ones(4, np.float32)
    m_smpo = _trainer(smpo).step(_tiny.as_steps(flat, 1))
    for key in ("loss", "grad_norm", "implicit_acc"):
        assert float(m_plain[key]) == float(m_smpo[key]), key


def test_caption_dropout_is_checked_without_a_lora_section():
    """A config without `train.lora` (older files) still gets the caption_dropout check."""
    from fifa_jax.errors import ConfigError
    from fifa_jax.training import train
    tc = train.default_config()
    del tc["lora"]
    tc.caption_dropout = 1.5
    with pytest.raises(ConfigError, match="train.caption_dropout"):
        train.check_config(tc)
