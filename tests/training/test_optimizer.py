"""The trainer's optimiser (fifa_jax/training/optimizer.py) equals the PyTorch references:
transformers.Adafactor (the SDXL recipe), torch.optim.AdamW (the SD1.5 recipe) and
torch.nn.utils.clip_grad_norm_, under the warm-up schedule (set on the torch side as
param_group['lr'] before each step, as LambdaLR does). Adafactor is compared on the torch
layout of each tensor: Linear kernels (in, out) -> (out, in), conv kernels HWIO -> OIHW."""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers.optimization import Adafactor as HFAdafactor

from fifa_jax.training.optimizer import adafactor, learning_rate_schedule, make_optimizer

SHAPES = {"w": (6, 5), "conv": (3, 3, 4, 5), "conv1x1": (1, 1, 4, 3), "b": (5,),
          "t3": (2, 3, 4)}
STEPS = 10
TOL = 1e-6


def to_torch_layout(x: np.ndarray) -> np.ndarray:
    """JAX layout -> torch layout: (in, out) -> (out, in); HWIO -> OIHW; others as they are."""
    if x.ndim == 2:
        return x.T
    if x.ndim == 4:
        return x.transpose(3, 2, 0, 1)
    return x


def from_torch_layout(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:
        return x.T
    if x.ndim == 4:
        return x.transpose(2, 3, 1, 0)
    return x


def _cfg(**over):
    c = dict(optimizer="adafactor", learning_rate=0.05, warmup_steps=4, weight_decay=0.1,
             adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, grad_clip=0.0)
    c.update(over)
    return SimpleNamespace(**c)


def _params(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _grads(seed=1, shapes=SHAPES, scales=None):
    """STEPS gradient dicts; step i scaled by scales[i] (default 1)."""
    rng = np.random.default_rng(seed)
    scales = scales or [1.0] * STEPS
    return [{k: (sc * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
            for sc in scales]


def run_ours(opt, params, grads):
    state = opt.init(jax.tree.map(jnp.asarray, params))

    @jax.jit
    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    p = jax.tree.map(jnp.asarray, params)
    for g in grads:
        p, state = step(p, state, jax.tree.map(jnp.asarray, g))
    return jax.tree.map(np.asarray, p)


def run_torch(make, params, grads, *, lr, warmup, clip=0.0, layout=True):
    """make(list of torch Parameters) -> torch optimizer; the lr set per step as LambdaLR with
    diffusers' constant_with_warmup would; gradients (and parameters) in torch layout."""
    fwd = to_torch_layout if layout else (lambda x: x)
    bwd = from_torch_layout if layout else (lambda x: x)
    names = list(params)
    ps = [torch.nn.Parameter(torch.tensor(np.ascontiguousarray(fwd(params[k]))))
          for k in names]
    opt = make(ps)
    for s, g in enumerate(grads):
        for p, k in zip(ps, names):
            p.grad = torch.tensor(np.ascontiguousarray(fwd(g[k])))
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, s / warmup) if warmup else lr
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(ps, clip)
        opt.step()
    return {k: bwd(p.detach().numpy()) for k, p in zip(names, ps)}


def hf_adafactor(lr0, wd):
    return lambda ps: HFAdafactor(ps, lr=lr0, relative_step=False, scale_parameter=False,
                                  warmup_init=False, clip_threshold=1.0, weight_decay=wd)


def torch_adamw(cfg):
    return lambda ps: torch.optim.AdamW(ps, lr=cfg.learning_rate,
                                        betas=(cfg.adam_b1, cfg.adam_b2), eps=cfg.adam_eps,
                                        weight_decay=cfg.weight_decay)


def max_rel_err(ours, ref):
    """max over arrays and elements of |ours - ref| / max(|ref|, rms(ref)) (rms: the scale
    floor, so elements near 0 are judged against the array's scale)."""
    worst = 0.0
    for k in ref:
        a, b = np.asarray(ours[k], np.float64), np.asarray(ref[k], np.float64)
        assert a.shape == b.shape, k
        floor = max(float(np.sqrt(np.mean(b * b))), 1e-30)
        worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), floor))))
    return worst


# Our AdamW computes the bias corrections to a few float32 ulps (optimizer._one_minus_power);
# optax.adamw's float32 1 - b2^t was 1-2e-5 low, which made its steps ~7e-6 relative smaller
# than torch's (float64) and failed these bounds. The displacement p10 - p0 is compared to
# ADAM_DISP_TOL and the parameters (which moved by O(0.5) here at lr 0.05) to ADAM_PARAM_TOL.
ADAM_DISP_TOL = 1e-5
ADAM_PARAM_TOL = 1e-6


def assert_adamw_close(ours, ref, params):
    disp = lambda q: {k: np.asarray(q[k], np.float64) - params[k] for k in q}  # noqa: E731
    err_p, err_d = max_rel_err(ours, ref), max_rel_err(disp(ours), disp(ref))
    assert err_p < ADAM_PARAM_TOL, err_p
    assert err_d < ADAM_DISP_TOL, err_d
    assert max_rel_err(params, ref) > 0.1          # the parameters moved


