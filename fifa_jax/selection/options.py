"""Which margins the select stage prefers (`select.margin_mode`) and proxy relabelling
(`select.relabel`).

margin_mode (FiFA keeps large margins; later work keeps small ones or drops the hardest):
    top          the margin term enters every score as is (FiFA; today's behaviour)
    bottom       the margin term enters with its sign reversed, m -> -m, before normalising:
                 every method prefers small margins (the "margin" baseline takes the K
                 smallest)
    band:LO-HI   0 <= LO < HI <= 1: only candidates whose margin m lies in
                 [quantile(m, LO), quantile(m, HI)] (numpy's linear quantiles over the
                 candidate pairs) stay candidates; the method then runs as with `top`
                 (e.g. band:0-0.9 drops the top decile, band:0.4-0.6 keeps the middle fifth)

relabel: the Diffusion-DPO paper's AI-feedback variant: a pair whose proxy scores disagree
with the human label (margin_signed = score_w - score_l < 0) has its winner and loser
swapped; its signed margin becomes -margin_signed > 0. Applied before the margin terms, so
with `select.margin = signed` relabelled pairs rank by their new, positive margin. Ties (0)
are kept as labelled. The manifest carries `relabeled` (the encode stage swaps the images) and
`proxy_margin` (the signed margin of the pair as trained).
"""
from __future__ import annotations

import re

import numpy as np

from fifa_jax.config_check import ConfigError

_BAND = re.compile(r"^band:([0-9]*\.?[0-9]+)-([0-9]*\.?[0-9]+)$")


def parse_margin_mode(mode: str) -> tuple[str, tuple[float, float] | None]:
    """'top' | 'bottom' | 'band:LO-HI' -> (kind, (lo, hi) or None); a one-line ConfigError
    naming `select.margin_mode` otherwise."""
    mode = str(mode)
    if mode in ("top", "bottom"):
        return mode, None
    m = _BAND.match(mode)
    if m:
        lo, hi = float(m.group(1)), float(m.group(2))
        if 0.0 <= lo < hi <= 1.0:
            return "band", (lo, hi)
    raise ConfigError(f"config key 'select.margin_mode' must be top, bottom or band:LO-HI "
                      f"with 0 <= LO < HI <= 1 (e.g. band:0.4-0.6); got {mode!r}")


def band_mask(m: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(P,) bool: m in [quantile(m, lo), quantile(m, hi)]."""
    m = np.asarray(m, np.float64)
    if m.size == 0:
        return np.zeros(0, bool)
    q_lo, q_hi = np.quantile(m, [lo, hi])
    return (m >= q_lo) & (m <= q_hi)


def oriented_margin(m: np.ndarray, kind: str) -> np.ndarray:
    """The margin term as the scores use it: m (top, band) or -m (bottom)."""
    return -np.asarray(m, np.float64) if kind == "bottom" else np.asarray(m, np.float64)


def relabel(margin_signed: np.ndarray, enabled: bool) -> tuple[np.ndarray, np.ndarray]:
    """(flipped (P,) bool, signed margin of the pair as trained (P,) float64)."""
    ms = np.asarray(margin_signed, np.float64)
    flipped = (ms < 0) if enabled else np.zeros(ms.shape, bool)
    return flipped, np.where(flipped, -ms, ms)


__all__ = ["parse_margin_mode", "band_mask", "oriented_margin", "relabel"]
