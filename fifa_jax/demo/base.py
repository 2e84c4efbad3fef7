"""The demo world's pretrained Stable-Diffusion-1.5-layout base pipeline, shipped in the package.

`build_demo_base(folder)` installs, with no download, the files of `fifa_jax/demo/models/base/`
(trained from scratch on the demo world by `python -m fifa_jax.demo.build_models`):

    model_index.json             StableDiffusionPipeline; safety_checker / feature_extractor null
    unet/                        UNet2DConditionModel on 4 x 16 x 16 latents, block_out (32, 64),
                                 cross-attention on the text encoder's 32-wide hidden states and
                                 their attention-pooled summary added to the time embedding
                                 (fifa_jax/demo/train_unet.py; deliberately imperfect)
    vae/                         AutoencoderKL, 3 levels (16, 32, 64): 64 x 64 RGB <-> 4 x 16 x 16,
                                 scaling_factor = 1 / std of its latents (demo/train_vae.py)
    text_encoder/                CLIPTextModel: the demo reward's text tower (frozen while the
                                 UNet trained)
    tokenizer/                   the demo reward's tiny CLIP BPE tokenizer (same files)
    scheduler/scheduler_config.json   SD1.5's PNDM schedule (scaled_linear 0.00085..0.012, 1000)

Installed by `demo/shipped.py` (unchanged files are not rewritten). `init_tensors` (PyTorch default init scales from a numpy RNG)
is the trainers' initialiser.
"""
from __future__ import annotations

import math
import os

import numpy as np

from fifa_jax.demo import shipped
from fifa_jax.demo.reward import BOS, EOS, model_config

DIFFUSERS_VERSION = "0.30.0"
IMAGE_SIZE = 64  # the demo world's images (demo/world.py), 4 x 16 x 16 latents
SHIPPED = os.path.join(shipped.ROOT, "base")
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
    "set_alpha_to_one": False, "skip_prk_steps": True, "clip_sample": False,
    "timestep_spacing": "leading", "trained_betas": None,
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "safety_checker": [None, None], "feature_extractor": [None, None],
    "requires_safety_checker": False,
}
def init_tensors(names: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """PyTorch-layout float32 tensors at PyTorch's default init scales.

    Args:
      names: PyTorch key -> (nnx path, layout kind, PyTorch shape), as the models' name maps give.
      rng: drawn in sorted key order, so the result depends only on the keys and the seed.
    Returns:
      key -> array of the PyTorch shape. A Linear / Conv weight of shape (O, I, ...) and its bias
      ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = I * prod(kernel); a norm's weight
      (nnx `scale`) 1 and bias 0; an embedding table N(0, 0.02); a pooling query offset
      (`positional_embedding`, (1, D)) N(0, 1 / D), as diffusers initialises it.
    """
    by_module: dict[tuple, dict[str, tuple]] = {}
    for key, (path, _, shape) in names.items():
        by_module.setdefault(tuple(path[:-1]), {})[path[-1]] = tuple(shape)
    out = {}
    for key in sorted(names):
        path, _, shape = names[key]
        leaf, siblings = path[-1], by_module[tuple(path[:-1])]
        if leaf == "scale":
            out[key] = np.ones(shape, np.float32)
        elif leaf == "embedding":
            out[key] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        elif leaf == "positional_embedding":  # AttentionPooling's query offset: N(0, 1/D)
            out[key] = (rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(np.float32)
        elif leaf == "bias" and "scale" in siblings:
            out[key] = np.zeros(shape, np.float32)
        elif leaf in ("kernel", "bias") and "kernel" in siblings:
            w = siblings["kernel"]  # the torch shape (O, I, ...) of the module's weight
            bound = 1.0 / math.sqrt(int(np.prod(w[1:])))
            out[key] = rng.uniform(-bound, bound, shape).astype(np.float32)
        else:
            raise ValueError(f"demo base init: no rule for parameter {key} "
                             f"(nnx path {'.'.join(map(str, path))}, shape {shape})")
    return out


def text_encoder_config(vocab: dict) -> dict:
    """The CLIPTextModel config: the demo reward's text tower for the same tokenizer."""
    text = dict(model_config(len(vocab), vocab[BOS], vocab[EOS])["text_config"])
    text["architectures"] = ["CLIPTextModel"]
    return text


def build_demo_base(folder, *, seed: int = 0) -> str:
    """Install the shipped pretrained demo pipeline into `folder` (created if absent)."""
    if seed != 0:
        raise ValueError(f"demo base seed={seed}: only seed 0 is shipped; build another with "
                         f"`python -m fifa_jax.demo.build_models --seed {seed} --out DIR` and "
                         f"use DIR/base as the base model")
    return shipped.install("base", "model_index.json", folder)
