"""Shared pieces of the sampler tests: configs, a smooth stand-in "UNet" written twice (JAX and
torch, the same function), and diffusers' guided loop exactly as StableDiffusionPipeline runs it.

Stand-in model: pred = x + ½·tanh(A·x (channel mix) + b·t/1000 + W·mean_L(context)
[+ V·text_embeds]); the x term makes it a crude ε-predictor so the latents stay O(1).
"""
from __future__ import annotations

import diffusers
import jax.numpy as jnp
import numpy as np
import torch
from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a_module

from fifa_jax.sampling import DIFFUSERS_CLASS, step_noise

# SD1.5's scheduler_config.json (a PNDMScheduler config; from_config keeps target defaults).
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None}

B, C, H, W, L, D, P = 2, 4, 8, 8, 3, 5, 6
_rng = np.random.default_rng(1234)
A = (_rng.standard_normal((C, C)) * 0.4).astype(np.float32)
BT = _rng.standard_normal(C).astype(np.float32)
WC = (_rng.standard_normal((D, C)) * 0.5).astype(np.float32)
VT = (_rng.standard_normal((P, C)) * 0.5).astype(np.float32)


def make_inputs(seed: int = 0, pytree: bool = False, batch: int = B):
    """(noise (B,C,H,W), cond, uncond) as NumPy; pytree=True gives SDXL-like dicts."""
    rng = np.random.default_rng(seed)
    B = batch  # noqa: N806
    noise = rng.standard_normal((B, C, H, W)).astype(np.float32)
    cond = rng.standard_normal((B, L, D)).astype(np.float32)
    uncond = rng.standard_normal((B, L, D)).astype(np.float32) * 0.3
    if pytree:
        cond = {"encoder_hidden_states": cond, "text_embeds": rng.standard_normal((B, P)).astype(
            np.float32), "time_ids": rng.uniform(0, 1024, (B, 6)).astype(np.float32)}
        uncond = {"encoder_hidden_states": uncond, "text_embeds": np.zeros((B, P), np.float32),
                  "time_ids": cond["time_ids"]}
    return noise, cond, uncond


def jax_model(x, t, ctx):
    if isinstance(ctx, dict):
        extra = ctx["text_embeds"] @ VT
        ctx = ctx["encoder_hidden_states"]
    else:
        extra = 0.0
    h = (jnp.einsum("ck,bkhw->bchw", A, x)
         + BT[None, :, None, None] * (t / 1000.0)[:, None, None, None]
         + (jnp.mean(ctx, axis=1) @ WC + extra)[:, :, None, None])
    return x + 0.5 * jnp.tanh(h)


def torch_model(x, t, ctx):
    t = t.float().reshape(-1).expand(x.shape[0])
    if isinstance(ctx, dict):
        extra = ctx["text_embeds"] @ torch.from_numpy(VT)
        ctx = ctx["encoder_hidden_states"]
    else:
        extra = 0.0
    h = (torch.einsum("ck,bkhw->bchw", torch.from_numpy(A), x)
         + torch.from_numpy(BT)[None, :, None, None] * (t / 1000.0)[:, None, None, None]
         + (ctx.mean(dim=1) @ torch.from_numpy(WC) + extra)[:, :, None, None])
    return x + 0.5 * torch.tanh(h)


def _to_torch(tree):
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: torch.from_numpy(np.asarray(v)) for k, v in tree.items()}
    return torch.from_numpy(np.asarray(tree))


def _cat(u, c):
    if isinstance(c, dict):
        return {k: torch.cat([u[k], c[k]]) for k in c}
    return torch.cat([u, c])


def rescale_noise_cfg_torch(noise_cfg, noise_pred_text, guidance_rescale):
    """diffusers' rescale_noise_cfg (torch std: unbiased)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    return rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale=guidance_rescale)


def diffusers_loop(sampler, cfg, num_steps, noise, cond, uncond, *, guidance_scale,
                   guidance_rescale=0.0, eta=0.0, key=None, model=torch_model, monkeypatch=None):
    """StableDiffusionPipeline.__call__'s loop with diffusers' scheduler; returns
    (final latents (B,C,H,W) NumPy, scheduler timesteps NumPy float32)."""
    sched = getattr(diffusers, DIFFUSERS_CLASS[sampler]).from_config(cfg)
    sched.set_timesteps(num_steps)
    latents = torch.from_numpy(noise) * sched.init_noise_sigma
    cond_t, uncond_t = _to_torch(cond), _to_torch(uncond)
    do_cfg = guidance_scale > 1
    ctx = _cat(uncond_t, cond_t) if do_cfg else cond_t
    if sampler == "euler_a":      # inject our per-step noise into diffusers' randn_tensor
        calls = iter(range(10 ** 6))
        monkeypatch.setattr(euler_a_module, "randn_tensor", lambda shape, **kw: torch.from_numpy(
            np.asarray(step_noise(key, next(calls), tuple(shape)))))
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            inp = torch.cat([latents] * 2) if do_cfg else latents
            inp = sched.scale_model_input(inp, t)
            pred = model(inp, t, ctx)
            if do_cfg:
                pred_u, pred_c = pred.chunk(2)
                pred = pred_u + guidance_scale * (pred_c - pred_u)
                if guidance_rescale > 0:
                    pred = rescale_noise_cfg_torch(pred, pred_c, guidance_rescale)
            kw = {}
            if sampler == "ddim":
                kw["eta"] = eta
                if eta > 0:
                    kw["variance_noise"] = torch.from_numpy(
                        np.asarray(step_noise(key, i, tuple(latents.shape))))
            latents = sched.step(pred, t, latents, **kw, return_dict=False)[0]
    return latents.numpy(), sched.timesteps.numpy().astype(np.float32)
