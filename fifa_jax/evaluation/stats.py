"""Win rates, rates and intervals for tuned-vs-base evaluations (numpy; scipy's t quantile in
`crossed_mean_ci`).

Data layout: N evaluation images per model, one per (prompt, seed) pair, in the same order for
both models, so `tuned[i]` and `base[i]` are scores of images made from the same prompt and
the same initial noise. `groups` (N,) int gives each pair's prompt id.

Why a cluster bootstrap: the images of one prompt share the prompt's difficulty (all seeds of a
hard prompt score low, for both models), so the N pairs are not independent. Resampling single
pairs treats S seeds of one prompt as S independent samples and gives intervals too narrow by
about sqrt(1 + (S - 1) * intra-prompt correlation). With `groups`, the bootstrap resamples whole
prompts with replacement and keeps all seeds of a drawn prompt together (tests/evaluation show
the coverage with and without).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

_TIES = ("half", "loss", "drop")
_MAX_GATHER = 1 << 24   # elements per gathered chunk (memory bound of the vectorised bootstrap)


def _check(name: str, x, ndim_min: int = 1) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim < ndim_min or x.shape[-1] == 0:
        raise ValueError(f"{name}: needs at least one value on its last axis, got shape {x.shape}")
    if x.dtype != bool and not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: holds {int(np.sum(~np.isfinite(x)))} non-finite values")
    return x


def win_rate(tuned, base, *, ties: str = "half"):
    """Share of pairs where tuned scores above base, reduced over the last axis.

    tuned, base: (..., N) scores of paired images. Returns a float for 1-D input, else (...,).
      ties="half": (#{t > b} + 0.5 #{t == b}) / N
      ties="loss": #{t > b} / N
      ties="drop": #{t > b} / #{t != b}   (0.5 when every pair ties)
    """
    if ties not in _TIES:
        raise ValueError(f"win_rate: ties must be one of {_TIES}, got {ties!r}")
    tuned, base = _check("tuned", tuned), _check("base", base)
    if tuned.shape != base.shape:
        raise ValueError(f"win_rate: tuned {tuned.shape} and base {base.shape} differ in shape")
    wins = np.sum(tuned > base, axis=-1).astype(np.float64)
    n_ties = np.sum(tuned == base, axis=-1)
    n = tuned.shape[-1]
    if ties == "half":
        out = (wins + 0.5 * n_ties) / n
    elif ties == "loss":
        out = wins / n
    else:
        decided = n - n_ties
        out = np.where(decided > 0, wins / np.maximum(decided, 1), 0.5)
    return float(out) if out.ndim == 0 else out


def mean_diff(tuned, base):
    """mean(tuned - base) over the last axis: (..., N) -> (...,) (float for 1-D input)."""
    d = np.mean(np.asarray(tuned, np.float64) - np.asarray(base, np.float64), axis=-1)
    return float(d) if d.ndim == 0 else d


def _mean(x):
    m = np.mean(np.asarray(x, np.float64), axis=-1)
    return float(m) if m.ndim == 0 else m


def _members(groups: np.ndarray, n: int) -> list[np.ndarray]:
    """Indices of each distinct group, in np.unique (sorted) order."""
    if groups.shape != (n,):
        raise ValueError(f"bootstrap_ci: groups must have shape ({n},), got {groups.shape}")
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    return np.split(order, np.cumsum(counts)[:-1])


def bootstrap_ci(fn: Callable[..., np.ndarray], *arrays, n_boot: int = 2000,
                 level: float = 0.95, seed: int = 0, groups=None) -> tuple[float, float]:
    """Percentile bootstrap interval of the statistic fn(*arrays).

    arrays: each (N,), resampled together (pairs stay pairs).
    fn: reduces the last axis: maps arrays of shape (B, M) to (B,) and (M,) to a scalar, e.g.
      win_rate, mean_diff, lambda x: np.mean(x, axis=-1).
    groups: None -> iid bootstrap over the N entries; (N,) ints -> cluster bootstrap over the G
      distinct groups (prompts): each replicate draws G groups with replacement and takes all
      entries of every drawn group (see the module docstring for why).
    Draws (the whole randomness, so a loop can reproduce it exactly):
      rng = np.random.default_rng(seed); draws = rng.integers(0, K, size=(n_boot, K)),
      K = N (iid) or G (clusters, numbered in np.unique(groups) order). Replicate b uses entries
      draws[b] (iid), or the concatenation of the members (in index order) of groups draws[b].
    Vectorised: the replicates' index matrix (n_boot, M) gathers every array at once (in chunks
    of replicates); with clusters of unequal sizes the replicate sizes differ and fn is called
    once per replicate instead.
    Returns (lo, hi) = the (1 - level)/2 and (1 + level)/2 quantiles (numpy's linear method) of
    the n_boot replicate statistics.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"bootstrap_ci: n_boot must be >= 1, got {n_boot}")
    if not arrays:
        raise ValueError("bootstrap_ci: needs at least one array")
    arrays = [_check(f"array {i}", a) for i, a in enumerate(arrays)]
    n = arrays[0].shape[0]
    for i, a in enumerate(arrays):
        if a.shape != (n,):
            raise ValueError(f"bootstrap_ci: array {i} has shape {a.shape}, expected ({n},)")
    rng = np.random.default_rng(seed)
    if groups is None:
        index = rng.integers(0, n, size=(n_boot, n))
    else:
        members = _members(np.asarray(groups), n)
        draws = rng.integers(0, len(members), size=(n_boot, len(members)))
        sizes = {len(m) for m in members}
        if len(sizes) == 1:   # equal clusters: one rectangular index matrix (n_boot, G * S)
            index = np.stack(members)[draws].reshape(n_boot, -1)
        else:                 # ragged replicates: one call of fn per replicate
            stats = np.array([fn(*(a[np.concatenate([members[g] for g in row])]
                                   for a in arrays)) for row in draws], np.float64)
            return _quantiles(stats, level)
    chunk = max(1, _MAX_GATHER // index.shape[1])
    stats = np.concatenate([np.asarray(fn(*(a[index[i:i + chunk]] for a in arrays)),
                                       np.float64).reshape(-1)
                            for i in range(0, n_boot, chunk)])
    return _quantiles(stats, level)


def _quantiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def summarize(tuned, base, groups=None, *, n_boot: int = 2000, level: float = 0.95,
              seed: int = 0) -> dict:
    """Summary of one metric for tuned vs base (JSON-serialisable).

    tuned, base: (N,) paired scores; groups: (N,) prompt ids (None = every pair its own prompt).
    Returns {"n", "n_prompts", "level", "base_mean", "base_median", "tuned_mean",
    "tuned_median", "win_rate", "win_rate_ci": [lo, hi], "mean_diff", "mean_diff_ci": [lo, hi]}
    with win_rate = win_rate(tuned, base) (ties count 1/2), mean_diff = mean(tuned - base), and
    cluster-bootstrap intervals over prompts (bootstrap_ci, same draws for both).
    """
    tuned, base = _check("tuned", tuned), _check("base", base)
    if tuned.shape != base.shape or tuned.ndim != 1:
        raise ValueError(f"summarize: tuned {tuned.shape} and base {base.shape} must be equal (N,)")
    kw = dict(n_boot=n_boot, level=level, seed=seed, groups=groups)
    return {
        "n": int(tuned.shape[0]),
        "n_prompts": int(tuned.shape[0] if groups is None else len(np.unique(groups))),
        "level": level,
        "base_mean": _mean(base), "base_median": float(np.median(base)),
        "tuned_mean": _mean(tuned), "tuned_median": float(np.median(tuned)),
        "win_rate": win_rate(tuned, base),
        "win_rate_ci": list(bootstrap_ci(win_rate, tuned, base, **kw)),
        "mean_diff": mean_diff(tuned, base),
        "mean_diff_ci": list(bootstrap_ci(mean_diff, tuned, base, **kw)),
    }


def share_with_ci(flags, groups=None, *, n_boot: int = 2000, level: float = 0.95,
                  seed: int = 0) -> dict:
    """A rate (e.g. the harm rate: share of images flagged harmful) with a bootstrap interval.

    flags: (N,) bool; groups: (N,) prompt ids or None. Returns {"rate": mean(flags), "ci":
    [lo, hi], "count": #flags, "n": N} (cluster bootstrap over prompts as in bootstrap_ci).
    """
    flags = np.asarray(flags)
    if flags.dtype != bool:
        raise ValueError(f"share_with_ci: flags must be bool, got {flags.dtype}")
    flags = _check("flags", flags)
    f = flags.astype(np.float64)
    return {"rate": _mean(f), "count": int(flags.sum()), "n": int(flags.shape[0]),
            "ci": list(bootstrap_ci(_mean, f, n_boot=n_boot, level=level, seed=seed,
                                    groups=groups))}


def group_ids(keys: Sequence) -> np.ndarray:
    """(N,) int ids for any hashable per-image keys (e.g. prompt id strings), first-seen order."""
    seen: dict = {}
    return np.array([seen.setdefault(k, len(seen)) for k in keys], np.int64)


def crossed_mean_ci(x, level: float = 0.95) -> dict:
    """Mean and interval of x (S, P): S training seeds crossed with the same P prompts (every
    run scored on the same prompts and start noise), for a population of new seeds *and* new
    prompts.

    Model x[s, p] = mu + a_s + b_p + e_sp (seed, prompt, interaction). The variance of the
    grand mean, sa2 / S + sb2 / P + se2 / (S P), is estimated from the two-way ANOVA as

        v = var_s(row means) / S + var_p(column means) / P - MSE / (S P)

    (each of the first two terms holds se2 / (S P) once; MSE, the residual mean square,
    removes the double count), floored at the larger of the first two terms, with
    Satterthwaite's degrees of freedom. An interval over seeds alone (Student t of the row
    means) leaves out sb2 / P: the prompts' draw, shared by every run. S = 1: the interval
    over prompts; P = 1: over seeds. Returns {"mean", "ci": [lo, hi], "n": S, "prompts": P};
    ci is [None, None] when S = P = 1.
    """
    from scipy import stats as sstats
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"crossed_mean_ci: needs a non-empty (seeds, prompts) array, got "
                         f"shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"crossed_mean_ci: holds {int(np.sum(~np.isfinite(x)))} non-finite "
                         f"values")
    s, p = x.shape
    mean = float(x.mean())
    out = {"mean": mean, "ci": [None, None], "n": int(s), "prompts": int(p)}
    if s * p == 1:
        return out
    parts, dfs = [], []
    if s > 1:
        parts.append(x.mean(1).var(ddof=1) / s)
        dfs.append(s - 1)
    if p > 1:
        parts.append(x.mean(0).var(ddof=1) / p)
        dfs.append(p - 1)
    v = sum(parts)
    den = sum(c * c / d for c, d in zip(parts, dfs))
    if s > 1 and p > 1:
        resid = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + mean
        mse = float((resid ** 2).sum()) / ((s - 1) * (p - 1))
        c3 = mse / (s * p)
        v = max(v - c3, max(parts))
        den += c3 * c3 / ((s - 1) * (p - 1))
    if v <= 0.0:
        out["ci"] = [mean, mean]
        return out
    df = v * v / den
    half = float(sstats.t.ppf(0.5 + level / 2, df)) * float(np.sqrt(v))
    out["ci"] = [mean - half, mean + half]
    return out
