"""The one training loop the demo trainers share: jitted Adam steps over numpy batches.

    params, losses = fit(params, loss_fn, batch_fn, steps=..., lr=..., seed=...)

loss_fn(params, batch, key) -> scalar; batch_fn(step) -> a pytree of numpy arrays (drawn
from a numpy RNG keyed by the step, so the run is reproducible); key = fold_in(key(seed),
step). Adam with a linear warm-up (5 % of the steps) and a cosine decay to 10 % of `lr`,
global-norm clipping at 1. On the CPU the same command gives the same bytes.
"""
from __future__ import annotations

import time

import jax
import numpy as np
import optax
from absl import logging


def optimizer(steps: int, lr: float) -> optax.GradientTransformation:
    warm = max(1, steps // 20)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(steps, warm + 1), lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))


def fit(params, loss_fn, batch_fn, *, steps: int, lr: float, seed: int, name: str,
        log_every: int = 100):
    """-> (params after `steps` updates, (steps,) float32 losses)."""
    opt = optimizer(steps, lr)

    @jax.jit
    def step(params, opt_state, batch, i):
        key = jax.random.fold_in(jax.random.key(seed), i)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = opt.init(params)
    losses = np.zeros(steps, np.float32)
    t0 = time.time()
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, batch_fn(i), np.int32(i))
        losses[i] = float(loss)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            logging.info("%s step %d/%d loss %.4f (%.0f s)", name, i + 1, steps,
                         float(losses[max(0, i + 1 - log_every):i + 1].mean()),
                         time.time() - t0)
    return params, losses
