"""Resolve a diffusers `scheduler_config.json` dict for one of our samplers.

`resolve(cfg, sampler)` does what diffusers' `XScheduler.from_config(cfg)` does for the target
class X of `sampler` (diffusers 0.42.1, `ConfigMixin.extract_init_dict`):
  * keys named in `cfg["_use_default_values"]` are dropped (they take X's default);
  * keys X's `__init__` does not take are ignored (e.g. PNDM's `skip_prk_steps`);
  * keys X takes but `cfg` lacks take **X's** default, not the source class's. So DDIM loaded
    from SD1.5's PNDM config is `timestep_spacing="leading"` + `steps_offset=1`, while Euler or
    DPM from the same config are `"linspace"` (where `steps_offset` has no effect).
Then every key is checked: a value we do not implement is a one-line `InputError` naming the
key, never silently ignored.

Also returned, as `resolved["_hidden"]`: the source keys X does not take. diffusers registers
them on the scheduler's config too, and DPM-Solver's Karras / exponential sigmas read
`config.sigma_min` / `config.sigma_max` from there (e.g. from an Euler config).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from fifa_jax.errors import InputError

SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m")

#: sampler name -> the diffusers scheduler class whose semantics it reproduces.
DIFFUSERS_CLASS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                   "euler_a": "EulerAncestralDiscreteScheduler",
                   "dpmpp_2m": "DPMSolverMultistepScheduler"}

_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
               beta_schedule="linear", trained_betas=None, prediction_type="epsilon")

#: `__init__` defaults of the diffusers classes (tests check them against diffusers itself).
DEFAULTS: dict[str, dict[str, Any]] = {
    "ddim": dict(_COMMON, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                 thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
                 sample_max_value=1.0, timestep_spacing="leading",
                 rescale_betas_zero_snr=False),
    "euler": dict(_COMMON, interpolation_type="linear", use_karras_sigmas=False,
                  use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None,
                  sigma_max=None, timestep_spacing="linspace", timestep_type="discrete",
                  steps_offset=0, rescale_betas_zero_snr=False, final_sigmas_type="zero"),
    "euler_a": dict(_COMMON, timestep_spacing="linspace", steps_offset=0,
                    rescale_betas_zero_snr=False),
    "dpmpp_2m": dict(_COMMON, solver_order=2, thresholding=False,
                     dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                     algorithm_type="dpmsolver++", solver_type="midpoint",
                     lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                     use_exponential_sigmas=False, use_beta_sigmas=False,
                     use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0,
                     final_sigmas_type="zero", lambda_min_clipped=-math.inf,
                     variance_type=None, timestep_spacing="linspace", steps_offset=0,
                     rescale_betas_zero_snr=False, use_dynamic_shifting=False,
                     time_shift_type="exponential"),
}

# Keys whose only supported value is the default (key -> allowed values).
_ONLY_DEFAULT = {
    "ddim": {"thresholding": (False,)},
    "euler": {"interpolation_type": ("linear",), "use_beta_sigmas": (False, None),
              "timestep_type": ("discrete",)},
    "euler_a": {},
    "dpmpp_2m": {"thresholding": (False,), "use_beta_sigmas": (False, None),
                 "use_lu_lambdas": (False, None), "use_flow_sigmas": (False, None),
                 "variance_type": (None,), "use_dynamic_shifting": (False,),
                 # diffusers maps the removed "deis" to "dpmsolver++".
                 "algorithm_type": ("dpmsolver++", "deis"),
                 "solver_order": (1, 2, 3)},
}
# Keys that only act when another key is on (thresholding / flow sigmas), so any value is inert
# as long as the _ONLY_DEFAULT check above passed: dynamic_thresholding_ratio, sample_max_value,
# flow_shift, time_shift_type.

_PREDICTIONS = {"ddim": ("epsilon", "v_prediction", "sample"),
                "euler": ("epsilon", "v_prediction", "sample", "original_sample"),
                "euler_a": ("epsilon", "v_prediction"),
                "dpmpp_2m": ("epsilon", "v_prediction", "sample")}


def _bad(key: str, value, why: str) -> InputError:
    return InputError(f"scheduler_config key {key!r} = {value!r}: {why}")


def resolve(cfg: Mapping[str, Any] | None, sampler: str) -> dict[str, Any]:
    """The full config diffusers' target class would use, validated. See the module docstring."""
    if sampler not in SAMPLERS:
        raise InputError(f"sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    cfg = dict(cfg or {})
    used_defaults = set(cfg.pop("_use_default_values", None) or ())
    cfg = {k: v for k, v in cfg.items() if k not in used_defaults}
    defaults = DEFAULTS[sampler]
    out = dict(defaults)
    out.update({k: v for k, v in cfg.items() if k in defaults})
    out["_hidden"] = {k: v for k, v in cfg.items() if k not in defaults}
    _validate(out, sampler)
    if out.get("solver_type") in ("logrho", "bh1", "bh2"):   # diffusers remaps these too
        out["solver_type"] = "midpoint"
    return out


def _validate(c: dict, sampler: str) -> None:
    for key, allowed in _ONLY_DEFAULT[sampler].items():
        if c[key] not in allowed:
            raise _bad(key, c[key], f"not supported by fifa_jax's {sampler!r} sampler "
                       f"(supported: {', '.join(map(repr, allowed))})")
    if c["prediction_type"] not in _PREDICTIONS[sampler]:
        raise _bad("prediction_type", c["prediction_type"],
                   f"{sampler!r} supports {', '.join(_PREDICTIONS[sampler])}")
    if c["timestep_spacing"] not in ("linspace", "leading", "trailing"):
        raise _bad("timestep_spacing", c["timestep_spacing"],
                   "expected 'linspace', 'leading' or 'trailing'")
    if c["trained_betas"] is None and c["beta_schedule"] not in (
            "linear", "scaled_linear", "squaredcos_cap_v2"):
        raise _bad("beta_schedule", c["beta_schedule"],
                   "expected 'linear', 'scaled_linear' or 'squaredcos_cap_v2'")
    if c["trained_betas"] is not None and len(c["trained_betas"]) != c["num_train_timesteps"]:
        raise _bad("trained_betas", f"<{len(c['trained_betas'])} values>",
                   f"need num_train_timesteps={c['num_train_timesteps']} values")
    if "final_sigmas_type" in c and c["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise _bad("final_sigmas_type", c["final_sigmas_type"], "expected 'zero' or 'sigma_min'")
    if "solver_type" in c and c["solver_type"] not in ("midpoint", "heun", "logrho", "bh1", "bh2"):
        raise _bad("solver_type", c["solver_type"], "expected 'midpoint' or 'heun'")
    if sum(bool(c.get(k)) for k in ("use_karras_sigmas", "use_exponential_sigmas",
                                    "use_beta_sigmas")) > 1:
        raise _bad("use_karras_sigmas", c.get("use_karras_sigmas"),
                   "at most one of use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas")
