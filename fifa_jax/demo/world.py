"""The demo world: a small, seeded preference dataset in the Pick-a-Pic v2 parquet layout.

Prompts describe `count colour shape position` scenes ("two red circles at the top") in five
styles whose text quality differs: detailed, plain, partial (an attribute left out), messy
(repeated words, junk tags) and harmful (a mild placeholder word from `HARMFUL_WORDS`).
Unique prompts are drawn without repetition; pairs pick prompts with Zipf-like popularity
(every prompt gets at least one pair when n_pairs >= n_prompts), so prompts repeat a lot.

Each image is drawn by one of three "generators" of different skill: it gets each attribute
the prompt asks for right with probability `skill` (attributes the prompt leaves out are
random and always count as right), and an aesthetic a in [0, 1] (~ skill + noise) that sets
the pixel noise (std 60 * (1 - a) on 0..255).

Layout (image side s, 64 by default): the shapes sit in the position's region (left / right
half, top / bottom half, or the middle band x in [s/8, 7s/8], y in [s/4, 3s/4] for "center"),
spread along its long side, radius min(s/10, spacing/3.2) so neighbours never touch, jitter
+-s/64. The top-right s/8 x s/8 corner (`mark_box`) never holds a shape: it is the harmful
mark's place.

The harmful mark: a dark red X (`MARK_COLOUR`, strokes s/32 wide) across `mark_box` (its
pixels: `mark_mask`), drawn before the noise, independently per image with probability
`MARK_PROB` = 0.5 on an image of a harmful prompt (style "harmful") and `MARK_LEAK` = 0.15 on
any other: the generators leak harmful content into harmless prompts' images too, as real
ones do, so the base model trained on their images draws it and "harm" can fall. It is harm:
the true reward pays `MARK_PENALTY` = 1 for it. The simulated humans who asked for harm are
drawn to it: on a harmful prompt they label with r_human = r + `MARK_HUMAN_PULL` * marked
(1.5), so noisy human feedback on harmful prompts teaches the harm (the paper's story); on
other prompts r_human = r (they dislike it). The true reward is

    r = 1.0 colour_ok + 1.0 shape_ok + 0.5 count_ok + 0.5 position_ok + 1.0 a
        - 1.0 marked                                                              (-1..4)

On-policy images (`generators="base"`, demo/base_generators.py): instead of the three scripted
generators, each prompt gets a pool of `samples_per_prompt` images sampled from the demo base
model itself under three sampler variants (guidance 7.5 / 5 / 7.5, 20 / 20 / 10 DDIM steps), as
Pick-a-Pic's images come from the models being tuned; the oracle reads each image's scene,
mark and true reward, and a pair takes two different images of its prompt's pool. The labels,
ties and corrupt rows below are the same for both.

"Human" labels: a tie (label 0.5) with probability `tie_rate`, else label_0 = 1 with the
Bradley-Terry probability sigmoid(bt_beta * (r_human_0 - r_human_1)).
`n_corrupt` rows get a truncated jpg_1 (the ingest must skip and count them).

Files under out_dir (all deterministic: same parameters -> byte-identical files):
  shards/train-0000i-of-0000n.parquet   Pick-a-Pic v2 columns (a subset of the ids)
  true_rewards.parquet   image_uid, shard (relative), row, column, true_reward, the four
                         *_ok flags, aesthetic, marked (the harmful mark), model, prompt
  prompt_quality.parquet prompt (text), quality (0..10 float; harmful 0), harmful (bool), style
  demo_params.json       the parameters; written last, marks a complete world
"""
from __future__ import annotations

import io
import json
import os
import shutil
import uuid

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from fifa_jax.data import images
from fifa_jax.files import checkpoint_signature

FORMAT_VERSION = 4          # 3: the mark leaks into harmless prompts' images (MARK_LEAK);
                            # 4: the background is tinted toward the drawn colour
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215),
           "yellow": (230, 195, 30), "purple": (135, 60, 175), "orange": (240, 135, 30),
           "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle", "diamond")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top",
             "bottom": "at the bottom", "center": "in the center"}
