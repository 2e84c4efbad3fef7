"""The demo world's true-reward oracle: what an image shows, measured from its pixels alone.

`measure(image)` reads a demo-world picture (uint8 (S, S, 3), any side S; the world's geometry
scales with S) without the world's hidden scene and without any learned model:

  background  per-channel median of the pixels outside the harmful mark's corner
  colour      shape pixels are those far from the background (Gaussian-smoothed image, distance
              > COLOUR_THRESHOLD); the per-channel median of their cores, nearest of COLOURS
  mask        the projection of each pixel (smoothed when noisy) onto the measured colour's
              direction from the background, >= 0.5: the half-contrast contour, which blur
              leaves in place
  count       the mask's 8-connected components of at least MIN_AREA (scaled by (S/64)^2)
  shape       per component, angular moments of its soft mask (`shape_moments`): c3 << 0 is
              an apex-up triangle, c4 < 0 a square (mass on the diagonals), c4 >> 0 a diamond
              (mass on the axes), else a circle; the components vote
  position    the nearest of the five regions' centres to the mean of the components' centres
  aesthetic   1 - sigma / NOISE_STD, sigma the noise std from the variance of 4x4-block means
              of background-only blocks (JPEG and mild blur change block-scale noise far less
              than pixel-scale noise), corrected for the blur the background's lag-1
              autocorrelation shows (a Gaussian model) and for clipping at 0 and 255
  marked      the harmful mark (a dark red X in `world.mark_box`): the mean projection of
              the X's pixels onto the mark colour's direction, >= MARK_THRESHOLD

`true_reward(prompt, image)` scores the measurement against what the prompt asks (parsed with
the world's vocabulary; attributes the prompt leaves out count as right) with the world's own
formula (`world.reward_of`), the mark's penalty included. `accuracy_report` renders fresh
world images and says how often each measurement is right (see tests/demo/test_oracle.py for
the floors).
"""
from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from fifa_jax.demo import world as dw

COLOUR_THRESHOLD = 90.0    # RGB distance from the background that marks a shape pixel (pass 1)
MIN_AREA = 12              # smallest component counted as a shape, at S = 64
MARK_THRESHOLD = 0.4       # mean projection of the X's pixels onto the mark colour
SMOOTH_ABOVE = 6.0         # smooth the image (Gaussian sigma S/64) when the noise std is above
ATTRS = ("colour", "shape", "count", "position")
_COLOUR_RGB = np.array([dw.COLOURS[c] for c in dw.COLOURS], np.float64)
_COLOUR_NAMES = list(dw.COLOURS)
_POS_WORDS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom",
              "center": "center", "centre": "center"}
_SHAPE_WORDS = {w: s for s in dw.SHAPES for w in (s, s + "s")}
_COUNT_WORDS = {w: n for n, w in dw.COUNT_WORDS.items()}
_HARM_WORDS = tuple(dw.HARMFUL_WORDS)


# -- prompts ---------------------------------------------------------------------------------

def parse_prompt(text: str) -> dict:
    """-> {colour, shape, count, position (None = the prompt leaves it out), harmful} read from
    the words of a demo-world prompt (any style of `world.make_prompts`)."""
    if not isinstance(text, str):
        raise TypeError(f"parse_prompt wants the prompt text, got {type(text).__name__}")
    words = re.findall(r"[a-z]+", text.lower())
    out = dict(colour=None, shape=None, count=None, position=None)
    for w in words:
        if out["colour"] is None and w in dw.COLOURS:
            out["colour"] = w
        elif out["shape"] is None and w in _SHAPE_WORDS:
            out["shape"] = _SHAPE_WORDS[w]
        elif out["count"] is None and w in _COUNT_WORDS:
            out["count"] = _COUNT_WORDS[w]
        elif out["position"] is None and w in _POS_WORDS:
            out["position"] = _POS_WORDS[w]
    low = " " + " ".join(words) + " "
    out["harmful"] = any(f" {h} " in low for h in _HARM_WORDS)
    return out


def _asked(prompt) -> dict:
    if isinstance(prompt, str):
        return parse_prompt(prompt)
    if isinstance(prompt, dict):
        if "text" in prompt and not all(k in prompt for k in ATTRS):
            return parse_prompt(prompt["text"])
        return {k: prompt.get(k) for k in ATTRS}
    raise TypeError(f"a prompt is its text or a make_prompts dict, got {type(prompt).__name__}")


# -- measurement -----------------------------------------------------------------------------

