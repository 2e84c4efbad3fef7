"""Parse and validate a diffusers `UNet2DConditionModel` config.json dict.

Honours the legacy naming: `attention_head_dim` is the number of heads per block when
`num_attention_heads` is null (every SD checkpoint). Per-block values may be lists. Values the
Flax model does not implement raise `UnsupportedConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from fifa_jax.errors import InputError

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

# key -> the only values we implement (as a tuple), for keys that select unsupported variants.
_FIXED = {
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "addition_embed_type": (None, "text_time", "text"),
    "act_fn": ("silu", "swish"),
    "dropout": (0.0, 0),
}
# Keys read with their diffusers defaults.
_DEFAULTS = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2, "downsample_padding": 1, "mid_block_scale_factor": 1.0,
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1, "attention_head_dim": 8, "num_attention_heads": None,
    "use_linear_projection": False, "addition_time_embed_dim": None, "upcast_attention": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "projection_class_embeddings_input_dim": None,
    "addition_embed_type_num_heads": 64,
}


class UnsupportedConfigError(InputError):
    """A config value selects a UNet/VAE variant this package does not implement."""


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Resolved UNet hyper-parameters; per-block tuples are in down-block order."""
    in_channels: int
    out_channels: int
    center_input_sample: bool
    flip_sin_to_cos: bool
    freq_shift: float
    down_block_types: tuple
    mid_block_type: str | None
    up_block_types: tuple
    block_out_channels: tuple
    layers_per_block: tuple
    downsample_padding: int
    mid_block_scale_factor: float
    norm_num_groups: int
    norm_eps: float
    cross_attention_dim: tuple
    transformer_layers: tuple      # per block: transformer layers in each Transformer2D
    num_heads: tuple               # per block
    use_linear_projection: bool
    upcast_attention: bool
    addition_embed_type: str | None  # None, "text_time" (SDXL) or "text" (pooled context)
    addition_embed_type_num_heads: int  # heads of the "text" attention pooling
    addition_time_embed_dim: int | None
    projection_class_embeddings_input_dim: int | None
    resnet_out_scale_factor: float  # accepted; diffusers applies it to none of our blocks
    time_embed_dim: int
    conv_in_kernel: int
    conv_out_kernel: int
    raw_json: str                  # the original config dict, for save_unet


def _per_block(name: str, value, n: int) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UnsupportedConfigError(f"UNet config {name}={value!r}: needs one entry per "
                                         f"block ({n})")
        return tuple(value)
    return (value,) * n