def test_adafactor_matches_hf_after_10_updates_with_warmup():
    cfg = _cfg()
    params, grads = _params(), _grads()
    ours = run_ours(make_optimizer(cfg), params, grads)
    ref = run_torch(hf_adafactor(cfg.learning_rate, cfg.weight_decay), params, grads,
                    lr=cfg.learning_rate, warmup=cfg.warmup_steps)
    err = max_rel_err(ours, ref)
    assert err < TOL, err
    # the parameters moved well beyond the tolerance (the comparison says something)
    assert max_rel_err(params, ref) > 0.1
    # the conv layout matters: HF factoring our HWIO kernels over (cin, cout) differs
    raw = run_torch(hf_adafactor(cfg.learning_rate, cfg.weight_decay), params, grads,
                    lr=cfg.learning_rate, warmup=cfg.warmup_steps, layout=False)
    for k in ("conv", "conv1x1"):
        assert max_rel_err({k: raw[k]}, {k: ref[k]}) > 1e-3, k


def test_adafactor_first_update_in_warmup_changes_nothing():
    """lr 0 on the first update: no step and no decay (optax.adafactor's weight_decay_rate
    took 1% off every weight here at wd 1e-2)."""
    params = _params()
    zero = {k: np.zeros_like(v) for k, v in params.items()}
    rand = _grads()[0]
    for g in (zero, rand):
        ours = run_ours(make_optimizer(_cfg(weight_decay=1e-2, warmup_steps=500)), params, [g])
        for k in params:
            np.testing.assert_array_equal(ours[k], params[k])


@pytest.mark.parametrize("lr,wd", [(1e-3, 0.5), (6.4e-7, 1e-2), (6.4e-7, 1.0)])
def test_adafactor_weight_decay_is_lr_times_wd(lr, wd):
    """Zero gradient: HF's update is 0 (0 * rsqrt(1e-30)), so one update leaves only the
    decay p <- p (1 - lr wd). Ours equals HF and that; the old optax form (wd per update)
    does not."""
    params = _params()
    params["ones"] = np.ones((4, 3), np.float32)
    zero = [{k: np.zeros_like(v) for k, v in params.items()}]
    cfg = _cfg(learning_rate=lr, warmup_steps=0, weight_decay=wd)
    ours = run_ours(make_optimizer(cfg), params, zero)
    ref = run_torch(hf_adafactor(lr, wd), params, zero, lr=lr, warmup=0)
    expect = {k: (v.astype(np.float64) * (1.0 - lr * wd)) for k, v in params.items()}
    assert max_rel_err(ours, ref) < TOL
    assert max_rel_err(ours, expect) < TOL
    old = optax.adafactor(lr, multiply_by_parameter_scale=False, clipping_threshold=1.0,
                          weight_decay_rate=wd, momentum=None)
    assert max_rel_err(run_ours(old, params, zero), ref) > 5e-3


def test_factored_moment_symmetric_under_transposition():
    """The factored approximation of a matrix and of its transpose agree: a Linear kernel's
    (in, out) layout gives torch's (out, in) result; same for a generic 3-D tensor's last
    two axes (batch of matrices)."""
    shapes = {"w": (7, 4)}
    params, grads = _params(3, shapes), _grads(4, shapes)
    opt = adafactor(learning_rate_schedule(0.05, 3), weight_decay=0.1)
    a = run_ours(opt, params, grads)
    b = run_ours(opt, {"w": params["w"].T}, [{"w": g["w"].T} for g in grads])
    assert max_rel_err({"w": b["w"].T}, a) < TOL


def test_adamw_matches_torch_after_10_updates_with_warmup():
    cfg = _cfg(optimizer="adamw", learning_rate=0.05, weight_decay=0.1)
    params, grads = _params(), _grads()
    ours = run_ours(make_optimizer(cfg), params, grads)
    ref = run_torch(torch_adamw(cfg), params, grads, lr=cfg.learning_rate,
                    warmup=cfg.warmup_steps)
    assert_adamw_close(ours, ref, params)


# per-step gradient scales on both sides of the clipping norm (total norm ~ 11 x scale):
# clipped steps are far above 1 so torch's 1e-6 in clip_grad_norm_'s divisor stays < 1e-7
CLIP_SCALES = [0.02, 2.0, 0.05, 1.0, 0.08, 5.0, 0.03, 0.5, 3.0, 0.01]


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_grad_clip_matches_clip_grad_norm(name):
    cfg = _cfg(optimizer=name, grad_clip=1.0)
    params, grads = _params(5), _grads(6, scales=CLIP_SCALES)
    make = torch_adamw(cfg) if name == "adamw" else hf_adafactor(cfg.learning_rate,
                                                                  cfg.weight_decay)
    ref = run_torch(make, params, grads, lr=cfg.learning_rate, warmup=cfg.warmup_steps,
                    clip=1.0)
    ours = run_ours(make_optimizer(cfg), params, grads)
    if name == "adamw":
        assert_adamw_close(ours, ref, params)
    else:
        err = max_rel_err(ours, ref)
        assert err < TOL, err
    # the clipping matters here: without it the result is off
    unclipped = run_ours(make_optimizer(_cfg(optimizer=name, grad_clip=0.0)), params, grads)
    assert max_rel_err(unclipped, ref) > 1e-3
