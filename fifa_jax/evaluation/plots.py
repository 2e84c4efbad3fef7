"""PNG plots for the evaluation report (matplotlib, Agg backend: no display needed).

    histograms(path, {metric: {"base": [...], "tuned": [...]}}, title)
    win_rate_bars(path, {set_name: {metric: summarize() dict}})
    training_curves(path, records) -> bool         records from read_training_metrics
"""
from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

BASE_COLOR, TUNED_COLOR = "#7f8c9a", "#d9541e"


def _save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def histograms(path, scores: dict, title: str = "") -> None:
    """One panel per metric: base and tuned score histograms on shared bins."""
    names = list(scores)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        b = np.asarray(scores[name]["base"], np.float64)
        t = np.asarray(scores[name]["tuned"], np.float64)
        both = np.concatenate([b, t])
        lo, hi = (both.min(), both.max()) if both.size else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 21)
        ax.hist(b, bins=bins, alpha=0.6, color=BASE_COLOR, label=f"base (mean {b.mean():.4g})")
        ax.hist(t, bins=bins, alpha=0.6, color=TUNED_COLOR, label=f"tuned (mean {t.mean():.4g})")
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("images")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    _save(fig, path)


def win_rate_bars(path, sets: dict) -> None:
    """Win rate of tuned over base per metric (groups) and prompt set (bars), with the
    bootstrap intervals as error bars and the 50% line."""
    metrics = list(dict.fromkeys(m for s in sets.values() for m in s))
    width = 0.8 / max(1, len(sets))
    fig, ax = plt.subplots(figsize=(min(11.0, 2.5 + 1.1 * len(metrics) * max(1, len(sets))), 3.2))
    cmap = plt.get_cmap("tab10")
    for k, (name, summaries) in enumerate(sets.items()):
        xs, ys, err = [], [], [[], []]
        for j, m in enumerate(metrics):
            if m in summaries:
                s = summaries[m]
                xs.append(j + (k - (len(sets) - 1) / 2) * width)
                ys.append(100 * s["win_rate"])
                err[0].append(100 * (s["win_rate"] - s["win_rate_ci"][0]))
                err[1].append(100 * (s["win_rate_ci"][1] - s["win_rate"]))
        ax.bar(xs, ys, width * 0.9, yerr=err, capsize=3, label=name, color=cmap(k % 10))
    ax.axhline(50, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("tuned win rate over base (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def read_training_metrics(path) -> tuple[list[dict], int]:
    """Records of the trainer's metrics.jsonl and the number of unreadable lines (a line cut
    off by a crash mid-write is skipped, not fatal)."""
    records, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
                records.append(rec)
            else:
                bad += 1
    return records, bad


def _series(records, kind, key):
    pts = sorted((r["step"], r[key]) for r in records
                 if r.get("kind", "train") == kind and isinstance(r.get(key), (int, float)))
    return [p[0] for p in pts], [p[1] for p in pts]


def training_curves(path, records: list[dict]) -> bool:
    """Train (line) and held-out eval (markers) loss and implicit accuracy vs step.
    Returns False (and writes nothing) when no record holds either value."""
    keys = [("loss", "DPO loss"), ("implicit_acc", "implicit accuracy")]
    if not any(_series(records, kind, k)[0] for kind in ("train", "eval") for k, _ in keys):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, (key, label) in zip(axes, keys):
        for kind, style in (("train", dict(color=TUNED_COLOR, lw=1.2)),
                            ("eval", dict(color="#1f5fa8", marker="o", ms=4, lw=1.0))):
            x, y = _series(records, kind, key)
            if x:
                ax.plot(x, y, label=kind, **style)
        if key == "implicit_acc":
            ax.axhline(0.5, color="black", lw=0.8, ls="--")
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8)
    _save(fig, path)
    return True
