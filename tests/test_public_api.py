"""The public API the README names: every `fifa_jax.x.y` it mentions resolves (a module, or a
name of one), the entry points it runs with `python -m` are importable modules, and the
functions it presents are called on tiny inputs as the README writes them."""
import importlib
import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
NAME = re.compile(r"\bfifa_jax(?:\.[A-Za-z_]\w*)+")
FROM = re.compile(r"^\s*from (fifa_jax[\w.]*) import ([\w, ]+)", re.M)
MODULE_RUN = re.compile(r"python -m (fifa_jax[\w.]*)")


def readme_names() -> list[str]:
    text = README.read_text()
    names = set(NAME.findall(text))
    for module, what in FROM.findall(text):
        names.update(f"{module}.{n.strip()}" for n in what.split(",") if n.strip())
    return sorted(n.rstrip(".") for n in names)


def resolve(dotted: str):
    """The attribute `dotted` names, imported from its module; for a module, its spec (CLI
    modules are not imported: each defines absl flags of the same names)."""
    module, _, attr = dotted.rpartition(".")
    parent = importlib.import_module(module)
    if hasattr(parent, attr):
        return getattr(parent, attr)
    spec = importlib.util.find_spec(dotted)
    assert spec is not None, f"README names {dotted}, which is neither a module nor a name"
    return spec


def test_the_readme_names_public_api():
    names = readme_names()
    assert "fifa_jax.training.dpo_loss" in names, names


@pytest.mark.parametrize("dotted", readme_names())
def test_every_readme_name_resolves(dotted):
    resolve(dotted)


@pytest.mark.parametrize("module", sorted(set(MODULE_RUN.findall(README.read_text()))))
def test_every_python_m_entry_point_is_a_module(module):
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"README runs `python -m {module}`, which is not a module"
    if spec.submodule_search_locations:       # a package: runs its __main__
        assert importlib.util.find_spec(f"{module}.__main__") is not None, module


def test_dpo_loss_as_the_readme_calls_it():
    """`from fifa_jax.training import dpo_loss; dpo_loss(policy_pred, ref_pred, target, beta)`
    on (2B, C, H, W) = (4, 1, 2, 2), against the formula written out."""
    from fifa_jax.training import dpo_loss
    assert callable(dpo_loss) and resolve("fifa_jax.training.dpo_loss") is dpo_loss
    rng = np.random.default_rng(0)
    pol, ref, target = (rng.standard_normal((4, 1, 2, 2)).astype(np.float32) for _ in range(3))
    loss, aux = dpo_loss(jnp.asarray(pol), jnp.asarray(ref), jnp.asarray(target), 5000.0)
    se = lambda p: ((p - target) ** 2).reshape(4, -1).mean(1)          # noqa: E731
    inside = -0.5 * 5000.0 * ((se(pol)[:2] - se(pol)[2:]) - (se(ref)[:2] - se(ref)[2:]))
    want = np.mean(np.logaddexp(0.0, -inside))                        # -log sigmoid
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert aux["inside"].shape == (2,)


def test_sampling_denoise_as_the_package_docstring_calls_it():
    """`fifa_jax.sampling.denoise` (README: the samplers) with a model that predicts zero noise:
    DDIM then returns the scaled start noise, (B, C, H, W) = (1, 4, 2, 2), finite."""
    from fifa_jax import sampling
    cfg = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
           "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
           "clip_sample": False}
    noise = jax.random.normal(jax.random.key(0), (1, 4, 2, 2))
    cond = jnp.zeros((1, 3, 8))
    for sampler in sampling.SAMPLERS:
        out = sampling.denoise(lambda x, t, c: jnp.zeros_like(x), noise, cond, cond,
                               scheduler_config=cfg, sampler=sampler, num_steps=3,
                               guidance_scale=7.5, key=jax.random.key(1))
        assert out.shape == noise.shape and bool(jnp.all(jnp.isfinite(out))), sampler
