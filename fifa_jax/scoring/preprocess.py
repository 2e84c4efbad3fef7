"""CLIP image preprocessing, identical to transformers' CLIP image processor (PIL backend).

The checkpoint's `preprocessor_config.json` drives it: convert to RGB (alpha composited on
white), resize the shortest side to `size.shortest_edge` with PIL's `resample` filter (bicubic
= 3 for CLIP) on the uint8 image, centre crop `crop_size` (zero padding if the image is
smaller), rescale by `rescale_factor` (1/255) and normalise with `image_mean` / `image_std`.

Split in two so the host only does the PIL work and ships uint8 to the accelerator:
  `resize_and_crop(img) -> (H, W, 3) uint8` on the host (decoding threads), and
  `normalize(x) -> (B, 3, H, W) float32` inside the jitted scoring step.
`preprocess(img)` chains both in numpy (float64 rescale, float32 normalise, as transformers).
PIL is imported where images are handled, so the device-side `normalize` needs only numpy/jax.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from fifa_jax.files import read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """The fields of a CLIP `preprocessor_config.json` that preprocessing uses."""
    shortest_edge: int | None = 224       # None -> resize to (height, width) below
    resize_hw: tuple[int, int] | None = None
    crop_hw: tuple[int, int] = (224, 224)
    resample: int = 3                     # PIL.Image.BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @property
    def out_hw(self) -> tuple[int, int]:
        """(H, W) of the arrays this config produces (fixed when centre cropping)."""
        if self.do_center_crop:
            return self.crop_hw
        if self.resize_hw is not None:
            return self.resize_hw
        raise ValueError("a shortest-edge resize without a centre crop gives variable sizes")


def _size_dict(value, key: str, source: str) -> dict:
    if isinstance(value, int):
        return {key: value} if key == "shortest_edge" else {"height": value, "width": value}
    if isinstance(value, dict):
        return value
    raise ValueError(f"{source}: expected an int or a dict, got {value!r}")


def config_from_dict(d: dict, source: str = "<dict>") -> ImageProcessorConfig:
    """An ImageProcessorConfig from the parsed `preprocessor_config.json` dict."""
    size = _size_dict(d.get("size", 224), "shortest_edge", f"{source} 'size'")
    crop = _size_dict(d.get("crop_size", 224), "height", f"{source} 'crop_size'")
    if "shortest_edge" in size:
        shortest, resize_hw = int(size["shortest_edge"]), None
    elif "height" in size and "width" in size:
        shortest, resize_hw = None, (int(size["height"]), int(size["width"]))
    else:
        raise ValueError(f"{source}: 'size' needs 'shortest_edge' or 'height'+'width', got {size}")
    if "height" not in crop or "width" not in crop:
        raise ValueError(f"{source}: 'crop_size' needs 'height' and 'width', got {crop}")
    mean = d.get("image_mean", OPENAI_CLIP_MEAN)
    std = d.get("image_std", OPENAI_CLIP_STD)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{source}: image_mean/image_std must have 3 entries, got {mean}, {std}")
    return ImageProcessorConfig(
        shortest_edge=shortest, resize_hw=resize_hw,
        crop_hw=(int(crop["height"]), int(crop["width"])),
        resample=int(d.get("resample", 3)),
        do_resize=bool(d.get("do_resize", True)),
        do_center_crop=bool(d.get("do_center_crop", True)),
        do_rescale=bool(d.get("do_rescale", True)),
        rescale_factor=float(d.get("rescale_factor", 1 / 255)),
        do_normalize=bool(d.get("do_normalize", True)),
        do_convert_rgb=bool(d.get("do_convert_rgb", True)),
        image_mean=tuple(float(m) for m in mean), image_std=tuple(float(s) for s in std))


def load_config(path: str) -> ImageProcessorConfig:
    """Read `preprocessor_config.json` from a checkpoint folder (or the file itself)."""
    file = os.path.join(path, "preprocessor_config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"no preprocessor_config.json at {file}")
    return config_from_dict(read_json(file, "an image preprocessor config"), file)


def _to_rgb(img: "Image.Image") -> "Image.Image":
    from PIL import Image
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_output_hw(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(H, W) after resizing the shortest side to `shortest_edge` (long side truncated)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def _center_crop(x: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """(H, W, C) -> (ch, cw, C); zero-pads like transformers when the image is smaller."""
    h, w = x.shape[:2]
    ch, cw = crop_hw
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return x[top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    canvas = np.zeros((nh, nw) + x.shape[2:], x.dtype)
    canvas[tp:tp + h, lp:lp + w] = x
    top, left = top + tp, left + lp
    return canvas[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def resize_and_crop(img: "Image.Image", cfg: ImageProcessorConfig) -> np.ndarray:
    """PIL image -> (H, W, 3) uint8 after RGB conversion, resize and centre crop."""
    if cfg.do_convert_rgb:
        img = _to_rgb(img)
    elif img.mode != "RGB":
        raise ValueError(f"image mode {img.mode} is not RGB and do_convert_rgb is off")
    if cfg.do_resize:
        if cfg.shortest_edge is not None:
            h, w = resize_output_hw(img.height, img.width, cfg.shortest_edge)
        else:
            h, w = cfg.resize_hw
        img = img.resize((w, h), resample=cfg.resample)
    x = np.asarray(img, dtype=np.uint8)
    if cfg.do_center_crop:
        x = _center_crop(x, cfg.crop_hw)
    return np.ascontiguousarray(x)


def mean_std(cfg: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (3,) float32 mean and std (0 and 1 when normalisation is off)."""
    if not cfg.do_normalize:
        return np.zeros(3, np.float32), np.ones(3, np.float32)
    return np.asarray(cfg.image_mean, np.float32), np.asarray(cfg.image_std, np.float32)


def normalize(x, cfg: ImageProcessorConfig):
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32; works on numpy or jax arrays (jit-safe)."""
    import jax.numpy as jnp
    mean, std = mean_std(cfg)
    y = x.astype(jnp.float32)
    if cfg.do_rescale:
        y = y * jnp.float32(cfg.rescale_factor)
    y = (y - mean) / std
    return jnp.transpose(y, (0, 3, 1, 2))


def preprocess(img: "Image.Image", cfg: ImageProcessorConfig) -> np.ndarray:
    """PIL image -> (3, H, W) float32, the numbers transformers' processor gives."""
    x = resize_and_crop(img, cfg)
    y = x.astype(np.float64) * cfg.rescale_factor if cfg.do_rescale else x
    y = y.astype(np.float32)
    mean, std = mean_std(cfg)
    y = (y - mean) / std
    return np.ascontiguousarray(np.transpose(y, (2, 0, 1)))