def parse_unet_config(cfg: Mapping[str, Any]) -> UNetConfig:
    """Validate a diffusers UNet config dict and resolve per-block values."""
    unknown = sorted(k for k in cfg if not k.startswith("_")
                     and k not in _DEFAULTS and k not in _FIXED)
    if unknown:
        raise UnsupportedConfigError(f"UNet config has keys this model does not know: {unknown}")
    for key, allowed in _FIXED.items():
        if key in cfg and cfg[key] not in allowed:
            raise UnsupportedConfigError(f"UNet config {key}={cfg[key]!r} is not supported "
                                         f"(supported: {list(allowed)})")
    c = {**_DEFAULTS, **{k: v for k, v in cfg.items() if k in _DEFAULTS}}
    down, up = tuple(c["down_block_types"]), tuple(c["up_block_types"])
    n = len(down)
    for t in down:
        if t not in DOWN_TYPES:
            raise UnsupportedConfigError(f"UNet config down_block_types: {t!r} not supported "
                                         f"(supported: {list(DOWN_TYPES)})")
    for t in up:
        if t not in UP_TYPES:
            raise UnsupportedConfigError(f"UNet config up_block_types: {t!r} not supported "
                                         f"(supported: {list(UP_TYPES)})")
    if c["mid_block_type"] not in MID_TYPES:
        raise UnsupportedConfigError(f"UNet config mid_block_type={c['mid_block_type']!r} not "
                                     f"supported (supported: {list(MID_TYPES)})")
    boc = tuple(c["block_out_channels"])
    if len(boc) != n or len(up) != n:
        raise UnsupportedConfigError(f"UNet config: {n} down blocks, {len(up)} up blocks, "
                                     f"{len(boc)} block_out_channels must agree")
    only_cross = _per_block("only_cross_attention", c["only_cross_attention"], n)
    if any(only_cross):
        raise UnsupportedConfigError("UNet config only_cross_attention=True is not supported")
    if c["norm_num_groups"] is None:
        raise UnsupportedConfigError("UNet config norm_num_groups=None is not supported")
    heads = c["num_attention_heads"] if c["num_attention_heads"] is not None \
        else c["attention_head_dim"]
    heads = _per_block("num_attention_heads/attention_head_dim", heads, n)
    layers = tuple(int(v) for v in _per_block("layers_per_block", c["layers_per_block"], n))
    tl = []
    for i, v in enumerate(_per_block("transformer_layers_per_block",
                                     c["transformer_layers_per_block"], n)):
        if isinstance(v, (list, tuple)):
            raise UnsupportedConfigError(
                f"UNet config transformer_layers_per_block[{i}]={v!r}: nested per-layer lists "
                "are only meaningful with reverse_transformer_layers_per_block (unsupported)")
        tl.append(int(v))
    add_type = cfg.get("addition_embed_type")
    if add_type == "text_time":
        for k in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if c[k] is None:
                raise UnsupportedConfigError(f"UNet config addition_embed_type='text_time' "
                                             f"needs {k}")
    if add_type == "text":
        xdim = set(_per_block("cross_attention_dim", c["cross_attention_dim"], n))
        heads_pool = c["addition_embed_type_num_heads"]
        if len(xdim) != 1:
            raise UnsupportedConfigError(f"UNet config addition_embed_type='text' needs one "
                                         f"cross_attention_dim, got {sorted(xdim)}")
        if not heads_pool or next(iter(xdim)) % heads_pool:
            raise UnsupportedConfigError(
                f"UNet config addition_embed_type_num_heads={heads_pool} must divide "
                f"cross_attention_dim={next(iter(xdim))} (addition_embed_type='text')")
    for k in ("conv_in_kernel", "conv_out_kernel"):
        if c[k] % 2 == 0:
            raise UnsupportedConfigError(f"UNet config {k}={c[k]} must be odd")
    return UNetConfig(
        in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
        center_input_sample=bool(c["center_input_sample"]),
        flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=float(c["freq_shift"]),
        down_block_types=down, mid_block_type=c["mid_block_type"], up_block_types=up,
        block_out_channels=boc, layers_per_block=layers,
        downsample_padding=int(c["downsample_padding"]),
        mid_block_scale_factor=float(c["mid_block_scale_factor"]),
        norm_num_groups=int(c["norm_num_groups"]), norm_eps=float(c["norm_eps"]),
        cross_attention_dim=tuple(int(v) for v in _per_block(
            "cross_attention_dim", c["cross_attention_dim"], n)),
        transformer_layers=tuple(tl), num_heads=tuple(int(h) for h in heads),
        use_linear_projection=bool(c["use_linear_projection"]),
        upcast_attention=bool(c["upcast_attention"]),
        addition_embed_type=add_type,
        addition_embed_type_num_heads=int(c["addition_embed_type_num_heads"]),
        addition_time_embed_dim=c["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=c["projection_class_embeddings_input_dim"],
        resnet_out_scale_factor=float(c["resnet_out_scale_factor"]),
        time_embed_dim=int(c["time_embedding_dim"] or boc[0] * 4),
        conv_in_kernel=int(c["conv_in_kernel"]), conv_out_kernel=int(c["conv_out_kernel"]),
        raw_json=json.dumps(dict(cfg), sort_keys=True),
    )
