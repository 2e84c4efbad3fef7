"""report: a report from synthetic data; standalone, every referenced file exists, text escaped,
and a headless-Chromium render in which every image loads (screenshot not blank)."""
import html.parser
import json
import os
import re
import shutil
import subprocess
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

from fifa_jax.evaluation import stats
from fifa_jax.evaluation.report import write_report
from tests.browser import browser_path, chrome, image_counts

EVIL = '<script>alert("x")</script> a cat & a "dog" | *bold* [link](http://evil.example)'
METRICS = ("pickscore", "hpsv2", "aesthetic")


def _png(path, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64]
    c = rng.integers(40, 215, size=3)
    img = np.stack([(c[k] + (x if k == 0 else y) * (k + 1)) % 256 for k in range(3)], -1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img.astype(np.uint8)).save(path)


def _prompt_set(out, name, prompts, seeds, shift, rng):
    n = len(prompts) * seeds
    groups = np.repeat(np.arange(len(prompts)), seeds)
    scores, metrics = {}, {}
    for k, m in enumerate(METRICS):
        base = rng.normal(20 + k, 1, n)
        tuned = base + shift + rng.normal(0, 0.5, n)
        scores[m] = {"base": base.tolist(), "tuned": tuned.tolist()}
        metrics[m] = stats.summarize(tuned, base, groups, n_boot=200)
    grid = []
    for i, p in enumerate(prompts):
        for s in range(seeds):
            rel = {side: f"images/{name}/{side}/{i:03d}_{s}.png" for side in ("base", "tuned")}
            for j, side in enumerate(("base", "tuned")):
                _png(os.path.join(out, rel[side]), 1000 * i + 10 * s + j)
            grid.append({"prompt": p, "seed": s, **rel,
                         "scores": {m: {side: scores[m][side][i * seeds + s]
                                        for side in ("base", "tuned")} for m in METRICS}})
    flags_b, flags_t = rng.random(n) < 0.2, rng.random(n) < 0.1
    return {"description": f"{len(prompts)} prompts x {seeds} seeds",
            "metrics": metrics, "scores": scores, "grid": grid,
            "harm": {"base": stats.share_with_ci(flags_b, groups, n_boot=200),
                     "tuned": stats.share_with_ci(flags_t, groups, n_boot=200),
                     "mean_diff": -0.1, "mean_diff_ci": [-0.175, -0.025]},
            "harm_harmful_prompts": {"base": stats.share_with_ci(flags_b[:4], None, n_boot=200),
                                     "tuned": stats.share_with_ci(flags_t[:4], None,
                                                                  n_boot=200)},
            "judge_harmful_prompts": stats.share_with_ci(rng.random(len(prompts)) < 0.3,
                                                         n_boot=200),
            "following": {"colour": {"base": stats.share_with_ci(flags_b, groups, n_boot=200),
                                     "tuned": stats.share_with_ci(flags_t, groups, n_boot=200),
                                     "mean_diff": -0.125, "mean_diff_ci": [-0.25, -0.0625]}}}


def _metrics_jsonl(path):
    with open(path, "w") as f:
        for step in range(1, 41):
            f.write(json.dumps({"step": step, "kind": "train", "loss": 0.69 - 0.004 * step,
                                "implicit_acc": 0.5 + 0.006 * step}) + "\n")
            if step % 10 == 0:
                f.write(json.dumps({"step": step, "kind": "eval", "loss": 0.69 - 0.003 * step,
                                    "implicit_acc": 0.5 + 0.004 * step, "pairs": 64}) + "\n")
        f.write('{"step": 41, "kind": "tr')   # cut off mid-write


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report"))
    rng = np.random.default_rng(0)
    _metrics_jsonl(os.path.join(out, "metrics.jsonl"))
    data = {"title": "FiFA demo <eval>",
            "notes": ["tuned: step 40 checkpoint", "sampler: DDIM 20 steps, cfg 7.5"],
            "training_metrics_path": os.path.join(out, "metrics.jsonl"),
            "prompt_sets": {
                "Pick-a-Pic test": _prompt_set(out, "pickapic", [EVIL, "a red fox in the snow",
                                                                "an astronaut riding a horse"],
                                               2, 0.8, rng),
                "PartiPrompts": _prompt_set(out, "parti", ["a corgi", "a walnut"], 2, 0.0, rng)}}
    index, md = write_report(out, data)
    return out, index, md, data


class _Refs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.imgs, self.scripts = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if key in a:
                self.refs.append(a[key])
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "script":
            self.scripts.append(a)


def _parse(index):
    p = _Refs()
    p.feed(open(index, encoding="utf-8").read())
    return p


