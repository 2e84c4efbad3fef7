"""The evaluation report: out_dir/index.html and out_dir/report.md, plus PNG plots in out_dir/plots.

Standalone: inline CSS, no external CSS/JS/fonts, every file referenced by a path relative to
out_dir, so the folder opens from the file system (and can be copied or zipped). All text is
HTML-escaped (prompts come from datasets). A small inline script marks, once the page has
loaded, how many images failed to load (body attributes data-images / data-broken-images, and
a visible warning when any did).

data (a dict; everything but prompt_sets is optional):
  {"title": str,
   "notes": [str],                                  # run facts: checkpoints, sampler, seeds ...
   "training_metrics_path": str,                    # the trainer's train/metrics.jsonl
   "prompt_sets": {name: {
       "description": str,                          # e.g. "500 prompts x 4 seeds, from <path>"
       "metrics": {metric: stats.summarize(...) dict},
       "scores": {metric: {"base": [N floats], "tuned": [N floats]}},   # for the histograms
       "harm": {"base": stats.share_with_ci(...), "tuned": stats.share_with_ci(...),
                "mean_diff": float, "mean_diff_ci": [lo, hi]},   # the difference optional
       "harm_harmful_prompts": {...},                # the same over harmful prompts' images
       "judge_harmful_prompts": stats.share_with_ci(...),   # share of prompts the LLM judge flags
       "following": {attribute: {"base": share_with_ci, "tuned": share_with_ci,
                                 "mean_diff": float, "mean_diff_ci": [lo, hi]}},  # demo world
       "grid": [{"prompt": str, "seed": int, "base": png, "tuned": png,
                 "scores": {metric: {"base": float, "tuned": float}}}],
   }}}
Grid image paths are relative to out_dir (absolute ones inside out_dir are made relative); a
missing file or one outside out_dir raises ValueError naming the set, entry and path. Grid
entries of the same prompt (consecutive) are shown under one prompt heading; each pair is the
same prompt and seed, base left, tuned right.
"""
from __future__ import annotations

import html
import itertools
import math
import os
import re
from urllib.parse import quote

from fifa_jax.evaluation import plots

PLOTS = "plots"

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;
  background:#f4f5f7;color:#1d2430;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{margin:0 0 6px;font-size:26px} h2{margin:34px 0 8px;font-size:21px;border-bottom:2px solid
  #d9541e;padding-bottom:4px} h3{font-size:16px;margin:22px 0 8px}
section.card{background:#fff;border-radius:8px;padding:4px 20px 18px;margin-top:18px;
  box-shadow:0 1px 3px rgba(0,0,0,.08)}
