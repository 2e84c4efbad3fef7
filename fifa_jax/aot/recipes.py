"""Train settings that fit a named slice or GPU host: the configs' `:ROOT,TARGET` argument.

    configs/pickapic_sd15.py:/data/fifa,v5e-16     -> recipe("sd15", "v5e-16")
    configs/pickapic_sdxl.py:/data/fifa,v5p-8      -> recipe("sdxl", "v5p-8")

A target is a TPU slice as Cloud TPU names it (v4-8, v5e-8, v5p-8, v6e-8, v5e-16, ...; v4
and v5p names count TensorCores, two a chip; v5e and v6e names count chips) or a GPU host
(h100-8, h200-8: eight 80 / 141 GB GPUs). The recipe gives pairs a chip, remat, the split over
the "fsdp" axis and what it splits (`mesh.param_tactic`: "fsdp" the weights too, "zero" the
optimiser state and gradient accumulator only, "replicate" nothing), and the reference's
dtype, chosen with `python -m fifa_jax.aot` so that the train step and the other programs fit
each chip with headroom (figures in each config's docstring). Every recipe accumulates on the
host (`train.accumulate=host`: loop-free programs, which compile for TPU at SD scale where the
scan's accumulation loop ran this project's 24 GiB compile host out of memory);
the micro-batch is pairs a chip x chips and grad_accum keeps the model's effective batch
(the learning rate stays 1e-8 per pair of it). A slice too large for the effective batch at
one pair a chip raises the effective batch to one pair a chip (grad_accum 1).
GPU hosts: the settings of the TPU chip of the nearest HBM; their memory is an estimate
derived from the TPU compile (no GPU was measured).
"""
from __future__ import annotations

import dataclasses
import re

# model -> (effective batch, {chip family: (pairs a chip, remat, fsdp over at most N chips,
# param_tactic, ref_dtype)}). fsdp: the "fsdp" axis takes min(N, chips) chips.
_PER_CHIP = {
    "sd15": (128, {
        "v5e": (2, "nothing_saveable", 8, "zero", "bfloat16"),
        "v4": (2, "nothing_saveable", 8, "zero", "bfloat16"),  # v4-8: 10.47 GiB
        "v6e": (2, "nothing_saveable", 8, "zero", "bfloat16"),  # v6e-8: 13.26 GiB
        "v5p": (4, "nothing_saveable", 1, "fsdp", "float32"),
        "h100": (4, "nothing_saveable", 1, "fsdp", "float32"),
        "h200": (4, "nothing_saveable", 1, "fsdp", "float32"),
    }),
    "sdxl": (64, {
        "v5e": (1, "nothing_saveable", 16, "fsdp", "bfloat16"),  # v5e-8: 15.30 GiB
        "v4": (1, "nothing_saveable", 8, "fsdp", "bfloat16"),  # v4-16: 23.74 GiB
        "v6e": (1, "nothing_saveable", 8, "fsdp", "bfloat16"),  # v6e-8: 24.96 GiB
        "v5p": (1, "nothing_saveable", 4, "zero", "bfloat16"),
        "h100": (1, "nothing_saveable", 8, "zero", "bfloat16"),
        "h200": (1, "nothing_saveable", 4, "zero", "bfloat16"),
    }),
}
# the smallest slice (devices) a model's recipe is sized for on a chip family. SDXL on v4
# (30.75 GiB a chip, as v6e's 31.25): FSDP over 8 chips (v4-16, micro-step 23.74 GiB); on a
# v4-8's 4 chips each would hold twice the weights.
_MIN_DEVICES = {("sdxl", "v4"): 8}
_TARGET = re.compile(r"^(v4|v5e|v5p|v6e|h100|h200)-(\d+)$")
# devices (chips: v4 and v5p run megacore, a device a chip of two TensorCores) of a target
# name's count
_DEVICES_PER_COUNT = {"v4": 0.5, "v5e": 1, "v6e": 1, "v5p": 0.5, "h100": 1, "h200": 1}


@dataclasses.dataclass(frozen=True)
class Recipe:
    target: str
    devices: int
    batch_size: int          # pairs a micro-batch, global
    grad_accum: int
    remat: str
    fsdp: int
    param_tactic: str
    ref_dtype: str
    accumulate: str = "host"

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def topology(self) -> str | None:
        """The `--topology` of the ahead-of-time check (None for GPU hosts)."""
        return None if self.target.startswith("h") else self.target


def is_target(word: str) -> bool:
    return bool(_TARGET.match(word.strip()))


def split_arg(arg: str | None, default_root: str = "/data/fifa"):
    """'ROOT[,word...]' -> (root, the words that are not targets, the target or None)."""
    parts = [p.strip() for p in (arg or default_root).split(",")]
    root = parts[0] or default_root
    targets = [p for p in parts[1:] if is_target(p)]
    if len(targets) > 1:
        raise ValueError(f"config argument {arg!r} names several targets {targets}")
    rest = [p for p in parts[1:] if p and not is_target(p)]
    return root, rest, (targets[0] if targets else None)


def recipe(model: str, target: str) -> Recipe:
    m = _TARGET.match(target.strip())
    if not m or model not in _PER_CHIP:
        raise ValueError(f"unknown target {target!r} for {model!r}: use e.g. v5e-8, v5p-8, "
                         f"v6e-8, v4-8, v5e-16, h100-8, h200-8")
    family, count = m.group(1), int(m.group(2))
    devices = int(count * _DEVICES_PER_COUNT[family])
    if devices < 1:
        raise ValueError(f"target {target!r} has no whole chip")
    least = _MIN_DEVICES.get((model, family), 1)
    if devices < least:
        smallest = f"{family}-{int(least / _DEVICES_PER_COUNT[family])}"
        raise ValueError(f"target {target!r} ({devices} devices) is smaller than the {model} "
                         f"recipe is sized for: take at least {smallest} "
                         f"(fifa_jax/aot/recipes.py)")
    effective, table = _PER_CHIP[model]
    pairs, remat, fsdp_max, tactic, ref_dtype = table[family]
    fsdp = min(fsdp_max, devices)
    while devices % fsdp:
        fsdp -= 1
    batch = pairs * devices
    accum = max(1, effective // batch)
    return Recipe(target, devices, batch, accum, remat, fsdp, tactic, ref_dtype)


def apply(config, model: str, target: str) -> Recipe:
    """Set train.batch_size / grad_accum / accumulate / remat / ref_dtype / learning_rate and
    mesh.fsdp / data / param_tactic of `config` for `target`; returns the recipe."""
    r = recipe(model, target)
    config.train.batch_size = r.batch_size
    config.train.grad_accum = r.grad_accum
    config.train.accumulate = r.accumulate
    config.train.remat = r.remat
    config.train.ref_dtype = r.ref_dtype
    config.train.learning_rate = 1e-8 * r.effective_batch
    config.mesh.fsdp = r.fsdp
    config.mesh.param_tactic = r.param_tactic
    config.mesh.data = -1
    return r
