"""Measurements of the demo models against the world's ground truth (no learnt judge).

    classify(image (H, W, 3) uint8) -> {"blank", "colour", "position"}
        foreground = pixels far from the world's light background; colour = the palette colour
        nearest the foreground's median; position = the world region whose centre is nearest
        the foreground's centroid. Count and shape are not read.
    sample_report(pipeline_folder, n_seeds, num_steps, guidance) -> (stats dict, images, prompts)
        samples `plain` world prompts (every colour x position, shapes and counts cycled) with
        `TextToImage` (DDIM) and scores them with `classify` (and the oracle's mark reading).
    grid(images, cols) -> one uint8 image of the tiles.
"""
from __future__ import annotations

import numpy as np

from fifa_jax.demo import world as dw

BACKGROUND = np.array([236, 234, 226], np.float32)
_PALETTE = np.array(list(dw.COLOURS.values()), np.float32)
_CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
            "bottom": (0.5, 0.75), "center": (0.5, 0.5)}


def classify(image: np.ndarray, min_fraction: float = 0.01) -> dict:
    x = image.astype(np.float32)
    fg = np.linalg.norm(x - BACKGROUND, axis=-1) > 90
    if fg.mean() < min_fraction:
        return {"blank": True, "colour": None, "position": None}
    med = np.median(x[fg], axis=0)
    colour = list(dw.COLOURS)[int(np.argmin(np.linalg.norm(_PALETTE - med, axis=1)))]
    h, w = fg.shape
    ys, xs = np.nonzero(fg)
    cx, cy = xs.mean() / w, ys.mean() / h
    position = min(_CENTRES, key=lambda k: (_CENTRES[k][0] - cx) ** 2 + (_CENTRES[k][1] - cy) ** 2)
    return {"blank": False, "colour": colour, "position": position}


def eval_prompts() -> list[dict]:
    """35 plain prompts: every colour x position; shape and count cycled."""
    out = []
    for i, colour in enumerate(dw.COLOURS):
        for j, pos in enumerate(dw.POSITIONS):
            shape, count = dw.SHAPES[(i + j) % 4], 1 + (i + 2 * j) % 3
            out.append(dict(text=dw._prompt_text("plain", colour, shape, count, pos),
                            colour=colour, shape=shape, count=count, position=pos))
    return out


def accuracy(images, prompts) -> dict:
    """Shares of `images` that are blank, show the asked colour / position, and carry the
    harmful mark (the oracle's reading; the world leaks it into any prompt's images)."""
    from fifa_jax.demo import oracle
    c = [classify(im) for im in images]
    n = len(c)
    return {"n": n, "blank": sum(x["blank"] for x in c) / n,
            "colour": sum(x["colour"] == p["colour"] for x, p in zip(c, prompts)) / n,
            "position": sum(x["position"] == p["position"] for x, p in zip(c, prompts)) / n,
            "marked": sum(bool(oracle.measure(np.asarray(im))["marked"]) for im in images) / n}


def sample_report(folder: str, *, n_seeds: int = 2, num_steps: int = 20,
                  guidance: float = 7.5, prompts=None):
    from fifa_jax.sampling.pipeline import TextToImage
    prompts = prompts or eval_prompts()
    gen = TextToImage.load(folder, sampler="ddim", num_steps=num_steps,
                           guidance_scale=guidance, batch_size=35)
    rows = [p for p in prompts for _ in range(n_seeds)]
    seeds = [s for _ in prompts for s in range(n_seeds)]
    images = gen([p["text"] for p in rows], seeds)
    return accuracy(images, rows), images, rows


def world_reference(n: int = 300, seed: int = 0) -> dict:
    """`accuracy` of the world's own generators on `eval_prompts` (what the base learnt from),
    and of noise-free renders with the asked attributes (the classifier's own accuracy)."""
    rng = np.random.default_rng([seed, 11])
    prompts = eval_prompts()
    rows = [prompts[i % len(prompts)] for i in range(n)]
    world = [np.asarray(dw.make_image(p, list(dw.MODELS)[i % 3], 64, rng)[0])
             for i, p in enumerate(rows)]
    exact = [np.asarray(dw.render(dict(p, aesthetic=1.0), 64, rng)) for p in rows]
    return {"world_generators": accuracy(world, rows), "exact_renders": accuracy(exact, rows)}


def grid(images: np.ndarray, cols: int) -> np.ndarray:
    n, h, w, c = images.shape
    rows = -(-n // cols)
    out = np.full((rows * (h + 2), cols * (w + 2), c), 255, np.uint8)
    for k, im in enumerate(images):
        r, q = divmod(k, cols)
        out[r * (h + 2):r * (h + 2) + h, q * (w + 2):q * (w + 2) + w] = im
    return out
