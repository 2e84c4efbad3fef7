"""The public `denoise` / `make_denoise`: eager == jit == run_plan, weights as arguments, a batch
sharded over 8 forced CPU devices gives the unsharded result, and the input errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fifa_jax.errors import InputError
from fifa_jax.sampling import denoise, make_denoise, plan_for, run_plan
from tests.sampling.reference import SD15, jax_model, make_inputs

KEY = jax.random.key(3)
CFG = dict(SD15, timestep_spacing="trailing")


def test_eager_jit_and_run_plan_agree():
    noise, cond, uncond = make_inputs(pytree=True)
    kw = dict(scheduler_config=CFG, sampler="euler_a", num_steps=6, guidance_scale=5.0)
    eager = denoise(jax_model, noise, cond, uncond, key=KEY, **kw)
    jitted = jax.jit(functools.partial(denoise, jax_model, **kw))(noise, cond, uncond, key=KEY)
    direct = run_plan(jax_model, plan_for(CFG, "euler_a", 6), noise, cond, uncond,
                      guidance_scale=5.0, key=KEY)
    assert eager.shape == noise.shape and eager.dtype == jnp.float32
    np.testing.assert_allclose(eager, jitted, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(eager, direct)
    other = denoise(jax_model, noise, cond, uncond, key=jax.random.key(4), **kw)
    assert np.abs(np.asarray(other) - np.asarray(eager)).max() > 1e-2   # the key matters


def test_make_denoise_takes_weights_as_argument():
    noise, cond, uncond = make_inputs()

    def model_fn(scale, x, t, ctx):
        return scale * jax_model(x, t, ctx)
    f = make_denoise(model_fn, scheduler_config=CFG, sampler="dpmpp_2m", num_steps=5,
                     guidance_scale=4.0)
    for s in (1.0, 0.5):
        ref = denoise(lambda x, t, c: s * jax_model(x, t, c), noise, cond, uncond,
                      scheduler_config=CFG, sampler="dpmpp_2m", num_steps=5, guidance_scale=4.0)
        np.testing.assert_allclose(f(jnp.float32(s), noise, cond, uncond), ref, atol=1e-5)


def test_no_guidance_calls_model_once_per_step_with_cond_only():
    noise, cond, _ = make_inputs()
    seen = []

    def model_fn(x, t, ctx):
        seen.append((x.shape, t.shape, ctx.shape))
        return jax_model(x, t, ctx)
    denoise(model_fn, noise, cond, None, scheduler_config=CFG, sampler="ddim", num_steps=3,
            guidance_scale=1.0)
    assert seen == [(noise.shape, (noise.shape[0],), cond.shape)]   # traced once by scan


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
def test_sharded_batch_equals_unsharded(sampler):
    assert jax.device_count() == 8
    noise, cond, uncond = make_inputs(pytree=True, batch=8)
    f = jax.jit(functools.partial(denoise, jax_model, scheduler_config=CFG, sampler=sampler,
                                  num_steps=4, guidance_scale=6.0, guidance_rescale=0.5))
    ref = np.asarray(f(noise, cond, uncond, key=KEY))
    batch = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    put = functools.partial(jax.device_put, device=batch)
    out = f(put(noise), jax.tree.map(put, cond), jax.tree.map(put, uncond), key=KEY)
    assert out.sharding.is_equivalent_to(batch, out.ndim)
    # Not bit-equal: XLA's per-shard kernels round differently (~2e-7 on the model output),
    # and guidance x 6 and x̂₀ = (x − s·ε)/α with 1/α ≈ 15 amplify that to ~3e-5.
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-4)


def test_input_errors():
    noise, cond, uncond = make_inputs()
    with pytest.raises(InputError, match="needs a PRNG `key`"):
        denoise(jax_model, noise, cond, uncond, scheduler_config=CFG, sampler="euler_a",
                num_steps=2, guidance_scale=5.0)
    with pytest.raises(InputError, match="eta > 0 needs a PRNG"):
        denoise(jax_model, noise, cond, uncond, scheduler_config=CFG, sampler="ddim",
                num_steps=2, guidance_scale=5.0, eta=1.0)
    with pytest.raises(InputError, match="needs `uncond`"):
        denoise(jax_model, noise, cond, None, scheduler_config=CFG, sampler="ddim",
                num_steps=2, guidance_scale=5.0)
