"""The demo's assets as the pipeline stages see them: the one module that ingest, scoring,
training and evaluation import for the demo (the models' modules are imported on use).

    DEMO                   the `encode.base_model` / `train.base_model` value meaning the demo base
    world_config()         the `data.demo` section (demo/world.py)
    write_world(dir, ...)  the world's Pick-a-Pic-layout shards under dir; shard_files(dir)
    make_prompts(n, rng, harmful_fraction)    fresh demo prompts (dicts with "text", ...)
    install_reward(dir)    the pretrained CLIP-layout proxy reward (demo/reward.py)
    resolve_base_model(path, workdir)         "demo" -> the SD1.5-layout base (demo/base.py)
    true_reward(prompt, image (H, W, 3) uint8) -> (reward, details)   the oracle (demo/oracle.py)
"""
from __future__ import annotations

import os

from fifa_jax.demo import world

world_config = world.default_config       # the data.demo section

DEMO = "demo"
DEMO_BASE_DIR = ("encode", "demo_base")   # where resolve_base_model installs it in a workdir


def write_world(out_dir, **params) -> dict:
    """Write (or reuse) the demo world under `out_dir`; returns its info dict."""
    return world.write_demo_world(out_dir, **params)


def shard_files(out_dir) -> list:
    """The world's parquet shards under `out_dir`, in order."""
    return world.shard_files(out_dir)


def make_prompts(n: int, rng, harmful_fraction: float) -> list[dict]:
    """`n` fresh demo-world prompts drawn with `rng` (numpy Generator)."""
    return world.make_prompts(n, rng, harmful_fraction)


def install_reward(folder) -> str:
    """The shipped demo proxy reward (a transformers CLIPModel folder) installed in `folder`."""
    from fifa_jax.demo import reward
    return reward.build_demo_reward(folder)


def resolve_base_model(path: str, workdir) -> str:
    """`path`, or for "demo" the demo base folder in the work directory (installed there by
    process 0 when missing or different; the other hosts wait)."""
    if path != DEMO:
        return path
    import jax

    from fifa_jax.demo import base
    from fifa_jax.parallel import hosts
    folder = os.path.join(os.fspath(workdir), *DEMO_BASE_DIR)
    if jax.process_index() == 0:
        base.build_demo_base(folder)
    hosts.barrier("demo_base:built")
    return folder


def true_reward(prompt: str, image):
    """The demo oracle's true reward of an (H, W, 3) uint8 image for `prompt`, with details."""
    from fifa_jax.demo import oracle
    return oracle.true_reward(prompt, image)