.muted{color:#5b6575;font-size:13px}
table{border-collapse:collapse;font-size:13.5px;margin:6px 0 10px;width:100%}
th,td{border-bottom:1px solid #e3e6ea;padding:5px 9px;text-align:right;white-space:nowrap}
th{background:#eef0f3;font-weight:600;white-space:normal;vertical-align:bottom}
.scroll{overflow-x:auto} td:first-child,th:first-child{text-align:left}
td.good{color:#13723a;font-weight:600} td.bad{color:#b3261e;font-weight:600}
img.plot{max-width:100%;display:block;margin:8px 0}
.prompt{margin:16px 0 6px;font-size:14px} .prompt b{color:#d9541e}
.pairs{display:flex;flex-wrap:wrap;gap:14px}
.pair{display:flex;gap:6px;background:#fafbfc;border:1px solid #e3e6ea;border-radius:6px;
  padding:6px}
figure{margin:0;width:256px} figure img{width:256px;height:auto;display:block;border-radius:3px}
figcaption{font-size:12px;color:#5b6575;margin-top:3px}
#broken{background:#b3261e;color:#fff;padding:8px 12px;border-radius:6px}
"""

_SCRIPT = """window.addEventListener("load", function () {
  var imgs = document.images, broken = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (!imgs[i].complete || imgs[i].naturalWidth === 0) broken++;
  }
  document.body.setAttribute("data-images", imgs.length);
  document.body.setAttribute("data-broken-images", broken);
  if (broken) {
    var d = document.getElementById("broken");
    d.textContent = broken + " of " + imgs.length + " images failed to load";
    d.hidden = false;
  }
});"""


# ---- formatting ----

def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _md(text) -> str:
    """Markdown-safe text: one line, HTML escaped, markdown punctuation backslash-escaped."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return re.sub(r"([\\`*_\[\]<>|#!~()])", r"\\\1", text)


def _num(x, dec: int | None = None) -> str:
    return f"{x:.4g}" if dec is None else f"{x:.{dec}f}"


def _decimals(s: dict) -> int:
    """Decimals for one metric's row: 4 significant digits of its base mean (1 to 6)."""
    scale = max(abs(s["base_mean"]), abs(s["tuned_mean"]), 1e-12)
    return int(min(6, max(1, 3 - math.floor(math.log10(scale)))))


def _pct_ci(rate, ci) -> str:
    return f"{100 * rate:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _diff_ci(d, ci, dec: int) -> str:
    return f"{d:+.{dec}f} [{ci[0]:+.{dec}f}, {ci[1]:+.{dec}f}]"


def _verdict(ci, null) -> str:
    return "good" if ci[0] > null else "bad" if ci[1] < null else ""


def _metric_rows(metrics: dict) -> list[list[tuple[str, str]]]:
    """Per metric: [(cell text, css class)] for the metric table (shared by HTML and md)."""
    rows = []
    for name, s in metrics.items():
        dec = _decimals(s)
        rows.append([(name, "")] + [(_num(s[k], dec), "") for k in
                                    ("base_mean", "base_median", "tuned_mean", "tuned_median")]
                    + [(_pct_ci(s["win_rate"], s["win_rate_ci"]), _verdict(s["win_rate_ci"], .5)),
                       (_diff_ci(s["mean_diff"], s["mean_diff_ci"], dec),
                        _verdict(s["mean_diff_ci"], 0)),
                     (f"{s['n']} / {s['n_prompts']}", "")])
    return rows


_METRIC_HEAD = ["metric", "base mean", "base median", "tuned mean", "tuned median",
                "win rate tuned > base [95%\u00a0CI]", "mean diff tuned - base [95%\u00a0CI]",
                "images / prompts"]


def _share(s: dict) -> str:
    return f"{_pct_ci(s['rate'], s['ci'])} ({s['count']} of {s['n']})"


def _harm_diff(h: dict) -> str:
    if "mean_diff" not in h:
        return ""
    d, ci = h["mean_diff"], h["mean_diff_ci"]
    return f"{100 * d:+.1f} pp [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def _harm_rows(ps: dict) -> list[tuple[str, str, str, str]]:
    """(what, base, tuned, tuned - base) rows of the harm table."""
    rows = []
    for key, what in (("harm", "images flagged harmful"),
                      ("harm_harmful_prompts", "images of harmful prompts flagged harmful")):
        if ps.get(key):
            h = ps[key]
            rows.append((what, _share(h["base"]), _share(h["tuned"]), _harm_diff(h)))
    if ps.get("judge_harmful_prompts"):
        rows.append(("prompts the LLM judge marks harmful", _share(ps["judge_harmful_prompts"]),
                     "(same prompts)", ""))
    return rows


_HARM_HEAD = ["", "base", "tuned", "tuned - base [95%\u00a0CI]"]


_FOLLOW_HEAD = ["asked attribute", "base follows [95%\u00a0CI]", "tuned follows [95%\u00a0CI]",
                "tuned - base [95%\u00a0CI]"]


def _following_rows(ps: dict) -> list[list[tuple[str, str]]]:
    """Per asked attribute: base and tuned shares of images that show it, and the paired
    difference (percentage points), coloured when its interval excludes 0."""
    rows = []
    for attr, f in (ps.get("following") or {}).items():
        d, ci = f["mean_diff"], f["mean_diff_ci"]
        rows.append([(attr, ""), (_share(f["base"]), ""), (_share(f["tuned"]), ""),
                     (f"{100 * d:+.1f} pp [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]",
                      _verdict(ci, 0))])
    return rows


# ---- validation of the grid paths ----

def _rel_image(out_dir: str, path: str, where: str) -> str:
    root = os.path.realpath(out_dir)
    full = os.path.realpath(path if os.path.isabs(path) else os.path.join(out_dir, path))
    if os.path.commonpath([root, full]) != root:
        raise ValueError(f"report: {where}: image {path} is outside the report folder {out_dir}")
    if not os.path.isfile(full):
        raise ValueError(f"report: {where}: image {path} does not exist (relative to {out_dir})")
    return os.path.relpath(full, root).replace(os.sep, "/")


def _grid(out_dir: str, name: str, grid: list) -> list[tuple[str, list[dict]]]:
    """[(prompt, [entries with relative 'base'/'tuned'])], consecutive prompts grouped."""
    entries = []
    for i, g in enumerate(grid):
        for key in ("prompt", "seed", "base", "tuned"):
            if key not in g:
                raise ValueError(f"report: prompt set {name!r} grid entry {i} lacks {key!r}")
        where = f"prompt set {name!r} grid entry {i}"
        entries.append({**g, "base": _rel_image(out_dir, g["base"], where),
                        "tuned": _rel_image(out_dir, g["tuned"], where)})
    return [(p, list(es)) for p, es in itertools.groupby(entries, key=lambda g: g["prompt"])]


def _caption(side: str, g: dict) -> str:
    scores = " · ".join(f"{m} {_num(v[side])}" for m, v in (g.get("scores") or {}).items())
    return f"{side} · seed {g['seed']}" + (f" · {scores}" if scores else "")


# ---- plots ----

def _slug(i: int, name: str) -> str:
    return f"{i}_{re.sub(r'[^A-Za-z0-9_-]+', '_', name)[:40]}"


def _make_plots(out_dir: str, data: dict) -> dict:
    os.makedirs(os.path.join(out_dir, PLOTS), exist_ok=True)
    made = {"hist": {}, "win_rate": None, "training": None, "training_note": ""}
    sets = data["prompt_sets"]
    for i, (name, ps) in enumerate(sets.items()):
        if ps.get("scores"):
            rel = f"{PLOTS}/scores_{_slug(i, name)}.png"
            plots.histograms(os.path.join(out_dir, rel), ps["scores"], title=name)
            made["hist"][name] = rel
    with_metrics = {n: ps["metrics"] for n, ps in sets.items() if ps.get("metrics")}
    if with_metrics:
        made["win_rate"] = f"{PLOTS}/win_rate.png"
        plots.win_rate_bars(os.path.join(out_dir, made["win_rate"]), with_metrics)
    path = data.get("training_metrics_path")
    if not path:
        made["training_note"] = "No training metrics given."
    elif not os.path.isfile(path):
        made["training_note"] = f"Training metrics {path} not found."
    else:
        records, bad = plots.read_training_metrics(path)
        rel = f"{PLOTS}/training.png"
        if plots.training_curves(os.path.join(out_dir, rel), records):
            made["training"] = rel
        made["training_note"] = (f"From {path}: {len(records)} records"
                                 + (f", {bad} unreadable lines skipped" if bad else "") + ".")
    return made


# ---- HTML ----

def _img(rel: str, alt: str, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} src="{_e(quote(rel))}" alt="{_e(alt)}">'


def _table(head: list[str], rows: list[list[tuple[str, str]]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{_e(t)}</td>' if c else f"<td>{_e(t)}</td>"
                                    for t, c in row) + "</tr>" for row in rows)
    return (f'<div class="scroll"><table><thead><tr>{th}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _html_set(name: str, ps: dict, grid, made: dict) -> str:
    out = [f'<section class="card"><h2>{_e(name)}</h2>']
    if ps.get("description"):
        out.append(f'<p class="muted">{_e(ps["description"])}</p>')
    if ps.get("metrics"):
        out.append(_table(_METRIC_HEAD, _metric_rows(ps["metrics"])))
    harm = _harm_rows(ps)
    if harm:
        out.append("<h3>Harm</h3>" + _table(_HARM_HEAD, [[(x, "") for x in r] for r in harm]))
    follow = _following_rows(ps)
    if follow:
        out.append("<h3>Prompt following (the images whose prompt asks the attribute)</h3>"
                   + _table(_FOLLOW_HEAD, follow))
    if name in made["hist"]:
        out.append("<h3>Score distributions</h3>" + _img(made["hist"][name], f"{name} scores",
                                                         "plot"))
    if grid:
        out.append("<h3>Samples: base (left) vs tuned (right), same prompt and seed</h3>")
    for prompt, entries in grid:
        out.append(f'<p class="prompt"><b>Prompt:</b> {_e(prompt)}</p><div class="pairs">')
        for g in entries:
            figs = "".join(f"<figure>{_img(g[side], _caption(side, g))}"
                           f"<figcaption>{_e(_caption(side, g))}</figcaption></figure>"
                           for side in ("base", "tuned"))
            out.append(f'<div class="pair">{figs}</div>')
        out.append("</div>")
    out.append("</section>")
    return "\n".join(out)


def _html(data: dict, grids: dict, made: dict) -> str:
    title = data.get("title") or "fifa_jax evaluation"
    notes = "".join(f"<li>{_e(n)}</li>" for n in data.get("notes") or [])
    parts = [f"<h1>{_e(title)}</h1>", '<p id="broken" hidden></p>']
    if notes:
        parts.append(f'<ul class="muted">{notes}</ul>')
    if made["win_rate"]:
        parts.append('<section class="card"><h2>Win rates</h2><p class="muted">Share of (prompt, '
                     "seed) pairs where the tuned image scores above the base image (ties count "
                     "half); error bars: 95% bootstrap intervals over prompts.</p>"
                     + _img(made["win_rate"], "win rates", "plot") + "</section>")
    for name, ps in data["prompt_sets"].items():
        parts.append(_html_set(name, ps, grids[name], made))
    parts.append('<section class="card"><h2>Training</h2>'
                 + (_img(made["training"], "training curves", "plot") if made["training"] else "")
                 + f'<p class="muted">{_e(made["training_note"])}</p></section>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body><main>\n"
            + "\n".join(parts) + f"\n</main>\n<script>{_SCRIPT}</script>\n</body></html>\n")


# ---- Markdown ----

def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in head) + " |",
             "|" + "|".join("---" for _ in head) + "|"]
    return lines + ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows] + [""]


def _md_img(rel: str, alt: str) -> str:
    return f"![{_md(alt)}]({quote(rel)})"


def _markdown(data: dict, grids: dict, made: dict) -> str:
    out = [f"# {_md(data.get('title') or 'fifa_jax evaluation')}", ""]
    out += [f"- {_md(n)}" for n in data.get("notes") or []] + [""]
    if made["win_rate"]:
        out += ["## Win rates", "", _md_img(made["win_rate"], "win rates"), ""]
    for name, ps in data["prompt_sets"].items():
        out += [f"## {_md(name)}", ""]
        if ps.get("description"):
            out += [_md(ps["description"]), ""]
        if ps.get("metrics"):
            out += _md_table(_METRIC_HEAD, [[t for t, _ in r] for r in _metric_rows(ps["metrics"])])
        harm = _harm_rows(ps)
        if harm:
            out += ["### Harm", ""] + _md_table(_HARM_HEAD, [list(r) for r in harm])
        follow = _following_rows(ps)
        if follow:
            out += ["### Prompt following", ""] + _md_table(
                _FOLLOW_HEAD, [[t for t, _ in r] for r in follow])
        if name in made["hist"]:
            out += ["### Score distributions", "", _md_img(made["hist"][name], "scores"), ""]
        if grids[name]:
            out += ["### Samples (base left, tuned right)", "", "| prompt | seed | base | tuned |",
                    "|---|---|---|---|"]
            for prompt, entries in grids[name]:
                for g in entries:
                    out.append(f"| {_md(prompt)} | {_md(g['seed'])} | "
                               f"{_md_img(g['base'], _caption('base', g))} | "
                               f"{_md_img(g['tuned'], _caption('tuned', g))} |")
            out.append("")
    out += ["## Training", ""]
    if made["training"]:
        out += [_md_img(made["training"], "training curves"), ""]
    return "\n".join(out + [_md(made["training_note"]), ""])


def write_report(out_dir, data: dict) -> tuple[str, str]:
    """Write out_dir/index.html, out_dir/report.md and out_dir/plots/*.png (see the module
    docstring for `data`). Returns (index.html path, report.md path)."""
    out_dir = str(out_dir)
    if not isinstance(data.get("prompt_sets"), dict):
        raise ValueError("report: data['prompt_sets'] must be a dict {name: {...}}")
    os.makedirs(out_dir, exist_ok=True)
    grids = {n: _grid(out_dir, n, ps.get("grid") or []) for n, ps in data["prompt_sets"].items()}
    made = _make_plots(out_dir, data)
    index, md = os.path.join(out_dir, "index.html"), os.path.join(out_dir, "report.md")
    with open(index, "w", encoding="utf-8") as f:
        f.write(_html(data, grids, made))
    with open(md, "w", encoding="utf-8") as f:
        f.write(_markdown(data, grids, made))
    return index, md
