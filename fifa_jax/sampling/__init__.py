"""Samplers with classifier-free guidance matching diffusers 0.42.1 (DDIM, Euler, Euler
ancestral, DPM-Solver++ 2M), configured from a diffusers `scheduler_config.json` dict.

    latents = denoise(model_fn, noise, cond, uncond, scheduler_config=cfg, sampler="dpmpp_2m",
                      num_steps=25, guidance_scale=7.5)

See denoise.py for the loop and the jit recipe, samplers.py for the step formulas, config.py
for how a config is read, schedules.py for the timestep / sigma grids.
"""
from fifa_jax.sampling.config import DIFFUSERS_CLASS, SAMPLERS, resolve
from fifa_jax.sampling.denoise import (denoise, init_noise_sigma, make_denoise, plan_for,
                                       rescale_noise_cfg, run_plan, step_noise, timesteps)
from fifa_jax.sampling.samplers import Plan

__all__ = ["DIFFUSERS_CLASS", "SAMPLERS", "Plan", "denoise", "init_noise_sigma", "make_denoise",
           "plan_for", "rescale_noise_cfg", "resolve", "run_plan", "step_noise", "timesteps"]
