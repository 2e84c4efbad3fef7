"""dpo_loss against a numpy transcription of the official formula; both beta conventions;
ties in the implicit accuracy; the DDPM forward process against diffusers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fifa_jax.training import noise_schedule as ns
from fifa_jax.training.dpo import dpo_loss


def _official(pol, ref, tgt, beta):
    """Salesforce train.py, transcribed: model/ref losses per sample, split winners/losers."""
    model_losses = ((pol - tgt) ** 2).mean(axis=(1, 2, 3))
    w, l = np.split(model_losses, 2)
    model_diff = w - l
    ref_losses = ((ref - tgt) ** 2).mean(axis=(1, 2, 3))
    rw, rl = np.split(ref_losses, 2)
    ref_diff = rw - rl
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = np.mean(np.logaddexp(0.0, -inside))     # -log sigmoid(inside)
    return loss, inside, (inside > 0).mean()


def _diffusers(pol, ref, tgt, beta_dpo):
    """diffusers' research script: -logsigmoid(beta_dpo * (ref_diff - model_diff)).mean()."""
    se = lambda p: ((p - tgt) ** 2).reshape(p.shape[0], -1).mean(1)  # noqa: E731
    mw, ml = np.split(se(pol), 2)
    rw, rl = np.split(se(ref), 2)
    logits = (rw - rl) - (mw - ml)
    return np.mean(np.logaddexp(0.0, -beta_dpo * logits))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_official_formula(seed):
    rng = np.random.default_rng(seed)
    pol, ref, tgt = (rng.standard_normal((8, 4, 5, 3)).astype(np.float32) for _ in range(3))
    beta = 5000.0 if seed else 2.0
    loss, aux = jax.jit(dpo_loss, static_argnums=3)(pol, ref, tgt, beta)
    want, inside, acc = _official(pol.astype(np.float64), ref, tgt, beta)
    np.testing.assert_allclose(np.asarray(aux["inside"]), inside, rtol=2e-4, atol=1e-3)
    np.testing.assert_allclose(float(loss), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(aux["implicit_acc_strict"]), acc)
    # diffusers' beta_dpo = beta / 2 is the same loss
    np.testing.assert_allclose(float(loss), _diffusers(pol.astype(np.float64), ref, tgt,
                                                       beta / 2), rtol=1e-4, atol=1e-5)
    se = lambda p: ((p - tgt) ** 2).mean(axis=(1, 2, 3))  # noqa: E731
    np.testing.assert_allclose(float(aux["se_pol_w"]), se(pol)[:4].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["se_ref_l"]), se(ref)[4:].mean(), rtol=1e-5)


def test_interleaved_rows_equal_winners_first():
    """The train step's layout (pair j at rows 2j, 2j + 1) gives the official loss of the
    same pairs written winners first."""
    rng = np.random.default_rng(3)
    pol, ref, tgt = (rng.standard_normal((8, 4, 5, 3)).astype(np.float32) for _ in range(3))
    weights = np.array([1, 1, 0, 1], np.float32)

    def interleave(a):     # winners first (w0..w3, l0..l3) -> w0, l0, w1, l1, ...
        return np.stack(np.split(a, 2), axis=1).reshape(a.shape)

    loss, aux = dpo_loss(*(interleave(a) for a in (pol, ref, tgt)), 50.0, weights=weights,
                         interleaved=True)
    want, inside, _ = _official(pol.astype(np.float64), ref, tgt, 50.0)
    np.testing.assert_allclose(np.asarray(aux["inside"]), inside, rtol=2e-4, atol=1e-3)
    per_pair = np.logaddexp(0.0, -inside)
    np.testing.assert_allclose(float(loss), (per_pair * weights).sum() / weights.sum(),
                               rtol=1e-4)
    assert abs(float(loss) - want) > 1e-3        # the weights matter here
    # the same arrays read winners first are other pairs: a different loss
    other, _ = dpo_loss(*(interleave(a) for a in (pol, ref, tgt)), 50.0, weights=weights)
    assert abs(float(other) - float(loss)) > 1e-3