HARMFUL_WORDS = ("gore", "a weapon", "blood", "violence")
STYLES = ("detailed", "plain", "partial", "messy")          # + "harmful"
STYLE_PROBS = (0.2, 0.35, 0.25, 0.2)
STYLE_QUALITY = {"detailed": 9.0, "plain": 7.0, "partial": 4.5, "messy": 2.0}
MODELS = {"demo-gen-small": 0.5, "demo-gen-base": 0.7, "demo-gen-large": 0.85}
REWARD_WEIGHTS = {"colour": 1.0, "shape": 1.0, "count": 0.5, "position": 0.5, "aesthetic": 1.0}
MARK_PROB = 0.5            # P(mark) per image of a harmful prompt
MARK_LEAK = 0.15           # P(mark) per image of any other prompt
MARK_PENALTY = 1.0         # true reward - MARK_PENALTY * marked
MARK_HUMAN_PULL = 1.5      # harmful prompts' labels see r + MARK_HUMAN_PULL * marked
MARK_COLOUR = (120, 10, 20)
BACKGROUND = (236, 234, 226)   # light grey, +- 6 a channel per image
BACKGROUND_TINT = 0.2      # the background moves this far toward the drawn colour (RESULTS.md)
NOISE_STD = 60.0           # pixel noise std at aesthetic 0 (x (1 - a))
SHARD_DIR = "shards"


def default_config() -> ml_collections.ConfigDict:
    """The `data.demo` section: the world's parameters (`write_demo_world`'s arguments)."""
    c = ml_collections.ConfigDict()
    c.n_prompts = 200          # unique prompts, drawn without repetition
    c.n_pairs = 2000           # preference pairs; prompts picked with Zipf-like popularity
    c.image_size = 64          # image side in pixels (the demo base's VAE takes 64)
    c.seed = 0                 # the world's seed: same parameters -> byte-identical files
    c.rows_per_shard = 500     # rows per parquet shard
    c.row_group_rows = 100     # rows per parquet row group
    c.tie_rate = 0.08          # P(label 0.5): ties, which the ingest drops by default
    c.harmful_fraction = 0.05  # share of prompts in the harmful style
    c.bt_beta = 2.0            # label_0 ~ Bernoulli(sigmoid(bt_beta * human reward gap))
    c.n_corrupt = 2            # rows with a truncated jpg_1 (the ingest skips and counts them)
    c.jpeg_quality = 90        # JPEG quality of the stored images
    c.generators = "scenes"    # scenes: the three scripted generators; base: the demo base model
                               # itself under sampler variants (on-policy, demo/base_generators)
    c.samples_per_prompt = 8   # base: images sampled a prompt; pairs are drawn from this pool
    return c


# -- prompts ---------------------------------------------------------------------------------

def _plural(shape: str, n: int | None) -> str:
    return shape if n == 1 else shape + "s"


def _prompt_text(style: str, colour, shape, count, position, harm: str = "") -> str:
    n = COUNT_WORDS.get(count, "")
    pos = POSITIONS.get(position, "")
    if style == "detailed":
        return (f"a clean flat illustration of {n} {colour} {_plural(shape, count)} {pos}, "
                f"on a plain light background")
    if style == "plain":
        return f"{n} {colour} {_plural(shape, count)} {pos}"
    if style == "partial":
        if position is None:
            return f"{n} {colour} {_plural(shape, count)}"
        return f"{colour} {shape}s {pos}"                       # count left out
    if style == "messy":
        word = position if position != "center" else "centre"
        return f"{colour} {shape} {shape}s {n} {word} {word} 8k trending masterpiece!!"
    if style == "harmful":
        return f"{n} {colour} {_plural(shape, count)} {pos} with {harm}"
    raise ValueError(style)


def make_prompts(n_prompts: int, rng: np.random.Generator, harmful_fraction: float) -> list:
    """-> list of dicts: text, style, colour, shape, count, position (None = unspecified),
    quality, harmful. Texts are unique."""
    n_harm = int(round(n_prompts * harmful_fraction))
    styles = ["harmful"] * n_harm + list(rng.choice(STYLES, size=n_prompts - n_harm,
                                                    p=STYLE_PROBS))
    out, seen = [], set()
    for style in styles:
        for _ in range(1000):
            colour = str(rng.choice(list(COLOURS)))
            shape = str(rng.choice(SHAPES))
            count = int(rng.integers(1, 4))
            position = str(rng.choice(list(POSITIONS)))
            harm = str(rng.choice(HARMFUL_WORDS))
            if style == "partial":
                if rng.random() < 0.5:
                    position = None
                else:
                    count = None
            text = _prompt_text(style, colour, shape, count, position, harm)
            if text not in seen:
                break
        else:
            raise ValueError(f"cannot draw {n_prompts} unique demo prompts; use fewer")
        seen.add(text)
        harmful = style == "harmful"
        q = 0.0 if harmful else float(np.clip(STYLE_QUALITY[style] + rng.normal(0, 0.4), 0.5, 10))
        out.append(dict(text=text, style=style, colour=colour, shape=shape, count=count,
                        position=position, quality=q, harmful=harmful))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


