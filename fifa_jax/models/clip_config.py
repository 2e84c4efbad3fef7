"""CLIP configurations read from (and written back to) a transformers `config.json`.

Three frozen dataclasses mirror transformers' `CLIPTextConfig`, `CLIPVisionConfig` and
`CLIPConfig` (defaults are transformers' defaults). Keys we do not model are kept verbatim in
`extra` (a JSON string, so the configs stay hashable and can live on NNX modules as static
attributes) and written back by `to_dict`.

    config_from_dict(d, source)  -> CLIPTextConfig | CLIPVisionConfig | CLIPConfig
    read_config(path)            -> (config, raw dict); path = folder or config.json
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Union

from fifa_jax.files import read_json

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu",
               "silu", "swish")

_DROP_ON_WRITE = ("architectures", "model_type", "text_config", "vision_config",
                  "torch_dtype", "dtype", "transformers_version", "_name_or_path")


def _split(d: dict, cls, source: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
    extra = {k: v for k, v in d.items() if k not in names and k not in _DROP_ON_WRITE}
    kwargs["extra"] = json.dumps(extra, sort_keys=True)
    return kwargs


def _check_common(cfg, source: str) -> None:
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"{source}: hidden_size {cfg.hidden_size} is not a multiple of "
                         f"num_attention_heads {cfg.num_attention_heads}")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act {cfg.hidden_act!r} is not supported; "
                         f"expected one of {ACTIVATIONS}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The text tower (transformers `CLIPTextConfig`, model_type "clip_text_model").

    `eos_token_id == 2` selects transformers' legacy pooling rule (argmax of the ids); any other
    value pools at the first position holding `eos_token_id`.
    """
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    extra: str = "{}"

    model_type = "clip_text_model"

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "CLIPTextConfig":
        cfg = cls(**_split(d, cls, source))
        _check_common(cfg, source)
        if not isinstance(cfg.eos_token_id, int):
            raise ValueError(f"{source}: eos_token_id must be one integer, got "
                             f"{cfg.eos_token_id!r}")
        return cfg

    def to_dict(self) -> dict:
        out = json.loads(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name != "extra"})
        out["model_type"] = self.model_type
        return out


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The vision tower (transformers `CLIPVisionConfig`, model_type "clip_vision_model")."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    extra: str = "{}"

    model_type = "clip_vision_model"

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "CLIPVisionConfig":
        cfg = cls(**_split(d, cls, source))
        _check_common(cfg, source)
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"{source}: image_size {cfg.image_size} is not a multiple of "
                             f"patch_size {cfg.patch_size}")
        return cfg

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    to_dict = CLIPTextConfig.to_dict


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """The dual model (transformers `CLIPConfig`, model_type "clip")."""
    text_config: CLIPTextConfig = CLIPTextConfig()
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    extra: str = "{}"

    model_type = "clip"

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "CLIPConfig":
        for key in ("text_config", "vision_config"):
            if not isinstance(d.get(key), dict):
                raise ValueError(f"{source}: a CLIPModel config needs a {key!r} object")
        kwargs = _split(d, cls, source)
        kwargs["text_config"] = CLIPTextConfig.from_dict(d["text_config"], f"{source}:text_config")
        kwargs["vision_config"] = CLIPVisionConfig.from_dict(d["vision_config"],
                                                             f"{source}:vision_config")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        out = json.loads(self.extra)
        out.update(projection_dim=self.projection_dim,
                   logit_scale_init_value=self.logit_scale_init_value,
                   text_config=self.text_config.to_dict(),
                   vision_config=self.vision_config.to_dict(),
                   model_type=self.model_type)
        return out


AnyCLIPConfig = Union[CLIPTextConfig, CLIPVisionConfig, CLIPConfig]
_BY_TYPE = {"clip": CLIPConfig, "clip_text_model": CLIPTextConfig,
            "clip_vision_model": CLIPVisionConfig}
_BY_ARCH = {"CLIPModel": CLIPConfig, "CLIPTextModel": CLIPTextConfig,
            "CLIPTextModelWithProjection": CLIPTextConfig, "CLIPVisionModel": CLIPVisionConfig,
            "CLIPVisionModelWithProjection": CLIPVisionConfig}


def config_from_dict(d: dict, source: str = "<dict>") -> AnyCLIPConfig:
    """Parse a transformers CLIP config dict by its `model_type` (or `architectures`)."""
    cls = _BY_TYPE.get(d.get("model_type"))
    if cls is None:
        archs = d.get("architectures") or []
        cls = next((_BY_ARCH[a] for a in archs if a in _BY_ARCH), None)
    if cls is None and "text_config" in d and "vision_config" in d:
        cls = CLIPConfig
    if cls is None:
        raise ValueError(f"{source}: not a CLIP config (model_type={d.get('model_type')!r}, "
                         f"architectures={d.get('architectures')!r})")
    return cls.from_dict(d, source)


def config_path(path: str) -> str:
    """`path` itself if it is a file, else `path/config.json`."""
    return path if os.path.isfile(path) else os.path.join(path, "config.json")


def read_config(path: str) -> tuple[AnyCLIPConfig, dict[str, Any]]:
    """(parsed config, raw dict) from a folder holding `config.json`, or the file itself."""
    cpath = config_path(path)
    if not os.path.exists(cpath):
        raise FileNotFoundError(f"no config.json at {cpath}")
    raw = read_json(cpath, "a model config")
    return config_from_dict(raw, cpath), raw
