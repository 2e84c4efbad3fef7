"""Generate images from a diffusers pipeline folder (a base model or an exported one).

    python -m fifa_jax.generate --model WORKDIR/export/pipeline --prompt "two red circles" \\
        --out /tmp/images [--num 4] [--seed 0] [--sampler ddim] [--steps 50] [--guidance 7.5]
    python -m fifa_jax.generate --model DIR --prompts prompts.txt --out DIR   # one per line

Writes OUT/<index>_<seed>.png and OUT/prompts.json (file -> prompt, seed, settings). The
start noise depends only on (prompt, seed, --noise-seed), so the same command with a base and
a tuned pipeline gives directly comparable images.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

_MODEL = flags.DEFINE_string("model", None, "diffusers pipeline folder (model_index.json)")
_UNET = flags.DEFINE_string("unet", None, "another UNet folder to use (e.g. export/unet)")
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


def _prompts() -> list[str]:
    out = list(_PROMPT.value)
    if _PROMPTS.value:
        with open(_PROMPTS.value, encoding="utf-8") as f:
            out += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return out


def _run(argv) -> int:
    from PIL import Image

    from fifa_jax.errors import InputError
    from fifa_jax.sampling.pipeline import TextToImage
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _MODEL.value or not _OUT.value:
        print("error: --model and --out are required", file=sys.stderr)
        return 2
    prompts = _prompts()
    if not prompts:
        print("error: give --prompt TEXT (repeatable) or --prompts FILE", file=sys.stderr)
        return 2
    try:
        gen = TextToImage.load(_MODEL.value, unet_dir=_UNET.value, sampler=_SAMPLER.value,
                               num_steps=_STEPS.value, guidance_scale=_GUIDANCE.value,
                               dtype=_DTYPE.value, batch_size=_BATCH.value,
                               noise_seed=_NOISE_SEED.value)
    except (InputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    items = [(i, p, _SEED.value + j) for i, p in enumerate(prompts) for j in range(_NUM.value)]
    images = gen([p for _, p, _ in items], [s for _, _, s in items])
    os.makedirs(_OUT.value, exist_ok=True)
    index = {}
    for (i, p, s), img in zip(items, images):
        name = f"{i:04d}_{s}.png"
        Image.fromarray(img).save(os.path.join(_OUT.value, name))
        index[name] = {"prompt": p, "seed": s}
    settings = {"model": _MODEL.value, "unet": _UNET.value, "sampler": _SAMPLER.value,
                "steps": _STEPS.value, "guidance": gen.guidance_scale,
                "noise_seed": _NOISE_SEED.value}
    with open(os.path.join(_OUT.value, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "images": index}, f, indent=2)
    print(f"wrote {len(index)} images to {_OUT.value}")
    return 0


def main() -> None:
    sys.exit(app.run(_run))


if __name__ == "__main__":
    main()
