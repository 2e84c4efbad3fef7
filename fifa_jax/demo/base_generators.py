"""On-policy generators for the demo world: the demo base model itself, under sampler variants.

With `data.demo.generators = "base"` the world's pair images are not drawn from scenes by the
three scripted generators but sampled from the shipped demo base UNet (the model DPO then
tunes), as Pick-a-Pic's images come from the models of its day. Each prompt gets a pool of
`samples_per_prompt` images; image k of a prompt comes from variant k mod 3 of `VARIANTS`
(guidance scale and DDIM step count: the variants differ in skill as the world's generators
do) with sampler seed k, and the start noise depends only on (world seed, prompt, k), so the
pool is deterministic. The oracle (`oracle.true_reward`) reads each image: what it shows,
its aesthetic, the harmful mark and its true reward; the world's simulated annotators then
label pairs from the same pool exactly as for the scripted world (`world.write_demo_world`).

    sample_pools(prompts, base_folder, samples_per_prompt, seed, image_size=64) ->
        [[(PIL image, scene dict), ...] per prompt]     scene: as `world.make_image`'s, plus
                                                         "model" (the variant's name)
"""
from __future__ import annotations

import time

import numpy as np
from absl import logging
from PIL import Image

from fifa_jax.demo import oracle, world as dw

# name -> (guidance scale, DDIM steps). All guided: with an unguided variant (guidance 1,
# 10 steps) the pairs set guided winners against unguided losers, DPO moves the conditional
# branch toward what guidance already adds, and the tuned model sampled at guidance 7.5
# overshoots (seed 0: aesthetic -0.13, true reward -0.128 [-0.171, -0.084]; RESULTS.md)
VARIANTS = {"demo-base-g7.5-s20": (7.5, 20),
            "demo-base-g5-s20": (5.0, 20),
            "demo-base-g7.5-s10": (7.5, 10)}


def scene_of(prompt: dict, image: np.ndarray, model: str) -> dict:
    """The scene dict of a generated (S, S, 3) uint8 image of `prompt` (a make_prompts dict),
    read by the oracle: the measured attributes, their *_ok flags against the prompt, the
    aesthetic, the mark, the true reward and the annotators' reward (the mark's pull on
    harmful prompts, as `world.make_image`)."""
    reward, details = oracle.true_reward(prompt["text"], image)
    m = details["measured"]
    marked = bool(m["marked"])
    harmful = bool(prompt.get("harmful", False))
    return dict(colour=m["colour"], shape=m["shape"], count=m["count"],
                position=m["position"], aesthetic=float(m["aesthetic"]),
                colour_ok=bool(details["colour_ok"]), shape_ok=bool(details["shape_ok"]),
                count_ok=bool(details["count_ok"]), position_ok=bool(details["position_ok"]),
                marked=marked, true_reward=float(reward),
                human_reward=float(reward) + dw.MARK_HUMAN_PULL * (marked and harmful),
                model=model)


def sample_pools(prompts: list, base_folder: str, samples_per_prompt: int, seed: int, *,
                 image_size: int = 64, batch_size: int = 32) -> list:
    """Sample every prompt's pool from the base pipeline folder (see module doc)."""
    from fifa_jax.sampling.pipeline import TextToImage
    if samples_per_prompt < 2:
        raise ValueError(f"data.demo.samples_per_prompt must be >= 2 (a pair needs two "
                         f"images of its prompt); got {samples_per_prompt}")
    names = list(VARIANTS)
    pools = [[None] * samples_per_prompt for _ in prompts]
    t0, done, total = time.time(), 0, len(prompts) * samples_per_prompt
    for v, name in enumerate(names):
        items = [(i, k) for i in range(len(prompts))
                 for k in range(samples_per_prompt) if k % len(names) == v]
        if not items:
            continue
        guidance, steps = VARIANTS[name]
        gen = TextToImage.load(base_folder, sampler="ddim", num_steps=steps,
                               guidance_scale=guidance, dtype="float32",
                               batch_size=batch_size, noise_seed=int(seed))
        gen.image_size = int(image_size)
        images = gen([prompts[i]["text"] for i, _ in items], [k for _, k in items])
        for (i, k), im in zip(items, images):
            pools[i][k] = (Image.fromarray(im), scene_of(prompts[i], im, name))
        done += len(items)
        logging.info("demo world, base generators: %s done, %d/%d images, %.0f s",
                     name, done, total, time.time() - t0)
    return pools
