"""Generate images from a diffusers pipeline folder (a base model or an exported one).

    python -m fifa_jax.generate --model WORKDIR/export/pipeline --prompt "two red circles" \\
        --out /tmp/images [--num 4] [--seed 0] [--sampler ddim] [--steps 50] [--guidance 7.5]
        [--size 512] [--lora WORKDIR/export/lora]
    python -m fifa_jax.generate --model DIR --prompts prompts.txt --out DIR   # one per line

Writes OUT/<index>_<seed>.png and OUT/prompts.json (file -> prompt, seed, settings). The
start noise depends only on (prompt, seed, --noise-seed), so the same command with a base and
a tuned pipeline gives directly comparable images. Flags are checked before the model loads
(--num, --steps, --batch_size >= 1; --guidance in [0, 100]; --size a multiple of the VAE factor
times the UNet's downsampling), and a prompt longer than the text encoder reads is named.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

_MODEL = flags.DEFINE_string("model", None, "diffusers pipeline folder (model_index.json)")
_UNET = flags.DEFINE_string("unet", None, "another UNet folder to use (e.g. export/unet)")
_LORA = flags.DEFINE_string("lora", None, "a diffusers LoRA folder (e.g. export/lora, "
                            "pytorch_lora_weights.safetensors) merged into the UNet")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "a prompt (repeatable)")
_PROMPTS = flags.DEFINE_string("prompts", None, "a text file, one prompt per line")
_OUT = flags.DEFINE_string("out", None, "output folder")
_NUM = flags.DEFINE_integer("num", 1, "images per prompt (seeds seed..seed+num-1)")
_SEED = flags.DEFINE_integer("seed", 0, "first seed")
_NOISE_SEED = flags.DEFINE_integer("noise_seed", 0, "global key of the start noise")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", ["ddim", "euler", "euler_a", "dpmpp_2m"],
                             "sampler")
_STEPS = flags.DEFINE_integer("steps", 50, "sampling steps")
_GUIDANCE = flags.DEFINE_float("guidance", None, "guidance scale (default 7.5 SD, 5.0 SDXL)")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                            "compute dtype (auto: bfloat16 on GPUs / TPUs, float32 on the CPU)")
_BATCH = flags.DEFINE_integer("batch_size", 8, "images per step")
_SIZE = flags.DEFINE_integer("size", None, "image side in pixels (default: the model's own "
                             "size, its UNet's sample_size times the VAE factor)")


def _flag_errors() -> list[str]:
    """What is wrong with the numeric flags (each one line naming the flag)."""
    bad = []
    if _NUM.value < 1:
        bad.append(f"--num must be at least 1 (images per prompt); got {_NUM.value}")
    if _STEPS.value < 1:
        bad.append(f"--steps must be at least 1 (sampling steps); got {_STEPS.value}")
    if _GUIDANCE.value is not None and not 0.0 <= _GUIDANCE.value <= 100.0:
        bad.append(f"--guidance must be in [0, 100] (1 = no guidance); got {_GUIDANCE.value}")
    if _BATCH.value < 1:
        bad.append(f"--batch_size must be at least 1; got {_BATCH.value}")
    if _SIZE.value is not None and _SIZE.value < 1:
        bad.append(f"--size must be a positive number of pixels; got {_SIZE.value}")
    return bad


def _size_error(model: str, unet_dir: str | None, size: int) -> str | None:
    """None when the UNet and VAE of `model` can make `size` x `size` images, else why not
    (read from their config.json files before any weights load)."""
    from fifa_jax.models.diffusers_io import read_config
    from fifa_jax.training import resolution
    unet = read_config(unet_dir or os.path.join(model, "unet"))
    vae = read_config(os.path.join(model, "vae"))
    factor, multiple = resolution.size_multiple(len(vae["block_out_channels"]),
                                                len(unet["block_out_channels"]))
    if size % multiple:
        lower, upper = resolution.neighbours(size, multiple)
        return (f"--size {size} is not a multiple of {multiple} (the VAE's factor {factor} "
                f"times the UNet's downsampling); use {lower} or {upper}")
    return None


def _prompts() -> list[str]:
    out = list(_PROMPT.value)
    if _PROMPTS.value:
        with open(_PROMPTS.value, encoding="utf-8") as f:
            out += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return out


def _run(argv) -> int:
    from PIL import Image

    from fifa_jax.errors import InputError
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _MODEL.value or not _OUT.value:
        print("error: --model and --out are required", file=sys.stderr)
        return 2
    prompts = _prompts()
    if not prompts:
        print("error: give --prompt TEXT (repeatable) or --prompts FILE", file=sys.stderr)
        return 2
    bad = _flag_errors()
    if bad:
        print(f"error: {bad[0]}", file=sys.stderr)
        return 2
    from fifa_jax.sampling.pipeline import TextToImage   # jax: after the flag checks
    try:
        if _SIZE.value is not None:
            why = _size_error(_MODEL.value, _UNET.value, _SIZE.value)
            if why:
                print(f"error: {why}", file=sys.stderr)
                return 2
        gen = TextToImage.load(_MODEL.value, unet_dir=_UNET.value, sampler=_SAMPLER.value,
                               num_steps=_STEPS.value, guidance_scale=_GUIDANCE.value,
                               dtype=_DTYPE.value, batch_size=_BATCH.value,
                               noise_seed=_NOISE_SEED.value, lora_dir=_LORA.value)
    except (InputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen.image_size = _SIZE.value
    items = [(i, p, _SEED.value + j) for i, p in enumerate(prompts) for j in range(_NUM.value)]

    def say_cut(texts, max_length):
        for t in texts:
            print(f"note: prompt {prompts.index(t)} ({t[:40]!r}...) is longer than the "
                  f"{max_length} tokens the text encoder reads; the rest is cut",
                  file=sys.stderr)

    images = gen([p for _, p, _ in items], [s for _, _, s in items], on_cut=say_cut)
    os.makedirs(_OUT.value, exist_ok=True)
    index = {}
    for (i, p, s), img in zip(items, images):
        name = f"{i:04d}_{s}.png"
        Image.fromarray(img).save(os.path.join(_OUT.value, name))
        index[name] = {"prompt": p, "seed": s}
    settings = {"model": _MODEL.value, "unet": _UNET.value, "lora": _LORA.value,
                "sampler": _SAMPLER.value,
                "steps": _STEPS.value, "guidance": gen.guidance_scale,
                "noise_seed": _NOISE_SEED.value,
                "size": gen.latent_shape[1] * gen.vae_factor}
    with open(os.path.join(_OUT.value, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "images": index}, f, indent=2)
    print(f"wrote {len(index)} images to {_OUT.value}")
    return 0


def main() -> None:
    sys.exit(app.run(_run))


if __name__ == "__main__":
    main()