def test_mean_of_losses_not_loss_of_mean():
    """Bug B1: -logsigmoid(mean(inside)) is not the loss."""
    rng = np.random.default_rng(3)
    pol, ref, tgt = (rng.standard_normal((6, 2, 2, 2)).astype(np.float32) for _ in range(3))
    loss, aux = dpo_loss(pol, ref, tgt, 50.0)
    wrong = np.logaddexp(0.0, -np.asarray(aux["inside"]).mean())
    assert abs(float(loss) - wrong) > 1e-3
    np.testing.assert_allclose(float(loss), np.mean(np.logaddexp(0, -np.asarray(aux["inside"]))),
                               rtol=1e-6)


def test_ties_count_half():
    rng = np.random.default_rng(4)
    pol, tgt = (rng.standard_normal((4, 2, 2, 2)).astype(np.float32) for _ in range(2))
    loss, aux = dpo_loss(pol, pol, tgt, 5000.0)       # policy == reference: every pair ties
    assert float(aux["implicit_acc"]) == 0.5 and float(aux["implicit_acc_strict"]) == 0.0
    np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-6)


def test_reference_gets_no_gradient_and_weights():
    rng = np.random.default_rng(5)
    pol, ref, tgt = (jnp.asarray(rng.standard_normal((4, 2, 2, 2)), jnp.float32)
                     for _ in range(3))
    g = jax.grad(lambda r: dpo_loss(pol, r, tgt, 10.0)[0])(ref)
    assert float(jnp.abs(g).max()) == 0.0
    w = jnp.array([1.0, 0.0])
    full, _ = dpo_loss(pol, ref, tgt, 10.0)
    one, _ = dpo_loss(pol[jnp.array([0, 2])], ref[jnp.array([0, 2])], tgt[jnp.array([0, 2])], 10.0)
    weighted, _ = dpo_loss(pol, ref, tgt, 10.0, weights=w)
    np.testing.assert_allclose(float(weighted), float(one), rtol=1e-6)
    assert abs(float(full) - float(one)) > 1e-6
    with pytest.raises(ValueError, match="winners first"):
        dpo_loss(pol[:3], ref[:3], tgt[:3], 1.0)


SD15 = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1,
        "set_alpha_to_one": False, "skip_prk_steps": True}


@pytest.mark.parametrize("cfg", [SD15, {"beta_schedule": "linear"},
                                 {"beta_schedule": "squaredcos_cap_v2",
                                  "prediction_type": "v_prediction"}])
def test_forward_process_matches_diffusers(cfg):
    torch = pytest.importorskip("torch")
    from diffusers import DDPMScheduler
    ref = DDPMScheduler.from_config(cfg)
    sched = ns.from_scheduler_config(cfg)
    # float32 tables: numpy and torch round linspace and cumprod differently (ulps)
    np.testing.assert_allclose(sched.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=5e-6)
    rng = np.random.default_rng(0)
    x0, noise = (rng.standard_normal((5, 4, 3, 3)).astype(np.float32) for _ in range(2))
    t = np.array([0, 1, 500, 998, 999])
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    got = ns.add_noise(sched, x0, noise, t)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-6)
    tgt = ns.target(sched, x0, noise, t)
    if sched.prediction_type == "epsilon":
        np.testing.assert_array_equal(np.asarray(tgt), noise)
    else:
        v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
        np.testing.assert_allclose(np.asarray(tgt), v.numpy(), atol=3e-6)  # |v| ~ 4: ulps


def test_unsupported_schedule_keys_are_named():
    from fifa_jax.errors import InputError
    with pytest.raises(InputError, match="rescale_betas_zero_snr"):
        ns.from_scheduler_config({"rescale_betas_zero_snr": True})
    with pytest.raises(InputError, match="prediction_type 'sample'"):
        ns.from_scheduler_config({"prediction_type": "sample"})
