"""Training metrics: a JSONL file and TensorBoard event files (tensorboardX, no TensorFlow),
written by process 0; model-FLOPs utilisation from the compiled step's cost analysis.

    writer = MetricWriter(out_dir, resume_step=s)   # drops JSONL records after step s
    writer.write(step, {"loss": ..., ...}, prefix="train")
"""
from __future__ import annotations

import json
import math
import os
import pathlib

import jax

# Dense bfloat16 peak FLOP/s per chip by `device_kind` (vendor figures); unknown -> MFU null.
PEAK_BF16_FLOPS = {
    "NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops_per_device(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    if kind in PEAK_BF16_FLOPS:
        return PEAK_BF16_FLOPS[kind]
    for name, value in PEAK_BF16_FLOPS.items():
        if kind.startswith(name):
            return value
    return None


def step_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled (or lowered) function (XLA's cost analysis; None if
    absent). A loop body counts once, whatever its trip count."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (some backends have none)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def mfu(flops_per_step: float | None, seconds_per_step: float, n_devices: int) -> float | None:
    peak = peak_flops_per_device()
    if not flops_per_step or not peak or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / (peak * n_devices)


class MetricWriter:
    """Appends `{"step", "kind", **values}` lines to metrics.jsonl and scalars to TensorBoard
    (`kind/name`). Only process 0 writes."""

    def __init__(self, out_dir, *, resume_step: int = 0, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = pathlib.Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter
            # events at steps >= purge_step are hidden: those this run writes again
            self._tb = SummaryWriter(logdir=str(self.path.parent / "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step else 0)

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: drop their old records. A
        run from step 0 (no checkpoint yet) rewrites everything, the step-0 evaluation too."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and step > 0 and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)

    def write(self, step: int, values: dict, kind: str = "train") -> None:
        if not self.active:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in values.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), "kind": kind, **clean}, sort_keys=True)
                    + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