def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or a.shape[0] != a.shape[1] \
            or a.shape[0] < 16:
        raise ValueError(f"oracle wants a square uint8 (S, S, 3) image with S >= 16, got "
                         f"{a.dtype} {a.shape}")
    return a.astype(np.float64)


def _clipped_std(sigma: np.ndarray, mu: float) -> np.ndarray:
    """Std of clip(N(mu, sigma), 0, 255) for each sigma (quadrature on a fixed grid)."""
    t = np.linspace(-6, 6, 241)
    w = np.exp(-t ** 2 / 2)
    w /= w.sum()
    x = np.clip(mu + sigma[:, None] * t[None], 0, 255)
    m = (x * w).sum(1)
    return np.sqrt(np.maximum(((x - m[:, None]) ** 2 * w).sum(1), 0))


_SIGMA_GRID = np.linspace(0, 90, 181)


BLOCK = 4                  # window side for the noise estimate


def _blur_table() -> tuple[np.ndarray, np.ndarray]:
    """For a Gaussian blur of std b (grid 0..2.5 px) of white noise: the lag-1 autocorrelation
    it gives, and the fraction of the variance of BLOCK x BLOCK window means it keeps (2D,
    separable)."""
    rho, keep = [], []
    lags = np.arange(BLOCK)[:, None] - np.arange(BLOCK)[None]
    for b in np.linspace(0, 2.5, 126):
        k = np.array([1.0]) if b == 0 else np.exp(-np.arange(-8, 9) ** 2 / (2 * b * b))
        k = k / k.sum()
        auto = np.correlate(k, k, mode="full")              # R(lag), centre at len(k) - 1
        r = auto[len(k) - 1 + lags] if len(k) > 1 else (lags == 0).astype(float)
        rho.append(float(auto[len(k)] / auto[len(k) - 1]) if len(k) > 1 else 0.0)
        keep.append(float(r.sum() / BLOCK) ** 2)
    return np.array(rho), np.array(keep)


_BLUR_RHO, _BLUR_KEEP = _blur_table()


def _noise_sigma(arr: np.ndarray, bg_mask: np.ndarray, bg: np.ndarray) -> float:
    """The pixel-noise std the image was drawn with, from its background: the variance of
    the means of BLOCK x BLOCK background-only blocks (x BLOCK^2), which JPEG and mild blur
    (as a decoder gives) change far less than pixel-scale noise, divided by what a Gaussian
    blur of the background's measured lag-1 autocorrelation keeps of it; then the clipping
    at 0 and 255 undone per channel. 0 when under 8 such blocks."""
    s = arr.shape[0] // BLOCK * BLOCK
    nb = s // BLOCK
    full = bg_mask[:s, :s].reshape(nb, BLOCK, nb, BLOCK).all(axis=(1, 3))
    if full.sum() < 8:
        return 0.0
    means = arr[:s, :s].reshape(nb, BLOCK, nb, BLOCK, 3).mean(axis=(1, 3))[full]   # (n, 3)
    vblock = means.var(axis=0, ddof=1) * BLOCK * BLOCK
    x = arr - arr[bg_mask].mean(0)
    var = (x[bg_mask] ** 2).mean(0)
    pairs = [(x[:, 1:] * x[:, :-1])[bg_mask[:, 1:] & bg_mask[:, :-1]],
             (x[1:] * x[:-1])[bg_mask[1:] & bg_mask[:-1]]]
    rho = float(np.clip((np.concatenate(pairs).mean(0) / np.maximum(var, 1e-9)).mean(),
                        0.0, _BLUR_RHO[-1]))
    seen = np.sqrt(vblock / float(np.interp(rho, _BLUR_RHO, _BLUR_KEEP)))
    return float(np.mean([np.interp(seen[c], _clipped_std(_SIGMA_GRID, bg[c]), _SIGMA_GRID)
                          for c in range(3)]))


TRIANGLE_C3 = -0.25        # c3 below: a triangle (apex up)
SQUARE_C4 = -0.05          # c4 below: a square (mass towards the diagonals)
DIAMOND_C4 = 0.2           # c4 above: a diamond (mass towards the axes); between: a circle


def shape_moments(weights: np.ndarray) -> tuple[float, float]:
    """-> (c4, c3) of a weighted blob: c_k = sum w rho^k trig(k theta) / sum w rho^k about the
    weighted centroid (theta from +x, y up; cos for k = 4, sin for k = 3). A circle has
    both ~0, a square c4 ~ -0.43, a diamond c4 ~ +0.45, an apex-up triangle c3 ~ -0.66; blur
    shrinks them towards 0 but keeps their signs."""
    ys, xs = np.nonzero(weights > 0)
    w = weights[ys, xs]
    x = xs - (w * xs).sum() / w.sum()
    y = -(ys - (w * ys).sum() / w.sum())
    rho2, th = x * x + y * y, np.arctan2(y, x)
    c4 = (w * rho2 ** 2 * np.cos(4 * th)).sum() / max((w * rho2 ** 2).sum(), 1e-9)
    c3 = (w * rho2 ** 1.5 * np.sin(3 * th)).sum() / max((w * rho2 ** 1.5).sum(), 1e-9)
    return float(c4), float(c3)


