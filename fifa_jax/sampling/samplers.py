"""The four samplers as (host plan, traced step) pairs, matching diffusers 0.42.1's schedulers.

`make_plan(cfg, sampler, N, eta)` computes every per-step number in NumPy (float32 with
diffusers' torch op order, see schedules.py) and returns a `Plan`: `tables` {name: (N,)} plus
static facts. `STEPS[sampler](plan, row, x, out, hist, z) -> (x_next, hist)` is the traced
update for one step,
with `row` = {name: scalar} of step i, x (B, C, H, W) float32 the current sample, `out` the
guided model prediction, `hist` the previous x̂₀ (DPM-Solver only), `z` N(0, 1) noise (Euler-A,
DDIM with eta > 0) or None.

Formulas (σ-space samplers keep x = x̂₀ + σ·ε; VP samplers keep x = √ᾱ·x̂₀ + √(1−ᾱ)·ε):
  ddim     x̂₀ = (x − √(1−ᾱ_t)·ε)/√ᾱ_t  [ε]  or √ᾱ_t·x − √(1−ᾱ_t)·v, ε̂ = √ᾱ_t·v + √(1−ᾱ_t)·x  [v]
           or x̂₀ = out, ε̂ = (x − √ᾱ_t·x̂₀)/√(1−ᾱ_t)  [sample]
           (clip x̂₀ to ±clip_sample_range if clip_sample), then
           x' = √ᾱ_prev·x̂₀ + √(1 − ᾱ_prev − s²)·ε̂ + s·z,
           s = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)),
           prev = t − T//N (the integer ratio, whatever the spacing), ᾱ_prev = final_alpha_cumprod
           when prev < 0.
  euler    x̂₀ = x − σ·ε [ε] or −σ/√(σ²+1)·v + x/(σ²+1) [v];  x' = x + (x − x̂₀)/σ·(σ_next − σ)
  euler_a  same x̂₀; σ_up = √(σ_next²(σ² − σ_next²)/σ²), σ_down = √(σ_next² − σ_up²);
           x' = x + (x − x̂₀)/σ·(σ_down − σ) + σ_up·z
  dpmpp_2m α = 1/√(σ²+1), s = σ·α, λ = log α − log s; x̂₀ = (x − s·ε)/α [ε] or α·x − s·v [v];
           h = λ_next − λ_i, r0 = (λ_i − λ_{i−1})/h, D1 = (m0 − m1)/r0 with m = x̂₀ history;
           x' = (s_next/s_i)·x − α_next(e^{−h} − 1)·m0 − ½·α_next(e^{−h} − 1)·D1  (midpoint)
           first order (no D1 term) at step 0 and at the last step per lower_order_final /
           euler_at_final / final_sigmas_type='zero'; heun and 3rd order as diffusers.
The model input is x / in_div: √(σ²+1) for Euler and Euler-A, 1 for DDIM and DPM-Solver.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fifa_jax.errors import InputError
from fifa_jax.sampling import schedules as S

F32 = np.float32


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a run needs besides the model. tables: {name: (N,) float32}, always with
    "t" (the model-facing timesteps) and "in_div" (model input = x / in_div); init_noise_sigma:
    () float32, the factor on the unit noise. The other fields are static."""
    tables: dict
    init_noise_sigma: Any
    sampler: str = dataclasses.field(metadata=dict(static=True))
    prediction_type: str = dataclasses.field(metadata=dict(static=True))
    clip_range: float | None = dataclasses.field(default=None, metadata=dict(static=True))
    stochastic: bool = dataclasses.field(default=False, metadata=dict(static=True))
    history: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def num_steps(self) -> int:
        return int(np.shape(self.tables["t"])[0])


jax.tree_util.register_dataclass(Plan, data_fields=["tables", "init_noise_sigma"],
                                 meta_fields=["sampler", "prediction_type", "clip_range",
                                              "stochastic", "history"])


def _f32(d: dict) -> dict:
    return {k: np.asarray(v, F32) for k, v in d.items()}


def _sqrt(x):
    return np.asarray(x, F32) ** F32(0.5)


# --------------------------------------------------------------------------- host plans

def _ddim_plan(c: dict, n: int, eta: float) -> Plan:
    abar = S.alphas_cumprod(c, clamp_terminal=False)
    final = F32(1) if c["set_alpha_to_one"] else abar[0]
    ts = S.ddim_timesteps(c, n)
    prev = ts - c["num_train_timesteps"] // n
    a_t = abar[ts]
    a_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], final).astype(F32)
    b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
    var = (b_prev / b_t) * (F32(1) - a_t / a_prev)
    std = F32(eta) * _sqrt(var)
    tables = dict(t=ts, in_div=np.ones(n), sqrt_a=_sqrt(a_t), sqrt_b=_sqrt(b_t),
                  sqrt_a_prev=_sqrt(a_prev), dir=_sqrt(F32(1) - a_prev - std ** 2), std=std)
    return Plan(_f32(tables), F32(1), "ddim", c["prediction_type"],
                float(c["clip_sample_range"]) if c["clip_sample"] else None, eta > 0)


