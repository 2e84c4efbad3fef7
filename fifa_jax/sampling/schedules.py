"""Noise schedules and inference grids, in NumPy on the host, as diffusers 0.42.1 computes them.

All tables are float32 where diffusers' are (it builds them with torch float32 ops), and the
float64 steps (np.interp, Karras ramps) are float64 here too. Timesteps equal diffusers'
exactly; σ/ᾱ tables equal them to float32 rounding (torch's vectorised CPU linspace and sqrt
are not correctly rounded, NumPy's are; the difference is ≤ 2 ulp). T = num_train_timesteps,
N = number of inference steps.

  betas         (T,)  linear: linspace(b0, b1, T); scaled_linear: linspace(√b0, √b1, T)²;
                      squaredcos_cap_v2: 1 − ᾱ(t2)/ᾱ(t1) of the cosine ᾱ, capped at 0.999
  alphas_cumprod (T,) ᾱ = cumprod(1 − β); zero-terminal-SNR rescale optional
  sigma table   (T,)  σ(t) = √((1 − ᾱ_t)/ᾱ_t)
  timesteps     (N,)  per `timestep_spacing`; the three families (DDIM int, Euler float,
                      DPM int over N+1 points) differ, see `ddim_timesteps` etc.
"""
from __future__ import annotations

import math

import numpy as np

F32 = np.float32


def linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(..., dtype=float32)` up to rounding: float64 linspace, rounded once
    (torch's vectorised kernel is within an ulp or two of this, not bit-equal)."""
    return np.linspace(start, end, steps).astype(F32)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """`torch.cumprod` of float32 on the CPU: accumulated in float64, rounded per element
    (bit-equal to torch)."""
    return np.cumprod(x.astype(np.float64)).astype(F32)


def _cosine_betas(t: int, max_beta: float = 0.999) -> np.ndarray:
    def abar(x):
        return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - abar((i + 1) / t) / abar(i / t), max_beta) for i in range(t)], F32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas with ᾱ_T = 0 (arXiv 2305.08891 Alg. 1): √ᾱ shifted by −√ᾱ_T, scaled to keep √ᾱ_0."""
    abar_sqrt = np.sqrt(cumprod_f32(F32(1) - betas))
    a0, at = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
    abar_sqrt = (abar_sqrt - at) * F32(a0 / (a0 - at))
    abar = abar_sqrt ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (F32(1) - alphas).astype(F32)


def betas(c: dict) -> np.ndarray:
    """β (T,) float32 from a resolved config."""
    t = c["num_train_timesteps"]
    if c["trained_betas"] is not None:
        b = np.asarray(c["trained_betas"], F32)
    elif c["beta_schedule"] == "linear":
        b = linspace_f32(c["beta_start"], c["beta_end"], t)
    elif c["beta_schedule"] == "scaled_linear":
        b = linspace_f32(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, t) ** 2
    else:
        b = _cosine_betas(t)
    if c["rescale_betas_zero_snr"]:
        b = rescale_zero_terminal_snr(b)
    return b.astype(F32)


def alphas_cumprod(c: dict, *, clamp_terminal: bool) -> np.ndarray:
    """ᾱ (T,) float32. `clamp_terminal` (Euler, Euler-A, DPM): with the zero-SNR rescale set
    ᾱ_{T−1} = 2⁻²⁴ so σ_max stays finite (DDIM keeps the exact 0)."""
    a = cumprod_f32(F32(1) - betas(c))
    if c["rescale_betas_zero_snr"] and clamp_terminal:
        a[-1] = F32(2.0 ** -24)
    return a


def sigma_table(abar: np.ndarray) -> np.ndarray:
    """σ(t) = √((1 − ᾱ_t)/ᾱ_t), (T,) float32, ascending in t."""
    return ((F32(1) - abar) / abar) ** F32(0.5)


def _check_steps(c: dict, n: int) -> None:
    if not 1 <= n <= c["num_train_timesteps"]:
        raise ValueError(f"num_steps={n} must be in [1, num_train_timesteps="
                         f"{c['num_train_timesteps']}]")


def ddim_timesteps(c: dict, n: int) -> np.ndarray:
    """DDIM (int64, descending). linspace: round(linspace(0, T−1, N)); leading: i·(T//N) +
    steps_offset; trailing: round(arange(T, 0, −T/N)) − 1."""
    _check_steps(c, n)
    t, sp = c["num_train_timesteps"], c["timestep_spacing"]
    if sp == "linspace":
        return np.linspace(0, t - 1, n).round()[::-1].astype(np.int64)
    if sp == "leading":
        return (np.arange(0, n) * (t // n)).round()[::-1].astype(np.int64) + c["steps_offset"]
    return np.round(np.arange(t, 0, -t / n)).astype(np.int64) - 1


def euler_timesteps(c: dict, n: int) -> np.ndarray:
    """Euler / Euler-A (float32, descending, linspace **not** rounded): linspace(0, T−1, N);
    leading: i·(T//N) + steps_offset; trailing: round(arange(T, 0, −T/N)) − 1."""
    _check_steps(c, n)
    t, sp = c["num_train_timesteps"], c["timestep_spacing"]
    if sp == "linspace":
        return np.linspace(0, t - 1, n, dtype=F32)[::-1].copy()
    if sp == "leading":
        ts = (np.arange(0, n) * (t // n)).round()[::-1].astype(F32)
        return ts + F32(c["steps_offset"])
    return np.arange(t, 0, -t / n).round().astype(F32) - F32(1)


def dpm_lambda_last(c: dict, abar: np.ndarray) -> int:
    """`last_timestep` of DPM-Solver: T − searchsorted(flip(λ), lambda_min_clipped), λ = log √ᾱ −
    log √(1−ᾱ); T for the default −inf."""
    lam = np.log(np.sqrt(abar)) - np.log(np.sqrt(F32(1) - abar))
    with np.errstate(invalid="ignore"):
        idx = np.searchsorted(lam[::-1], F32(c["lambda_min_clipped"]), side="left")
    return int(c["num_train_timesteps"] - idx)


def dpm_timesteps(c: dict, n: int, last: int) -> np.ndarray:
    """DPM-Solver (int64, descending), over N+1 points with the last dropped: linspace:
    round(linspace(0, last−1, N+1)); leading: i·(last//(N+1)) + steps_offset; trailing:
    round(arange(last, 0, −T/N)) − 1."""
    _check_steps(c, n)
    t, sp = c["num_train_timesteps"], c["timestep_spacing"]
    if sp == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if sp == "leading":
        ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].astype(np.int64)
        return ts + c["steps_offset"]
    return np.arange(last, 0, -t / n).round().astype(np.int64) - 1


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of σ by linear interpolation in log σ over the table (diffusers
    `_sigma_to_t`); sigma (N,) float64, log_sigmas (T,) float32."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def karras_sigmas(sig_min: float, sig_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """(σ_max^(1/ρ) + ramp·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, ramp = linspace(0, 1, N); float64."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sig_min ** (1 / rho), sig_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sig_min: float, sig_max: float, n: int) -> np.ndarray:
    """exp(linspace(log σ_max, log σ_min, N)); float64."""
    return np.exp(np.linspace(math.log(sig_max), math.log(sig_min), n))


def final_sigma(c: dict, abar: np.ndarray) -> np.float32:
    """σ appended after the grid: 0 ('zero') or σ(0) ('sigma_min')."""
    if c.get("final_sigmas_type", "zero") == "sigma_min":
        return ((F32(1) - abar[0]) / abar[0]) ** F32(0.5)
    return F32(0)