def test_references_exist_and_standalone(report):
    out, index, md, data = report
    p = _parse(index)
    n_grid = sum(2 * len(ps["grid"]) for ps in data["prompt_sets"].values())
    assert len(p.imgs) == n_grid + 2 + 1 + 1   # grid, 2 histograms, win rate, training
    for ref in p.refs:
        u = urlparse(ref)
        assert not u.scheme and not u.netloc and not ref.startswith("/"), ref
        assert os.path.isfile(os.path.join(out, unquote(u.path))), ref
    assert p.scripts == [{}]                      # one inline script, no src
    text = open(index, encoding="utf-8").read()
    assert not re.search(r"https?://", text.replace("http://evil.example", ""))
    assert "<link" not in text and "@import" not in text and "url(" not in text
    for rel in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", open(md, encoding="utf-8").read()):
        assert os.path.isfile(os.path.join(out, unquote(rel))), rel
    for name in ("win_rate.png", "training.png"):
        assert os.path.getsize(os.path.join(out, "plots", name)) > 1000


def test_content_and_escaping(report):
    out, index, md, data = report
    text = open(index, encoding="utf-8").read()
    assert "<script>alert" not in text and "&lt;script&gt;alert(&quot;x&quot;)" in text
    assert "FiFA demo &lt;eval&gt;" in text
    s = data["prompt_sets"]["Pick-a-Pic test"]["metrics"]["pickscore"]
    cell = f"{100 * s['win_rate']:.1f}% [{100 * s['win_rate_ci'][0]:.1f}, "
    assert cell in text and cell.replace("[", "\\[") in open(md, encoding="utf-8").read()
    assert 'class="good"' in text                # shift 0.8: interval above 50%
    assert "prompts the LLM judge marks harmful" in text
    assert "images of harmful prompts flagged harmful" in text
    assert "<td>-10.0 pp [-17.5, -2.5]</td>" in text          # harm, tuned - base
    assert "44 records, 1 unreadable lines skipped" in text
    assert "Prompt following" in text and '<td class="bad">-12.5 pp [-25.0, -6.2]</td>' in text
    assert "| colour | " in open(md, encoding="utf-8").read()
    mdtext = open(md, encoding="utf-8").read()
    row = next(line for line in mdtext.splitlines() if "alert" in line)
    assert "<script>" not in row and row.count(" | ") == 3   # the prompt's | is escaped
    # base left, tuned right: within each pair the base image comes first
    imgs = _parse(index).imgs
    pairs = [(a, b) for a, b in zip(imgs, imgs[1:]) if "/base/" in a]
    assert pairs and all(b == a.replace("/base/", "/tuned/") for a, b in pairs)


def test_bad_grid_paths(tmp_path):
    _png(str(tmp_path / "ok.png"), 0)
    entry = {"prompt": "p", "seed": 0, "base": "ok.png", "tuned": "missing.png"}
    with pytest.raises(ValueError, match=r"'s' grid entry 0: image missing.png does not exist"):
        write_report(tmp_path, {"prompt_sets": {"s": {"grid": [entry]}}})
    outside = tmp_path.parent / "outside.png"
    _png(str(outside), 1)
    entry = {"prompt": "p", "seed": 0, "base": "ok.png", "tuned": str(outside)}
    with pytest.raises(ValueError, match="is outside the report folder"):
        write_report(tmp_path, {"prompt_sets": {"s": {"grid": [entry]}}})
    with pytest.raises(ValueError, match="lacks 'seed'"):
        write_report(tmp_path, {"prompt_sets": {"s": {"grid": [{"prompt": "p"}]}}})
    # absolute paths inside the folder become relative
    entry = {"prompt": "p", "seed": 0, "base": str(tmp_path / "ok.png"), "tuned": "ok.png"}
    index, _ = write_report(tmp_path, {"prompt_sets": {"s": {"grid": [entry]}}})
    assert _parse(index).imgs == ["ok.png", "ok.png"]


# ---- headless Chromium (tests/browser.py) ----

def test_chromium_renders_every_image(report, tmp_path):
    browser = browser_path()
    out, index, _, _ = report
    url = "file://" + os.path.abspath(index)
    n_imgs = len(_parse(index).imgs)
    assert image_counts(browser, tmp_path / "p1", url) == (n_imgs, 0)
    shot = tmp_path / "shot.png"
    chrome(browser, tmp_path / "p2", f"--screenshot={shot}", "--window-size=1280,2000", url)
    img = np.asarray(Image.open(shot).convert("RGB"), np.float64)
    assert img.shape == (2000, 1280, 3)
    assert img.std() > 20   # not blank
    keep = os.environ.get("FIFA_JAX_REPORT_SHOT")
    if keep:
        shutil.copy(shot, keep)
    # the check can fail: a report whose image vanished counts it as broken
    broken_copy = tmp_path / "copy"
    shutil.copytree(out, broken_copy)
    os.remove(broken_copy / "plots" / "win_rate.png")
    url = "file://" + str(broken_copy / "index.html")
    assert image_counts(browser, tmp_path / "p3", url) == (n_imgs, 1)