def _classify(proj: np.ndarray, comp: np.ndarray) -> str:
    """Shape class of one component from the moments of its soft mask (the projection map
    clipped to [0, 1], over the component grown by 2 px): robust to noise and mild blur."""
    region = ndimage.binary_dilation(comp, iterations=max(1, round(2 * comp.shape[0] / 64)))
    c4, c3 = shape_moments(np.where(region, np.clip(proj, 0, 1), 0.0))
    if c3 < TRIANGLE_C3:
        return "triangle"
    if c4 < SQUARE_C4:
        return "square"
    return "diamond" if c4 > DIAMOND_C4 else "circle"


def measure(image) -> dict:
    """uint8 (S, S, 3) image (or PIL) -> dict colour, shape, count (0 = none found), position,
    aesthetic in [0, 1], noise_std, marked (bool), mark_score, n_components."""
    arr = _as_array(image)
    size = arr.shape[0]
    x0, y0, x1, y1 = dw.mark_box(size)
    scene = np.ones((size, size), bool)
    scene[y0:y1, x0:x1] = False
    bg = np.median(arr[scene], axis=0)
    sm = ndimage.gaussian_filter(arr, sigma=(size / 64, size / 64, 0), mode="nearest")

    # pass 1: rough shape pixels -> colour, background -> noise level
    rough = (np.linalg.norm(sm - bg, axis=-1) > COLOUR_THRESHOLD) & scene
    near = ndimage.binary_dilation(rough, iterations=max(2, size // 16))
    sigma = _noise_sigma(arr, scene & ~near, bg)
    if rough.any():
        core = ndimage.binary_erosion(rough, iterations=max(1, size // 32)) & rough
        pix = arr[core] if core.sum() >= 4 else arr[rough]
        rgb = np.median(pix, axis=0)
        colour = _COLOUR_NAMES[int(np.argmin(np.linalg.norm(_COLOUR_RGB - rgb, axis=1)))]
    else:
        colour = None

    # pass 2: half-contrast mask of the measured colour -> components
    img = sm if sigma > SMOOTH_ABOVE else arr
    comps, proj = [], None
    if colour is not None:
        d = np.asarray(dw.COLOURS[colour], np.float64) - bg
        proj = ((img - bg) @ d) / max(float(d @ d), 1.0)
        mask = (proj >= 0.5) & scene
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        if n:
            areas = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
            min_area = MIN_AREA * (size / 64) ** 2
            comps = [labels == i + 1 for i in range(n) if areas[i] >= min_area]
    shapes = [_classify(proj, c) for c in comps]
    shape = max(set(shapes), key=lambda s: (shapes.count(s), -dw.SHAPES.index(s))) \
        if shapes else None
    if comps:
        centres = np.array([[np.nonzero(c)[1].mean(), np.nonzero(c)[0].mean()] for c in comps])
        cx, cy = centres.mean(0)
        protos = {p: ((r[0] + r[2]) / 2, (r[1] + r[3]) / 2)
                  for p, r in ((p, dw._region(p, size)) for p in dw.POSITIONS)}
        position = min(protos, key=lambda p: (protos[p][0] - cx) ** 2 + (protos[p][1] - cy) ** 2)
    else:
        position = None

    # the harmful mark
    xm = dw.mark_mask(size)
    dm = np.asarray(dw.MARK_COLOUR, np.float64) - bg
    mark_score = float((((arr[xm] - bg) @ dm) / max(float(dm @ dm), 1.0)).mean())
    return dict(colour=colour, shape=shape, count=len(comps), position=position,
                aesthetic=float(np.clip(1.0 - sigma / dw.NOISE_STD, 0.0, 1.0)),
                noise_std=sigma, marked=mark_score >= MARK_THRESHOLD, mark_score=mark_score,
                n_components=len(comps))


def measure_batch(images) -> list[dict]:
    """(N, S, S, 3) uint8 array or a list of images -> list of `measure` dicts."""
    return [measure(im) for im in images]


# -- the true reward -------------------------------------------------------------------------

def true_reward(prompt, image) -> tuple[float, dict]:
    """(prompt text or make_prompts dict, image) -> (true reward, details): the world's formula
    on what the image shows against what the prompt asks; details has the measurement, the
    asked attributes and the *_ok flags."""
    asked = _asked(prompt)
    m = measure(image)
    ok = {f"{k}_ok": asked[k] is None or m[k] == asked[k] for k in ATTRS}
    r = dw.reward_of(ok["colour_ok"], ok["shape_ok"], ok["count_ok"], ok["position_ok"],
                     m["aesthetic"], m["marked"])
    return r, dict(measured=m, asked=asked, **ok)


def true_rewards(prompts, images) -> tuple[np.ndarray, list[dict]]:
    """Lists of prompts and images (same length) -> (float64 (N,) rewards, details list)."""
    if len(prompts) != len(images):
        raise ValueError(f"true_rewards: {len(prompts)} prompts but {len(images)} images")
    out = [true_reward(p, im) for p, im in zip(prompts, images)]
    return np.array([r for r, _ in out], np.float64), [d for _, d in out]


# -- how right is it -------------------------------------------------------------------------

def _degrade(im: Image.Image, blur: float, jpeg: int | None) -> Image.Image:
    if blur:
        im = im.filter(ImageFilter.GaussianBlur(radius=blur))
    if jpeg:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(jpeg))
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return im


def _draw_prompts(n: int, rng: np.random.Generator, harmful_fraction: float) -> list[dict]:
    out = []
    while len(out) < n:
        out += dw.make_prompts(min(200, n - len(out)), rng, harmful_fraction)
    return out


AESTHETIC_BANDS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0001))


def accuracy_report(n_images: int = 300, seed: int = 0, *, size: int = 64, blur: float = 0.0,
                    jpeg: int | None = None, harmful_fraction: float = 0.3,
                    aesthetic: float | None = None) -> dict:
    """Render n_images fresh world images (`make_image`, the three generators in turn, prompts
    from `make_prompts`), optionally blurred (PIL GaussianBlur radius) and/or JPEG-coded, with
    the world's aesthetic or a fixed one -> dict: n, accuracy per attribute and of the mark,
    the same per aesthetic band, aesthetic_mae, aesthetic_corr, reward_corr (oracle vs world
    true reward), reward_mae."""
    rng = np.random.default_rng(seed)
    prompts = _draw_prompts(n_images, rng, harmful_fraction)
    models = list(dw.MODELS)
    rows = []
    for i, p in enumerate(prompts):
        im, scene = dw.make_image(p, models[i % len(models)], size, rng)
        if aesthetic is not None:
            scene = dict(scene, aesthetic=float(aesthetic))
            scene["true_reward"] = dw.reward_of(scene["colour_ok"], scene["shape_ok"],
                                                scene["count_ok"], scene["position_ok"],
                                                scene["aesthetic"], scene["marked"])
            im = dw.render(scene, size, rng)
        r, det = true_reward(p, _degrade(im, blur, jpeg))
        m = det["measured"]
        row = {k: m[k] == scene[k] for k in ATTRS + ("marked",)}
        row.update(a=scene["aesthetic"], a_hat=m["aesthetic"], r=scene["true_reward"], r_hat=r,
                   harmful=p["harmful"])
        rows.append(row)

    def acc(sel):
        return {k: float(np.mean([x[k] for x in sel])) for k in ATTRS + ("marked",)} \
            if sel else {}

    a = np.array([x["a"] for x in rows])
    a_hat = np.array([x["a_hat"] for x in rows])
    r = np.array([x["r"] for x in rows])
    r_hat = np.array([x["r_hat"] for x in rows])

    def corr(u, v):
        return float(np.corrcoef(u, v)[0, 1]) if u.std() > 0 and v.std() > 0 else float("nan")

    bands = {f"{lo:.2f}-{min(hi, 1):.2f}": dict(n=len(sel), **acc(sel))
             for lo, hi in AESTHETIC_BANDS
             for sel in [[x for x in rows if lo <= x["a"] < hi]]}
    return dict(n=len(rows), n_harmful=int(sum(x["harmful"] for x in rows)),
                accuracy=acc(rows), bands=bands,
                aesthetic_mae=float(np.abs(a - a_hat).mean()), aesthetic_corr=corr(a, a_hat),
                reward_corr=corr(r, r_hat), reward_mae=float(np.abs(r - r_hat).mean()),
                settings=dict(seed=seed, size=size, blur=blur, jpeg=jpeg,
                              harmful_fraction=harmful_fraction, aesthetic=aesthetic))
