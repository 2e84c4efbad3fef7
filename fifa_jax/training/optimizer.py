"""The optimiser of the DPO trainer (method.md §3 step 6), built with optax.

    adamw:     `adamw` below (the SD1.5 recipe: b1 0.9, b2 0.999, eps 1e-8, wd 1e-2):
               m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g^2, m_hat = m / (1 - b1^t),
               v_hat = v / (1 - b2^t), p <- p - lr (m_hat / (sqrt(v_hat) + eps) + wd p)
               (= torch.optim.AdamW; optax.adamw's chain with accurate bias corrections)
    adafactor: `adafactor` below (the SDXL recipe): HF transformers.Adafactor(lr,
               relative_step=False, scale_parameter=False, warmup_init=False,
               clip_threshold=1.0, weight_decay=wd), eps (1e-30, 1e-3), decay_rate -0.8, no
               first moment. Update k (1-based), gradient g of parameter p:
                 beta2 = 1 - k^-0.8;  G = g^2 + 1e-30
                 ndim >= 2 (factored over two axes, see `factored_axes`):
                   R <- beta2 R + (1-beta2) mean_r(G),  C <- beta2 C + (1-beta2) mean_c(G)
                   u = g * rsqrt(R / mean_c(R)) * rsqrt(C)
                 ndim < 2:  V <- beta2 V + (1-beta2) G,  u = g * rsqrt(V)
                 u <- lr * u / max(1, rms(u) / clip_threshold)
                 p <- p - lr * wd * p  (the pre-update p), then p <- p - u
               Weight decay is lr * wd per update, as in HF (optax.adafactor's
               `weight_decay_rate` decays by wd per update whatever the learning rate: 1%
               per update at wd 1e-2 even in warm-up at lr 0, which is why it is not used).
Both behind global-norm gradient clipping (`grad_clip`, 1.0; 0 = off; torch's
clip_grad_norm_ up to its 1e-6 in the divisor) and a learning rate that rises linearly from 0
over `warmup_steps`, then stays constant: update s (s updates already applied) uses
lr * min(1, s / warmup), as PyTorch's LambdaLR with diffusers' `constant_with_warmup` does
(its first update has learning rate 0). Optimiser state is float32 like the parameters.

Parity with the PyTorch references after 10 updates (the warm-up schedule set per step on
the torch side) is tested in tests/training/test_optimizer.py: Adafactor = transformers'
Adafactor with the settings above, on the torch layout of each tensor, to 1e-6 relative
(seen: 3e-7); AdamW = torch.optim.AdamW to 1e-6 relative; global-norm clipping =
clip_grad_norm_ within the same bounds.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor")


def learning_rate_schedule(learning_rate: float, warmup_steps: int):
    """updates applied -> lr: lr * min(1, count / warmup_steps) (constant when warmup is 0)."""
    warmup = max(int(warmup_steps), 0)
    if warmup == 0:
        return optax.constant_schedule(learning_rate)
    return optax.linear_schedule(0.0, learning_rate, warmup)


def factored_axes(ndim: int) -> tuple[int, int] | None:
    """(row_axis, col_axis) of a JAX-layout parameter of `ndim` dims, or None (unfactored).

    HF Adafactor factors a torch tensor over its last two axes: the row statistic averages
    the squared gradient over the last axis (-1), the column statistic over the one before
    (-2). Our layouts differ from torch's, so the axes are the ones torch's layout of the
    same parameter would factor:
      2-D Linear kernel (in, out) = torch weight (out, in) transposed: row over 0 (in),
          column over 1 (out) (the approximation is symmetric under transposition anyway);
      4-D conv kernel HWIO (kh, kw, cin, cout) = torch OIHW (cout, cin, kh, kw): row over
          1 (kw), column over 0 (kh), i.e. factored over (kh, kw) as torch is, not over
          (cin, cout) (which would differ, e.g. for every 1x1 conv);
      other ndim >= 2: the last two axes as in torch (row over -1, column over -2);
      ndim < 2: None (a full second moment, like HF).
    """
    if ndim < 2:
        return None
    if ndim == 2:
        return 0, 1
    if ndim == 4:
        return 1, 0
    return ndim - 1, ndim - 2


class AdafactorState(NamedTuple):
    """count: updates applied (HF's per-parameter `step` minus 1: every leaf gets a gradient
    on every update, so one count serves all); v_row / v_col: factored second moments (the
    parameter's shape with the row / column axis of `factored_axes` kept as size 1);
    v: unfactored second moments. Unused entries hold a (1,) placeholder. All float32."""
    count: jax.Array
    v_row: optax.Params
    v_col: optax.Params
    v: optax.Params


def _placeholder():
    return jnp.zeros((1,), jnp.float32)


def _keep1(shape, axis):
    return tuple(1 if i == axis else d for i, d in enumerate(shape))


def adafactor(learning_rate: float | Callable, *, weight_decay: float = 0.0,
              eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
              decay_rate: float = -0.8) -> optax.GradientTransformation:
    """HF transformers.Adafactor(lr, relative_step=False, scale_parameter=False,
    warmup_init=False, clip_threshold, decay_rate, beta1=None, weight_decay) as an optax
    transformation (formulas in the module docstring; factored axes: `factored_axes`).

    learning_rate: a float or a schedule (updates applied -> lr). eps[1] only serves HF's
    parameter scaling, which this form leaves off. `update` needs `params` (weight decay)."""
    eps1 = float(eps[0])
    wd = float(weight_decay)
    clip = float(clip_threshold)
    schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(
        learning_rate)

    def init(params):
        leaves, treedef = jax.tree.flatten(params)
        rows, cols, full = [], [], []
        for p in leaves:
            axes = factored_axes(p.ndim)
            if axes is None:
                rows.append(_placeholder())
                cols.append(_placeholder())
                full.append(jnp.zeros(p.shape, jnp.float32))
            else:
                rows.append(jnp.zeros(_keep1(p.shape, axes[0]), jnp.float32))
                cols.append(jnp.zeros(_keep1(p.shape, axes[1]), jnp.float32))
                full.append(_placeholder())
        un = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
        return AdafactorState(jnp.zeros((), jnp.int32), un(rows), un(cols), un(full))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("adafactor needs params (weight decay)")
        grads, treedef = jax.tree.flatten(updates)
        ps = treedef.flatten_up_to(params)
        rows = treedef.flatten_up_to(state.v_row)
        cols = treedef.flatten_up_to(state.v_col)
        full = treedef.flatten_up_to(state.v)
        lr = jnp.asarray(schedule(state.count), jnp.float32)
        step = (state.count + 1).astype(jnp.float32)
        new_b = jnp.power(step, jnp.float32(decay_rate))      # 1 - beta2t
        beta2t = 1.0 - new_b
        out, new_rows, new_cols, new_full = [], [], [], []
        for g, p, vr, vc, v in zip(grads, ps, rows, cols, full):
            g = g.astype(jnp.float32)
            g2 = g * g + eps1
            axes = factored_axes(g.ndim)
            if axes is None:
                v = beta2t * v + new_b * g2
                u = jax.lax.rsqrt(v) * g
            else:
                ar, ac = axes
                vr = beta2t * vr + new_b * jnp.mean(g2, axis=ar, keepdims=True)
                vc = beta2t * vc + new_b * jnp.mean(g2, axis=ac, keepdims=True)
                r_factor = jax.lax.rsqrt(vr / jnp.mean(vr, axis=ac, keepdims=True))
                u = r_factor * jax.lax.rsqrt(vc) * g
            rms = jnp.sqrt(jnp.mean(u * u))
            u = u / jnp.maximum(rms / clip, 1.0)
            u = lr * u
            pf = p.astype(jnp.float32)
            step_out = -(u + (lr * wd) * pf) if wd else -u
            out.append(step_out.astype(p.dtype))
            new_rows.append(vr)
            new_cols.append(vc)
            new_full.append(v)
        un = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
        return un(out), AdafactorState(state.count + 1, un(new_rows), un(new_cols),
                                       un(new_full))

    return optax.GradientTransformation(init, update)


def _one_minus_power(decay: float, count: jax.Array) -> jax.Array:
    """1 - decay^count in float32 to a few ulps: -expm1(count * log(decay)), the logarithm
    taken in float64 on the host. (optax's 1 - decay^count in float32 rounds decay = 0.999
    first and then the power near 1: 1-2e-5 low at small counts, so its Adam steps were ~7e-6
    relative smaller than torch's, which computes it in float64.)"""
    return -jnp.expm1(count.astype(jnp.float32) * jnp.float32(math.log(decay)))


def scale_by_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's direction m_hat / (sqrt(v_hat) + eps) as torch.optim.Adam(W) computes it, with
    accurate bias corrections (`_one_minus_power`). State: optax's ScaleByAdamState (count,
    mu, nu), so it is laid out, sharded and checkpointed as optax.scale_by_adam's."""
    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros,
                                      nu=jax.tree.map(jnp.zeros_like, zeros))

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g), state.nu, updates)
        count = optax.safe_increment(state.count)
        bc1, bc2 = _one_minus_power(b1, count), _one_minus_power(b2, count)
        out = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v / bc2) + eps), mu, nu)
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def adamw(learning_rate, *, b1: float, b2: float, eps: float, weight_decay: float
          ) -> optax.GradientTransformation:
    """AdamW equal to torch.optim.AdamW: p <- p - lr (m_hat / (sqrt(v_hat) + eps) + wd p);
    the same chain (and state) as optax.adamw, with `scale_by_adam` above."""
    return optax.chain(scale_by_adam(b1, b2, eps), optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))


def make_optimizer(cfg) -> optax.GradientTransformation:
    """The optimiser of `cfg` (the train section): clipping, then AdamW or Adafactor."""
    lr = learning_rate_schedule(float(cfg.learning_rate), int(cfg.warmup_steps))
    name = cfg.optimizer
    if name == "adamw":
        core = adamw(lr, b1=float(cfg.adam_b1), b2=float(cfg.adam_b2),
                     eps=float(cfg.adam_eps), weight_decay=float(cfg.weight_decay))
    elif name == "adafactor":
        core = adafactor(lr, weight_decay=float(cfg.weight_decay), clip_threshold=1.0)
    else:
        raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {name!r}")
    parts = [optax.clip_by_global_norm(float(cfg.grad_clip))] if cfg.grad_clip > 0 else []
    return optax.chain(*parts, core)
