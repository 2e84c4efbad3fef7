"""Rebuild the demo world's shipped models from scratch, deterministically.

    python -m fifa_jax.demo.build_models [--out fifa_jax/demo/models] [--preset full|quick]
                                         [--unet_channels 64,128]

Writes, under --out:
  base/     SD1.5-layout pipeline: vae/ (train_vae), unet/ (train_unet, conditioned on the
            reward's text tower, frozen; that tower is text_encoder/),
            tokenizer/ (the demo CLIP BPE), scheduler/ (SD1.5 PNDM), model_index.json
  reward/   CLIP-layout proxy reward (train_clip) + tokenizer + preprocessor_config.json
  measurements.json   VAE PSNR, reward margin correlation, base-sample colour / position
                      accuracy (measure.py), the settings; samples.png: a base sample grid
Same command -> same bytes on the CPU (numpy-seeded data, fixed init, fixed JAX keys).
Order: VAE, reward, UNet (it needs the reward's text tower). The shipped build (world format
4) rebuilt byte-identical on 2026-12-07 in 13 min 40 s wall on 2 CPU cores shared with demo
runs (VAE 127 s, reward 66 s, UNet 612 s, sample check 13 s; 2.0 GB peak RSS).
`--preset quick` runs every step with a few updates each in 1-2 minutes (a smoke test; its
models are useless). Shipped files: 6.6 MB (float32 weights).
`fifa_jax.demo.base.build_demo_base` and `fifa_jax.demo.reward.build_demo_reward`
install the shipped base/ and reward/ folders.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
from absl import app, flags, logging

PRESETS = {
    "full": dict(vae=dict(steps=600, batch=16, n_images=2000),
                 unet=dict(steps=2400, batch=16, n_images=4000),
                 clip=dict(steps=500, batch=32, n_pairs=4000),
                 eval_images=64, eval_pairs=1000, n_seeds=2),
    "quick": dict(vae=dict(steps=2, batch=2, n_images=8),
                  unet=dict(steps=2, batch=2, n_images=8),
                  clip=dict(steps=2, batch=4, n_pairs=8),
                  eval_images=4, eval_pairs=16, n_seeds=0),
}
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")


def _json_bytes(d) -> bytes:
    return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_base(folder: str, vae, unet, text_encoder) -> None:
    from fifa_jax.models.clip_io import save_text_encoder
    from fifa_jax.models.unet_io import save_unet
    from fifa_jax.models.vae_io import save_vae
    from fifa_jax.demo.reward import tokenizer_files
    from fifa_jax.demo.base import MODEL_INDEX, SCHEDULER_CONFIG
    save_vae(vae, os.path.join(folder, "vae"))
    save_unet(unet, os.path.join(folder, "unet"))
    save_text_encoder(text_encoder, os.path.join(folder, "text_encoder"))
    for name, data in tokenizer_files().items():
        _write(os.path.join(folder, "tokenizer", name), data)
    _write(os.path.join(folder, "scheduler", "scheduler_config.json"),
           _json_bytes(SCHEDULER_CONFIG))
    _write(os.path.join(folder, "model_index.json"), _json_bytes(MODEL_INDEX))


def write_reward(folder: str, model) -> None:
    from fifa_jax.demo.train_clip import IMAGE_SIZE
    from fifa_jax.models.clip_io import save_clip
    from fifa_jax.demo.reward import preprocessor_config, tokenizer_files
    save_clip(model, folder)
    for name, data in tokenizer_files().items():
        _write(os.path.join(folder, name), data)
    _write(os.path.join(folder, "preprocessor_config.json"), preprocessor_config(IMAGE_SIZE))


def measure_vae(vae, n: int, seed: int) -> dict:
    """PSNR of decode(mean(encode(x))) on fresh world images, and on noise-free renders."""
    from fifa_jax.demo import train_vae, world_data
    from fifa_jax.demo import world as dw
    data = world_data.draw(n, seed=500 + seed)
    rng = np.random.default_rng([seed, 12])
    clean = np.stack([np.asarray(dw.render(dict(s, aesthetic=1.0), 64, rng))
                      for s in data.scenes])
    return {"psnr_world": round(train_vae.psnr(train_vae.reconstruct(vae, data.images),
                                               data.images), 2),
            "psnr_clean": round(train_vae.psnr(train_vae.reconstruct(vae, clean), clean), 2),
            "n_images": n}


def build(out: str, preset: str = "full", seed: int = 0, unet_channels=None) -> dict:
    """Train and write everything (see the module docstring); -> the measurements.
    unet_channels: the base UNet's block_out_channels (None: the shipped (32, 64))."""
    from PIL import Image
    from fifa_jax.demo import measure, train_clip, train_unet, train_vae
    p = PRESETS[preset]
    unet_cfg = train_unet.unet_config(unet_channels)      # checked before any training
    out = os.path.abspath(out)
    for sub in ("base", "reward"):
        if os.path.isdir(os.path.join(out, sub)):
            shutil.rmtree(os.path.join(out, sub))
    seconds, m = {}, {"preset": preset, "seed": seed, "settings": p}
    if unet_channels is not None:
        m["unet_channels"] = unet_cfg["block_out_channels"]

    t = time.time()
    vae, m["vae"] = train_vae.train(seed=seed, **p["vae"])
    m["vae"].update(measure_vae(vae, p["eval_images"], seed))
    seconds["vae"] = time.time() - t

    t = time.time()
    reward, m["reward"] = train_clip.train(seed=seed, **p["clip"])
    write_reward(os.path.join(out, "reward"), reward)
    pairs = train_clip.draw_pairs(p["eval_pairs"], seed=400 + seed)
    m["reward"].update(train_clip.margin_correlation(train_clip.pair_scores(reward, pairs),
                                                     pairs["rewards"]))
    seconds["reward"] = time.time() - t

    t = time.time()   # the base conditions on the reward's text tower, frozen (as SD on CLIP's)
    unet, text, m["unet"] = train_unet.train(vae, seed=seed, text_encoder=reward.text_model,
                                             config=unet_cfg, **p["unet"])
    write_base(os.path.join(out, "base"), vae, unet, text)
    seconds["unet"] = time.time() - t

    if p["n_seeds"]:
        t = time.time()
        m["samples"], images, _ = measure.sample_report(os.path.join(out, "base"),
                                                        n_seeds=p["n_seeds"])
        m["samples"]["reference"] = measure.world_reference()
        Image.fromarray(measure.grid(images, cols=p["n_seeds"] * 5)).save(
            os.path.join(out, "samples.png"))
        seconds["samples"] = time.time() - t
    _write(os.path.join(out, "measurements.json"), _json_bytes(m))
    logging.info("demo models built in %s: %s", out,
                 {k: round(v) for k, v in seconds.items()})
    return dict(m, seconds=seconds)


_OUT = flags.DEFINE_string("out", DEFAULT_OUT, "folder to write base/, reward/ into")
_PRESET = flags.DEFINE_enum("preset", "full", list(PRESETS), "full: the shipped models; "
                            "quick: a few steps each (smoke test)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of every draw and init")
_UNET_CHANNELS = flags.DEFINE_list("unet_channels", None, "the base UNet's block_out_channels, "
                                   "two ints (default: the shipped 32,64; 64,128 is the wider "
                                   "base of benchmarks/RESULTS.md's #24 diagnosis)")


def main(argv):
    del argv
    res = build(_OUT.value, _PRESET.value, _SEED.value, _UNET_CHANNELS.value)
    print(json.dumps(res, indent=2, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