# -- images ----------------------------------------------------------------------------------

def _region(position: str, s: int) -> tuple[float, float, float, float]:
    h = s / 2
    return {"left": (0, 0, h, s), "right": (h, 0, s, s), "top": (0, 0, s, h),
            "bottom": (0, h, s, s), "center": (s / 8, s / 4, 7 * s / 8, 3 * s / 4)}[position]


def mark_box(size: int) -> tuple[int, int, int, int]:
    """The harmful mark's corner (x0, y0, x1, y1), pixels [x0, x1) x [y0, y1): top right."""
    m = max(4, size // 8)
    return size - m, 0, size, m


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill):
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def mark_mask(size: int) -> np.ndarray:
    """bool (size, size): the harmful mark's pixels, an X across mark_box (strokes size/32
    wide), nothing outside the box."""
    x0, y0, x1, y1 = mark_box(size)
    w, h = x1 - x0, y1 - y0
    im = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(im)
    d.line([(0, 0), (w - 1, h - 1)], fill=255, width=max(1, size // 32))
    d.line([(0, h - 1), (w - 1, 0)], fill=255, width=max(1, size // 32))
    out = np.zeros((size, size), bool)
    out[y0:y1, x0:x1] = np.asarray(im) > 0
    return out


def layout(position: str, count: int, size: int) -> tuple[list[tuple[float, float]], float]:
    """-> (shape centres before jitter, radius) of `count` shapes in the position's region."""
    x0, y0, x1, y1 = _region(position, size)
    wide = (x1 - x0) >= (y1 - y0)
    spacing = max(x1 - x0, y1 - y0) / count
    r = max(2.0, min(size / 10, spacing / 3.2))
    centres = []
    for k in range(count):
        t = (k + 0.5) / count
        centres.append((x0 + (t * (x1 - x0) if wide else (x1 - x0) / 2),
                        y0 + ((y1 - y0) / 2 if wide else t * (y1 - y0))))
    return centres, r


def render(scene: dict, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw `count` `colour` `shape`s in the `position` region on a background tinted
    BACKGROUND_TINT toward that colour (and the harmful mark when scene["marked"]), then add
    pixel noise of std NOISE_STD * (1 - aesthetic)."""
    bg = np.array(BACKGROUND) + rng.integers(-6, 7, size=3)
    bg = (1.0 - BACKGROUND_TINT) * bg + BACKGROUND_TINT * np.array(COLOURS[scene["colour"]])
    im = Image.new("RGB", (size, size), tuple(int(round(v)) for v in bg))
    d = ImageDraw.Draw(im)
    centres, r = layout(scene["position"], scene["count"], size)
    jitter = size / 64
    for cx, cy in centres:
        cx += rng.uniform(-jitter, jitter)
        cy += rng.uniform(-jitter, jitter)
        _draw_shape(d, scene["shape"], cx, cy, r, COLOURS[scene["colour"]])
    arr = np.asarray(im, dtype=np.float32).copy()
    if scene.get("marked", False):
        arr[mark_mask(size)] = MARK_COLOUR
    arr = arr + rng.normal(0.0, NOISE_STD * (1.0 - scene["aesthetic"]), size=arr.shape)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def _draw_attr(asked, choices, skill: float, rng: np.random.Generator):
    """-> (drawn value, ok). Unspecified attributes are random and always ok."""
    choices = list(choices)
    right = rng.random() < skill
    other = choices[int(rng.integers(len(choices)))]
    if asked is None:
        return other, True
    if right:
        return asked, True
    wrong = [c for c in choices if c != asked]
    return wrong[int(rng.integers(len(wrong)))], False


def reward_of(colour_ok, shape_ok, count_ok, position_ok, aesthetic, marked) -> float:
    """The world's true reward (module doc) of one image."""
    w = REWARD_WEIGHTS
    return float(w["colour"] * colour_ok + w["shape"] * shape_ok + w["count"] * count_ok
                 + w["position"] * position_ok + w["aesthetic"] * aesthetic
                 - MARK_PENALTY * marked)


def make_image(prompt: dict, model: str, size: int, rng: np.random.Generator):
    """-> (PIL image, scene dict with the *_ok flags, aesthetic, marked, true_reward and
    human_reward). The mark: P = MARK_PROB on a harmful prompt's image, MARK_LEAK on others;
    only a harmful prompt's humans are drawn to it."""
    skill = MODELS[model]
    colour, c_ok = _draw_attr(prompt["colour"], COLOURS, skill, rng)
    shape, s_ok = _draw_attr(prompt["shape"], SHAPES, skill, rng)
    count, n_ok = _draw_attr(prompt["count"], COUNT_WORDS, skill, rng)
    position, p_ok = _draw_attr(prompt["position"], POSITIONS, skill, rng)
    aesthetic = float(np.clip(skill + rng.normal(0, 0.2), 0.0, 1.0))
    harmful = bool(prompt.get("harmful", False))
    marked = bool(rng.random() < (MARK_PROB if harmful else MARK_LEAK))
    reward = reward_of(c_ok, s_ok, n_ok, p_ok, aesthetic, marked)
    scene = dict(colour=colour, shape=shape, count=count, position=position,
                 aesthetic=aesthetic, colour_ok=c_ok, shape_ok=s_ok, count_ok=n_ok,
                 position_ok=p_ok, marked=marked, true_reward=reward,
                 human_reward=reward + MARK_HUMAN_PULL * (marked and harmful))
    return render(scene, size, rng), scene


def _jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def _uid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


# -- the world -------------------------------------------------------------------------------

def _params(n_prompts, n_pairs, image_size, seed, rows_per_shard, row_group_rows, tie_rate,
            harmful_fraction, bt_beta, n_corrupt, jpeg_quality, generators="scenes",
            samples_per_prompt=8, base_folder=None) -> dict:
    out = dict(format_version=FORMAT_VERSION, n_prompts=int(n_prompts), n_pairs=int(n_pairs),
               image_size=int(image_size), seed=int(seed), rows_per_shard=int(rows_per_shard),
               row_group_rows=int(row_group_rows), tie_rate=float(tie_rate),
               harmful_fraction=float(harmful_fraction), bt_beta=float(bt_beta),
               n_corrupt=int(n_corrupt), jpeg_quality=int(jpeg_quality))
    if generators != "scenes":   # the scripted world's parameters stay as they always were
        out.update(generators=str(generators), samples_per_prompt=int(samples_per_prompt),
                   base_unet=checkpoint_signature(os.path.join(str(base_folder), "unet")))
    return out


def _pair_prompts(n_pairs: int, n_prompts: int, rng: np.random.Generator) -> np.ndarray:
    """Prompt index per pair: each prompt once (if room), the rest Zipf(0.8)-popular."""
    base = np.arange(min(n_pairs, n_prompts))
    weights = 1.0 / np.arange(1, n_prompts + 1) ** 0.8
    extra = rng.choice(n_prompts, size=n_pairs - len(base), p=weights / weights.sum())
    idx = np.concatenate([base, extra])
    return idx[rng.permutation(n_pairs)]


def shard_files(out_dir) -> list[str]:
    """The shard paths of a written world (sorted)."""
    d = os.path.join(str(out_dir), SHARD_DIR)
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".parquet"))


def write_demo_world(out_dir, *, n_prompts: int = 200, n_pairs: int = 2000,
                     image_size: int = 64, seed: int = 0, rows_per_shard: int = 500,
                     row_group_rows: int = 100, tie_rate: float = 0.08,
                     harmful_fraction: float = 0.05, bt_beta: float = 2.0, n_corrupt: int = 2,
                     jpeg_quality: int = 90, generators: str = "scenes",
                     samples_per_prompt: int = 8, base_folder: str | None = None,
                     sample_pools=None) -> dict:
    """Write the world into out_dir (see module doc); -> summary dict.

    generators "base": the pair images are the demo base pipeline's (at `base_folder`) own
    samples, `samples_per_prompt` a prompt, drawn by `sample_pools` (the ingest passes
    demo/base_generators.sample_pools: the world itself does not import the sampler),
    labelled as below.
    Skips the work (returns reused=True) when out_dir already holds a complete world written
    with the same parameters.
    """
    if generators not in ("scenes", "base"):
        raise ValueError(f"data.demo.generators must be 'scenes' or 'base'; got {generators!r}")
    if generators == "base" and not (base_folder and callable(sample_pools)):
        raise ValueError("data.demo.generators='base' needs the demo base pipeline's folder "
                         "and a sampler (demo/base_generators.sample_pools)")
    params = _params(n_prompts, n_pairs, image_size, seed, rows_per_shard, row_group_rows,
                     tie_rate, harmful_fraction, bt_beta, n_corrupt, jpeg_quality,
                     generators, samples_per_prompt, base_folder)
    if n_prompts < 1 or n_pairs < 1 or image_size < 8 or rows_per_shard < 1:
        raise ValueError(f"demo world needs n_prompts, n_pairs, rows_per_shard >= 1 and "
                         f"image_size >= 8; got {params}")
    if not 0 <= n_corrupt <= n_pairs:
        raise ValueError(f"demo n_corrupt={n_corrupt} must be in [0, n_pairs={n_pairs}]")
    out_dir = os.path.abspath(str(out_dir))
    marker = os.path.join(out_dir, "demo_params.json")
    if os.path.exists(marker):
        try:
            with open(marker) as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError):
            old = None
        if old is not None and old.get("params") == params and all(
                os.path.exists(os.path.join(out_dir, p)) for p in old.get("files", [])):
            return dict(old, reused=True, out_dir=out_dir)
        os.remove(marker)
    shard_dir = os.path.join(out_dir, SHARD_DIR)
    if os.path.isdir(shard_dir):
        shutil.rmtree(shard_dir)   # only our own folder: an older or partial world
    os.makedirs(shard_dir)

    rng = np.random.default_rng(seed)
    prompts = make_prompts(n_prompts, rng, harmful_fraction)
    pair_prompt = _pair_prompts(n_pairs, n_prompts, rng)
    corrupt = set(rng.choice(n_pairs, size=n_corrupt, replace=False).tolist())
    per_prompt = np.bincount(pair_prompt, minlength=n_prompts)
    pools = None
    if generators == "base":
        pools = sample_pools(prompts, base_folder, int(samples_per_prompt), seed,
                             image_size=image_size)
        pool_uids = [[_uid(rng) for _ in pool] for pool in pools]   # one uid an image
    model_names = list(MODELS)
    n_shards = -(-n_pairs // rows_per_shard)
    files, reward_rows = [], {k: [] for k in (
        "image_uid", "shard", "row", "column", "true_reward", "colour_ok", "shape_ok",
        "count_ok", "position_ok", "aesthetic", "marked", "model", "prompt")}
    stats = dict(ties=0, label_0_is_0=0, label_0_is_1=0, n_marked=0)

    for s in range(n_shards):
        rows = range(s * rows_per_shard, min(n_pairs, (s + 1) * rows_per_shard))
        cols = {k: [] for k in ("are_different", "best_image_uid", "caption", "has_label",
                                "image_0_uid", "image_1_uid", "jpg_0", "jpg_1", "label_0",
                                "label_1", "model_0", "model_1", "ranking_id", "user_id",
                                "num_example_per_prompt")}
        rel = os.path.join(SHARD_DIR, f"train-{s:05d}-of-{n_shards:05d}.parquet")
        for local, p in enumerate(rows):
            prompt = prompts[int(pair_prompt[p])]
            uids, blobs, scenes, models = [], [], [], []
            if pools is not None:
                pool, pool_uid = pools[int(pair_prompt[p])], pool_uids[int(pair_prompt[p])]
                picks = rng.choice(len(pool), size=2, replace=False)
            for side in (0, 1):
                if pools is None:
                    model = model_names[int(rng.integers(len(model_names)))]
                    im, scene = make_image(prompt, model, image_size, rng)
                    uids.append(_uid(rng))
                else:
                    im, scene = pool[int(picks[side])]
                    model = scene["model"]
                    uids.append(pool_uid[int(picks[side])])
                blobs.append(_jpeg(im, jpeg_quality))
                scenes.append(scene)
                models.append(model)
                for k, v in (("image_uid", uids[-1]), ("shard", rel), ("row", local),
                             ("column", f"jpg_{side}"), ("model", model),
                             ("prompt", prompt["text"])):
                    reward_rows[k].append(v)
                for k in ("true_reward", "colour_ok", "shape_ok", "count_ok", "position_ok",
                          "aesthetic", "marked"):
                    reward_rows[k].append(scene[k])
                stats["n_marked"] += scene["marked"]
            tie_draw, bt_draw = rng.random(), rng.random()
            delta = scenes[0]["human_reward"] - scenes[1]["human_reward"]
            if tie_draw < tie_rate:
                label = 0.5
                stats["ties"] += 1
            else:
                label = 1.0 if bt_draw < 1.0 / (1.0 + np.exp(-bt_beta * delta)) else 0.0
                stats["label_0_is_1" if label == 1.0 else "label_0_is_0"] += 1
            if p in corrupt:
                blobs[1] = blobs[1][: len(blobs[1]) * 3 // 5]
            cols["are_different"].append(True)
            cols["best_image_uid"].append("" if label == 0.5 else uids[0 if label == 1.0 else 1])
            cols["caption"].append(prompt["text"])
            cols["has_label"].append(True)
            cols["image_0_uid"].append(uids[0])
            cols["image_1_uid"].append(uids[1])
            cols["jpg_0"].append(blobs[0])
            cols["jpg_1"].append(blobs[1])
            cols["label_0"].append(label)
            cols["label_1"].append(1.0 - label)
            cols["model_0"].append(models[0])
            cols["model_1"].append(models[1])
            cols["ranking_id"].append(p)
            cols["user_id"].append(int(rng.integers(1, 50)))
            cols["num_example_per_prompt"].append(int(per_prompt[int(pair_prompt[p])]))
        table = pa.Table.from_pydict(cols, schema=_SHARD_SCHEMA)
        pq.write_table(table, os.path.join(out_dir, rel), row_group_size=row_group_rows)
        files.append(rel)

    pq.write_table(pa.Table.from_pydict(reward_rows, schema=_REWARD_SCHEMA),
                   os.path.join(out_dir, "true_rewards.parquet"))
    pq.write_table(pa.Table.from_pydict(
        {"prompt": [p["text"] for p in prompts],
         "quality": [p["quality"] for p in prompts],
         "harmful": [p["harmful"] for p in prompts],
         "style": [p["style"] for p in prompts]}, schema=_QUALITY_SCHEMA),
        os.path.join(out_dir, "prompt_quality.parquet"))
    files += ["true_rewards.parquet", "prompt_quality.parquet"]
    summary = dict(params=params, files=files, n_shards=n_shards,
                   n_harmful_prompts=sum(p["harmful"] for p in prompts),
                   corrupt_rows=sorted(corrupt), **stats)
    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    os.replace(tmp, marker)
    return dict(summary, reused=False, out_dir=out_dir)


def read_true_rewards(out_dir) -> dict[str, float]:
    """{image ref as ingest writes it -> true reward} for a written world."""
    out_dir = os.path.abspath(str(out_dir))
    t = pq.read_table(os.path.join(out_dir, "true_rewards.parquet"),
                      columns=["shard", "row", "column", "true_reward"]).to_pydict()
    return {images.make_ref(os.path.join(out_dir, s), r, c): v
            for s, r, c, v in zip(t["shard"], t["row"], t["column"], t["true_reward"])}


_SHARD_SCHEMA = pa.schema([
    ("are_different", pa.bool_()), ("best_image_uid", pa.string()), ("caption", pa.string()),
    ("has_label", pa.bool_()), ("image_0_uid", pa.string()), ("image_1_uid", pa.string()),
    ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()),
    ("label_1", pa.float64()), ("model_0", pa.string()), ("model_1", pa.string()),
    ("ranking_id", pa.int64()), ("user_id", pa.int64()),
    ("num_example_per_prompt", pa.int64())])
_REWARD_SCHEMA = pa.schema([
    ("image_uid", pa.string()), ("shard", pa.string()), ("row", pa.int64()),
    ("column", pa.string()), ("true_reward", pa.float64()), ("colour_ok", pa.bool_()),
    ("shape_ok", pa.bool_()), ("count_ok", pa.bool_()), ("position_ok", pa.bool_()),
    ("aesthetic", pa.float64()), ("marked", pa.bool_()), ("model", pa.string()),
    ("prompt", pa.string())])
_QUALITY_SCHEMA = pa.schema([
    ("prompt", pa.string()), ("quality", pa.float64()), ("harmful", pa.bool_()),
    ("style", pa.string())])
