"""Shared helpers of the evaluation-model parity tests (tiny random torch models)."""
import json
import os

import numpy as np
import torch
from PIL import Image

from fifa_jax.scoring import preprocess as pp
from fifa_jax.demo.reward import tokenizer_files

ATOL = 1e-4


def randomize(model, seed, scale=0.2):
    """Random weights (norm scales near 1, logit_scale 2.0), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            if name.endswith("logit_scale"):
                p.fill_(2.0)
            elif ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return model.eval()


def write_processor(folder, size):
    """A CLIPImageProcessor config: shortest edge and crop `size`, bicubic, OpenAI mean/std."""
    os.makedirs(folder, exist_ok=True)
    cfg = {"crop_size": {"height": size, "width": size}, "do_center_crop": True,
           "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
           "image_mean": list(pp.OPENAI_CLIP_MEAN), "image_std": list(pp.OPENAI_CLIP_STD),
           "image_processor_type": "CLIPImageProcessor", "resample": 3,
           "rescale_factor": 1 / 255, "size": {"shortest_edge": size}}
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(cfg, f)
    return pp.config_from_dict(cfg)


def write_tokenizer(folder):
    """The demo world's tiny CLIP BPE tokenizer; returns (vocab size, bos id, eos id)."""
    os.makedirs(folder, exist_ok=True)
    files = tokenizer_files()
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    vocab = json.loads(files["vocab.json"])
    return len(vocab), vocab["<|startoftext|>"], vocab["<|endoftext|>"]


def images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def clip_pixels(imgs, cfg):
    """transformers-equivalent pixel_values (N, 3, h, w) for uint8 images."""
    return torch.tensor(np.stack([pp.preprocess(Image.fromarray(im), cfg) for im in imgs]))


def max_err(a, b):
    a = np.asarray(a, np.float64)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))
