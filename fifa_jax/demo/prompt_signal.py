"""How much of the base's training signal the prompt carries: the #24 diagnosis of why the demo
base (and DPO on it) hardly follows colour.

    explained_share(z, groups, fit) -> held-out R^2 of the group means
    world_share(vae, n, seed) -> {colour_position, colour}: the share of the latents' variance
        that the asked colour (x position) explains, the most any model can explain from them
    model_share(base, vae, ts, n, seed) -> {t: the share the base UNet's x0 prediction at
        step t gains from the prompt over the empty prompt (same x_t)}

    python -m fifa_jax.demo.prompt_signal [--base fifa_jax/demo/models/base] [--n 2000]

The pretraining loss and DPO's are squared errors on these latents: a feature that explains 1%
of their variance is 1% of what either loss sees.
"""
from __future__ import annotations

import json

import numpy as np
from absl import app, flags


def explained_share(z: np.ndarray, groups, fit: np.ndarray) -> float:
    """z (n, ...) float; groups (n,) hashable labels; fit (n,) bool: the rows whose group means
    are fitted. -> 1 - SSE(group means) / SSE(overall mean) on the other rows (a group with no
    fitted row predicts the overall mean)."""
    z = np.asarray(z, np.float64).reshape(len(z), -1)
    fit = np.asarray(fit, bool)
    labels = np.asarray(list(groups))
    if len(labels) != len(z) or len(fit) != len(z):
        raise ValueError(f"explained_share: z has {len(z)} rows, groups {len(labels)}, "
                         f"fit {len(fit)}")
    if fit.all() or not fit.any():
        raise ValueError("explained_share needs rows to fit and rows to test")
    overall = z[fit].mean(0)
    test = ~fit
    sse_all = float(((z[test] - overall) ** 2).sum())
    sse = 0.0
    for g in np.unique(labels[test]):
        rows = labels == g
        mean = z[rows & fit].mean(0) if (rows & fit).any() else overall
        sse += float(((z[rows & test] - mean) ** 2).sum())
    return 1.0 - sse / sse_all


def _latents(vae, n: int, seed: int):
    from fifa_jax.demo import train_unet, world_data
    data = world_data.draw(n, seed=seed)
    mom = train_unet.encode_moments(vae, data.images)
    return data, mom[:, 0] * float(vae.scaling_factor)


def world_share(vae, n: int = 2000, seed: int = 900) -> dict:
    """Held-out R^2 of the latents (VAE means, scaled) on the asked colour x position and on
    the asked colour alone, over `n` world images (world_data.draw; even rows fit)."""
    data, z = _latents(vae, n, seed)
    fit = np.arange(n) % 2 == 0
    cp = np.array([f"{p['colour']}|{p['position']}" for p in data.prompts])
    col = np.array([p["colour"] for p in data.prompts])
    return {"colour_position": explained_share(z, cp, fit), "colour": explained_share(z, col, fit)}


def model_share(base: str, vae, ts=(999, 800, 600), n: int = 512, seed: int = 901) -> dict:
    """{t: 1 - SSE(x0 | prompt) / SSE(x0 | empty prompt)} of the base's x0 prediction at each
    step t in `ts`, on `n` world images' latents (drawn and encoded once), both from the same
    x_t."""
    import jax
    import jax.numpy as jnp
    from fifa_jax.demo import world_data
    from fifa_jax.demo.base import SCHEDULER_CONFIG
    from fifa_jax.models.clip_io import load_text_encoder
    from fifa_jax.models.unet_io import load_unet
    from fifa_jax.training import noise_schedule as ns
    unet, text = load_unet(base + "/unet"), load_text_encoder(base + "/text_encoder")
    sched = ns.from_scheduler_config(SCHEDULER_CONFIG)
    data, z = _latents(vae, n, seed)
    ids = world_data.tokenize(data.texts)
    empty = np.repeat(world_data.tokenize([""]), len(ids), 0)
    abar = jnp.asarray(sched.alphas_cumprod)

    @jax.jit
    def x0(zb, ib, eps, t):
        tt = jnp.full((zb.shape[0],), t, jnp.int32)
        xt = ns.add_noise(sched, zb, eps, tt)
        e = unet(xt, tt, text(ib).last_hidden_state)
        return (xt - jnp.sqrt(1 - abar[t]) * e) / jnp.sqrt(abar[t])

    out = {}
    for t in ts:
        sse_p = sse_e = 0.0
        for lo in range(0, n, 64):
            zb = z[lo:lo + 64]
            eps = np.random.default_rng([seed, lo]).standard_normal(zb.shape).astype(np.float32)
            step = np.int32(t)
            sse_p += float(((np.asarray(x0(zb, ids[lo:lo + 64], eps, step)) - zb) ** 2).sum())
            sse_e += float(((np.asarray(x0(zb, empty[lo:lo + 64], eps, step)) - zb) ** 2).sum())
        out[t] = 1.0 - sse_p / sse_e
    return out


_BASE = flags.DEFINE_string("base", None, "a demo base pipeline folder (default: the shipped)")
_N = flags.DEFINE_integer("n", 2000, "world images for the world's share")


def main(argv):
    del argv
    import os
    from fifa_jax.demo import build_models
    from fifa_jax.models.vae_io import load_vae
    base = _BASE.value or os.path.join(build_models.DEFAULT_OUT, "base")
    vae = load_vae(os.path.join(base, "vae"))
    out = {"world": world_share(vae, _N.value)}
    out["model"] = {f"t{t}": v for t, v in model_share(base, vae).items()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    app.run(main)
