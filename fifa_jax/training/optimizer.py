"""The optimiser of the DPO trainer (method.md §3 step 6), built with optax.

    adamw:     AdamW(b1, b2, eps, weight_decay)             (the SD1.5 recipe: 0.9, 0.999, 1e-8,
                                                             1e-2)
    adafactor: Adafactor without relative step or parameter scaling, update clipping 1.0,
               weight decay (the SDXL recipe; HF Adafactor(relative_step=False,
               scale_parameter=False, clip_threshold=1.0))
Both behind global-norm gradient clipping (`grad_clip`, 1.0; 0 = off) and a learning rate that
rises linearly from 0 over `warmup_steps`, then stays constant: update s (s updates already
applied) uses lr * min(1, s / warmup), as PyTorch's LambdaLR with diffusers'
`constant_with_warmup` does (its first update has learning rate 0). Optimiser state is float32
like the parameters.
"""
from __future__ import annotations

import optax

OPTIMIZERS = ("adamw", "adafactor")


def learning_rate_schedule(learning_rate: float, warmup_steps: int):
    """updates applied -> lr: lr * min(1, count / warmup_steps) (constant when warmup is 0)."""
    warmup = max(int(warmup_steps), 0)
    if warmup == 0:
        return optax.constant_schedule(learning_rate)
    return optax.linear_schedule(0.0, learning_rate, warmup)


def make_optimizer(cfg) -> optax.GradientTransformation:
    """The optimiser of `cfg` (the train section): clipping, then AdamW or Adafactor."""
    lr = learning_rate_schedule(float(cfg.learning_rate), int(cfg.warmup_steps))
    name = cfg.optimizer
    if name == "adamw":
        core = optax.adamw(lr, b1=float(cfg.adam_b1), b2=float(cfg.adam_b2),
                           eps=float(cfg.adam_eps), weight_decay=float(cfg.weight_decay))
    elif name == "adafactor":
        core = optax.adafactor(lr, multiply_by_parameter_scale=False, clipping_threshold=1.0,
                               weight_decay_rate=float(cfg.weight_decay) or None,
                               momentum=None, dtype_momentum="float32")
    else:
        raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {name!r}")
    parts = [optax.clip_by_global_norm(float(cfg.grad_clip))] if cfg.grad_clip > 0 else []
    return optax.chain(*parts, core)