def _custom_sigmas(c: dict, in_sigmas: np.ndarray, n: int, lo_hi) -> np.ndarray | None:
    """Karras / exponential σ grid (float64) or None; lo_hi = (σ_min, σ_max) fallbacks."""
    lo = float(c["sigma_min"] if c.get("sigma_min") is not None else lo_hi[0])
    hi = float(c["sigma_max"] if c.get("sigma_max") is not None else lo_hi[1])
    if c.get("use_karras_sigmas"):
        return S.karras_sigmas(lo, hi, n)
    if c.get("use_exponential_sigmas"):
        return S.exponential_sigmas(lo, hi, n)
    return None


def _euler_sigmas(c: dict, n: int):
    """(timesteps float32 (N,), σ float32 (N+1,), init_noise_sigma) of Euler / Euler-A."""
    abar = S.alphas_cumprod(c, clamp_terminal=True)
    table = S.sigma_table(abar)
    ts = S.euler_timesteps(c, n)
    sig = np.interp(ts, np.arange(len(table)), table)
    custom = _custom_sigmas(c, sig, n, (sig[-1], sig[0])) if "use_karras_sigmas" in c else None
    if custom is not None:
        sig, ts = custom, S.sigma_to_t(custom, np.log(table))
    sig = np.concatenate([sig, [S.final_sigma(c, abar)]]).astype(F32)
    init = sig.max()
    if c["timestep_spacing"] == "leading":
        init = (init ** F32(2) + F32(1)) ** F32(0.5)
    return ts.astype(F32), sig, F32(init)


def _v_coefs(sigma: np.ndarray) -> dict:
    return dict(v_out=-sigma / _sqrt(sigma ** 2 + F32(1)), v_div=sigma ** 2 + F32(1))


def _euler_plan(c: dict, n: int) -> Plan:
    ts, sig, init = _euler_sigmas(c, n)
    s, s_next = sig[:-1], sig[1:]
    tables = dict(t=ts, in_div=_sqrt(s ** 2 + F32(1)), sigma=s, sigma_next=s_next, **_v_coefs(s))
    return Plan(_f32(tables), init, "euler", c["prediction_type"])


def _euler_a_plan(c: dict, n: int) -> Plan:
    ts, sig, init = _euler_sigmas(c, n)
    s, s_next = sig[:-1], sig[1:]
    up = _sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
    down = _sqrt(s_next ** 2 - up ** 2)
    tables = dict(t=ts, in_div=_sqrt(s ** 2 + F32(1)), sigma=s, sigma_up=up, sigma_down=down,
                  **_v_coefs(s))
    return Plan(_f32(tables), init, "euler_a", c["prediction_type"], stochastic=True)


def _dpm_orders(c: dict, n: int) -> list[int]:
    """The solver order diffusers' `step` uses at each step index."""
    k, orders = c["solver_order"], []
    for i in range(n):
        final = i == n - 1 and (c["euler_at_final"] or (c["lower_order_final"] and n < 15)
                                or c["final_sigmas_type"] == "zero")
        second = i == n - 2 and c["lower_order_final"] and n < 15
        done = min(i, k)          # lower_order_nums
        if k == 1 or done < 1 or final:
            orders.append(1)
        elif k == 2 or done < 2 or second:
            orders.append(2)
        else:
            orders.append(3)
    return orders


def _dpm_sigmas(c: dict, n: int):
    abar = S.alphas_cumprod(c, clamp_terminal=True)
    table = S.sigma_table(abar)
    ts = S.dpm_timesteps(c, n, S.dpm_lambda_last(c, abar))
    hidden = dict(c["_hidden"], use_karras_sigmas=c["use_karras_sigmas"],
                  use_exponential_sigmas=c["use_exponential_sigmas"])
    custom = _custom_sigmas(hidden, table[::-1], n, (table[0], table[-1]))
    if custom is not None:
        ts = S.sigma_to_t(custom, np.log(table))
        if c["use_karras_sigmas"] and c["beta_schedule"] != "squaredcos_cap_v2":
            ts = ts.round()
        sig = custom
    else:
        sig = np.interp(ts, np.arange(len(table)), table)
    sig = np.concatenate([sig, [S.final_sigma(c, abar)]]).astype(F32)
    ts = ts.astype(np.int64)
    if np.sum(ts == ts[0]) > 1:
        raise InputError(f"scheduler_config: DPM-Solver grid starts with a repeated timestep "
                         f"{ts[0]} (diffusers would skip step 0); use fewer steps")
    return ts, sig


