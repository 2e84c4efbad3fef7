"""A tiny, deterministic Stable-Diffusion-1.5-layout base pipeline for the demo world.

`build_demo_base(folder, seed=0)` writes, with no download:

    model_index.json             StableDiffusionPipeline; safety_checker / feature_extractor null
    unet/                        UNet2DConditionModel, 4 x 8 x 8 latents, block_out (16, 32),
                                 cross-attention on the text encoder's 32-wide hidden states
    vae/                         AutoencoderKL, 3 levels (16, 24, 32): 32 x 32 RGB <-> 4 x 8 x 8
    text_encoder/                CLIPTextModel: the demo reward's text tower config
    tokenizer/                   the demo reward's tiny CLIP BPE tokenizer (same files)
    scheduler/scheduler_config.json   SD1.5's PNDM schedule (scaled_linear 0.00085..0.012, 1000)

Weights are drawn from a numpy RNG keyed by (seed, component), at the scales of PyTorch's
default init (Linear / Conv: U(+-1/sqrt(fan_in)) for weight and bias; norms weight 1, bias 0;
CLIP's token and position embeddings N(0, 0.02) as in transformers), into abstractly built
models (no eager init), then saved with our own writers. The VAE's posterior log-variance bias
starts at -6 (std ~0.05), so that the random encoder's latents carry the image rather than noise.

The bytes are the same on every call with the same seed; files whose content is unchanged are
not rewritten, so their mtimes (which key the stage runner's fingerprints) stay put.
"""
from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np

from fifa_jax.scoring.demo_checkpoints import (BOS, EOS, _write_if_changed, model_config,
                                               tokenizer_files)

DIFFUSERS_VERSION = "0.30.0"
LATENT_CHANNELS = 4
IMAGE_SIZE = 32  # the demo world's images (fifa_jax/data/demo_world.py)
LOGVAR_BIAS = -6.0

UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
    "sample_size": IMAGE_SIZE // 4, "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "only_cross_attention": False,
    "block_out_channels": [16, 32], "layers_per_block": 1, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 8, "norm_eps": 1e-5,
    "cross_attention_dim": 32, "attention_head_dim": 2, "use_linear_projection": False,
}
# scaling_factor 3.0: the random encoder of seed 0 gives demo-world images latents of std ~0.33,
# so scaled latents have std ~1 as SD's do (tests/training/test_demo_base.py checks the range).
VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
    "in_channels": 3, "out_channels": 3, "latent_channels": LATENT_CHANNELS,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 24, 32], "layers_per_block": 1, "act_fn": "silu",
    "norm_num_groups": 8, "sample_size": IMAGE_SIZE, "scaling_factor": 3.0,
}
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
_COMPONENT_SEEDS = {"unet": 1, "vae": 2, "text_encoder": 3}


def _json_bytes(d: dict) -> bytes:
    return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode("utf-8")


def init_tensors(names: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """PyTorch-layout float32 tensors at PyTorch's default init scales.

    Args:
      names: PyTorch key -> (nnx path, layout kind, PyTorch shape), as the models' name maps give.
      rng: drawn in sorted key order, so the result depends only on the keys and the seed.
    Returns:
      key -> array of the PyTorch shape. A Linear / Conv weight of shape (O, I, ...) and its bias
      ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = I * prod(kernel); a norm's weight
      (nnx `scale`) 1 and bias 0; an embedding table N(0, 0.02).
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


def _rng(seed: int, component: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), _COMPONENT_SEEDS[component]])


def _unet(seed: int):
    from fifa_jax.models.torch_names import fill_from_torch
    from fifa_jax.models.unet_io import UNET_RENAMES, abstract_unet, unet_name_map
    abstract = abstract_unet(UNET_CONFIG)
    tensors = init_tensors(unet_name_map(abstract), _rng(seed, "unet"))
    return fill_from_torch(abstract, tensors, UNET_RENAMES, "demo base unet")


def _vae(seed: int):
    from fifa_jax.models.torch_names import fill_from_torch
    from fifa_jax.models.vae_io import VAE_RENAMES, abstract_vae, vae_name_map
    abstract = abstract_vae(VAE_CONFIG)
    tensors = init_tensors(vae_name_map(abstract), _rng(seed, "vae"))
    tensors["quant_conv.bias"][LATENT_CHANNELS:] = LOGVAR_BIAS
    return fill_from_torch(abstract, tensors, VAE_RENAMES, "demo base vae")


def text_encoder_config(vocab: dict) -> dict:
    """The CLIPTextModel config: the demo reward's text tower for the same tokenizer."""
    text = dict(model_config(len(vocab), vocab[BOS], vocab[EOS])["text_config"])
    text["architectures"] = ["CLIPTextModel"]
    return text


def _text_encoder(seed: int, vocab: dict):
    from fifa_jax.models import clip_io
    from fifa_jax.models.clip_config import config_from_dict
    abstract = clip_io.build(config_from_dict(text_encoder_config(vocab), "demo base text"))
    tensors = init_tensors(clip_io.name_map(abstract), _rng(seed, "text_encoder"))
    return clip_io.fill(abstract, tensors, "demo base text_encoder")


def _sync_folder(src: str, dst: str) -> None:
    """Copy every file of `src` to `dst` (same relative names), writing only changed bytes."""
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        with open(os.path.join(src, name), "rb") as f:
            _write_if_changed(os.path.join(dst, name), f.read())


def build_demo_base(folder, *, seed: int = 0) -> str:
    """Write the tiny SD1.5-layout pipeline into `folder` (created if absent); returns it."""
    from fifa_jax.models.clip_io import save_text_encoder
    from fifa_jax.models.unet_io import save_unet
    from fifa_jax.models.vae_io import save_vae
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    tok = tokenizer_files()
    vocab = json.loads(tok["vocab.json"])
    with tempfile.TemporaryDirectory(prefix="demo_base_") as tmp:
        save_unet(_unet(seed), os.path.join(tmp, "unet"))
        save_vae(_vae(seed), os.path.join(tmp, "vae"))
        save_text_encoder(_text_encoder(seed, vocab), os.path.join(tmp, "text_encoder"))
        for name in ("unet", "vae", "text_encoder"):
            _sync_folder(os.path.join(tmp, name), os.path.join(folder, name))
    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    for name, data in tok.items():
        _write_if_changed(os.path.join(folder, "tokenizer", name), data)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    _write_if_changed(os.path.join(folder, "scheduler", "scheduler_config.json"),
                      _json_bytes(SCHEDULER_CONFIG))
    _write_if_changed(os.path.join(folder, "model_index.json"), _json_bytes(MODEL_INDEX))
    return folder


DEMO = "demo"            # the value of encode.base_model / train.base_model that means this
DEMO_DIR = ("encode", "demo_base")


def resolve_base_model(path: str, workdir) -> str:
    """`path`, or for "demo" the demo base folder in the work directory (built there by process
    0 when missing or different; the others wait)."""
    if path != DEMO:
        return path
    from fifa_jax.parallel import hosts
    import jax
    folder = os.path.join(os.fspath(workdir), *DEMO_DIR)
    if jax.process_index() == 0:
        build_demo_base(folder)
    hosts.barrier("demo_base:built")
    return folder