def _dpm_plan(c: dict, n: int) -> Plan:
    ts, sig = _dpm_sigmas(c, n)
    n = len(ts)
    with np.errstate(divide="ignore"):
        alpha = F32(1) / _sqrt(sig ** 2 + F32(1))
        sgm = sig * alpha
        lam = np.log(alpha) - np.log(sgm)           # +inf at σ = 0
    z = np.zeros(n, F32)
    tab = dict(t=ts, in_div=np.ones(n), conv_a=alpha[:-1], conv_s=sgm[:-1], cx=z.copy(),
               c0=z.copy(), c1=z.copy(), c2=z.copy(), inv_r0=z.copy(), inv_r1=z.copy(),
               k1=z.copy(), k2=z.copy())
    heun = c["solver_type"] == "heun"
    orders = _dpm_orders(c, n)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        for i, order in enumerate(orders):
            a_t, h = alpha[i + 1], lam[i + 1] - lam[i]
            em1 = np.exp(-h) - F32(1)
            tab["cx"][i] = sgm[i + 1] / sgm[i]
            tab["c0"][i] = -(a_t * em1)
            if order == 2:
                r0 = (lam[i] - lam[i - 1]) / h
                tab["inv_r0"][i] = F32(1) / r0
                tab["c1"][i] = a_t * (em1 / h + F32(1)) if heun else -(F32(0.5) * (a_t * em1))
            elif order == 3:
                r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
                tab["inv_r0"][i], tab["inv_r1"][i] = F32(1) / r0, F32(1) / r1
                tab["k1"][i], tab["k2"][i] = r0 / (r0 + r1), F32(1) / (r0 + r1)
                tab["c1"][i] = a_t * (em1 / h + F32(1))
                tab["c2"][i] = -(a_t * ((em1 + h) / h ** 2 - F32(0.5)))
    return Plan(_f32(tab), F32(1), "dpmpp_2m", c["prediction_type"],
                history=max(orders) - 1)


def make_plan(c: dict, sampler: str, num_steps: int, eta: float = 0.0) -> Plan:
    """Host-side plan from a `config.resolve`d dict. eta: DDIM only (0 = deterministic)."""
    if eta and sampler != "ddim":
        raise InputError(f"eta={eta} is only meaningful for the 'ddim' sampler")
    if eta < 0:
        raise InputError(f"eta={eta} must be >= 0")
    if sampler == "ddim":
        return _ddim_plan(c, num_steps, float(eta))
    if sampler == "euler":
        return _euler_plan(c, num_steps)
    if sampler == "euler_a":
        return _euler_a_plan(c, num_steps)
    return _dpm_plan(c, num_steps)


# --------------------------------------------------------------------------- traced steps

def _ddim_step(plan: Plan, r: dict, x, out, hist, z):
    if plan.prediction_type == "epsilon":
        x0, eps = (x - r["sqrt_b"] * out) / r["sqrt_a"], out
    elif plan.prediction_type == "v_prediction":
        x0 = r["sqrt_a"] * x - r["sqrt_b"] * out
        eps = r["sqrt_a"] * out + r["sqrt_b"] * x
    else:
        x0 = out
        eps = (x - r["sqrt_a"] * x0) / r["sqrt_b"]
    if plan.clip_range is not None:
        x0 = jnp.clip(x0, -plan.clip_range, plan.clip_range)
    x = r["sqrt_a_prev"] * x0 + r["dir"] * eps
    if plan.stochastic:
        x = x + r["std"] * z
    return x, hist


def _sigma_x0(plan: Plan, r: dict, x, out):
    if plan.prediction_type == "epsilon":
        return x - r["sigma"] * out
    if plan.prediction_type == "v_prediction":
        return out * r["v_out"] + x / r["v_div"]
    return out


def _euler_step(plan: Plan, r: dict, x, out, hist, z):
    x0 = _sigma_x0(plan, r, x, out)
    return x + (x - x0) / r["sigma"] * (r["sigma_next"] - r["sigma"]), hist


def _euler_a_step(plan: Plan, r: dict, x, out, hist, z):
    x0 = _sigma_x0(plan, r, x, out)
    x = x + (x - x0) / r["sigma"] * (r["sigma_down"] - r["sigma"])
    return x + z * r["sigma_up"], hist


def _dpm_step(plan: Plan, r: dict, x, out, hist, z):
    if plan.prediction_type == "epsilon":
        m0 = (x - r["conv_s"] * out) / r["conv_a"]
    elif plan.prediction_type == "v_prediction":
        m0 = r["conv_a"] * x - r["conv_s"] * out
    else:
        m0 = out
    x_next = r["cx"] * x + r["c0"] * m0
    if plan.history >= 1:
        d1_0 = r["inv_r0"] * (m0 - hist[0])
        if plan.history >= 2:
            d1_1 = r["inv_r1"] * (hist[0] - hist[1])
            x_next = x_next + r["c2"] * (r["k2"] * (d1_0 - d1_1))
            d1_0 = d1_0 + r["k1"] * (d1_0 - d1_1)
        x_next = x_next + r["c1"] * d1_0
    return x_next, ((m0,) + tuple(hist[:-1]) if hist else ())


STEPS = {"ddim": _ddim_step, "euler": _euler_step, "euler_a": _euler_a_step,
         "dpmpp_2m": _dpm_step}
