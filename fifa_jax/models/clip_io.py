"""Load and save CLIP models in the transformers layout (`config.json` + `model.safetensors`).

Name map (explicit, leaf by leaf): our NNX attribute path equals the PyTorch module path
(`text_model.encoder.layers.3.self_attn.q_proj`), and the leaf is renamed and re-laid out by

    Linear.kernel   (in, out)        <-> .weight (out, in)        transposed
    Linear.bias                      <-> .bias
    Conv.kernel     (kh, kw, I, O)   <-> .weight (O, I, kh, kw)   (patch_embedding only)
    Embed.embedding (num, D)         <-> .weight (num, D)
    LayerNorm.scale / .bias          <-> .weight / .bias
    class_embedding, logit_scale     <-> same name, same shape

Key conventions accepted on load (`key_style` on save):
  class                          transformers 5.x save_pretrained      4.x / hub checkpoints
  CLIPTextModel                  embeddings.*, encoder.*, final_*      text_model.<same>
  CLIPVisionModel                embeddings.*, pre_layrnorm.*, ...     vision_model.<same>
  CLIPTextModelWithProjection    text_model.*, text_projection.weight  (same)
  CLIPVisionModelWithProjection  vision_model.*, visual_projection.*   (same)
  CLIPModel                      text_model.*, vision_model.*, text_projection.weight,
                                 visual_projection.weight, logit_scale  (same)
Checkpoints written before transformers 4.31 also hold the `*.embeddings.position_ids` buffers
(arange, not parameters): those keys, and only those, are ignored. Everything else is strict:
a missing, unexpected or mis-shaped key raises `CheckpointMismatchError` naming it.

Loading builds the model abstractly (`clip.abstract_init`: ShapeDtypeStruct params, no random
init, no allocation) and fills the params from the checkpoint one tensor at a time
(`torch_names.fill_params`); with `mesh=` each goes straight into its NamedSharding.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from safetensors.numpy import save_file

from fifa_jax.models import safetensors_io as sio
from fifa_jax.models.clip import (CLIPModel, CLIPTextModel, CLIPTextModelWithProjection,
                                  CLIPVisionModel, CLIPVisionModelWithProjection, abstract_init)
from fifa_jax.models.clip_config import (CLIPConfig, CLIPTextConfig, CLIPVisionConfig,
                                         read_config)
from fifa_jax.models.torch_names import fill_params
from fifa_jax.parallel.mesh import to_host

WEIGHT_STEMS = ("model",)
KEY_STYLES = ("hub", "v5")

# Leaf rename rules: (our leaf name, number of dims) -> (torch leaf name, layout).
_LEAF_RULES = {
    ("kernel", 2): ("weight", "linear"),
    ("kernel", 4): ("weight", "conv"),
    ("bias", 1): ("bias", "same"),
    ("embedding", 2): ("weight", "same"),
    ("scale", 1): ("weight", "same"),
    ("class_embedding", 1): ("class_embedding", "same"),
    ("logit_scale", 0): ("logit_scale", "same"),
}

_CLASSES = {
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
    "CLIPVisionModel": CLIPVisionModel,
    "CLIPVisionModelWithProjection": CLIPVisionModelWithProjection,
    "CLIPModel": CLIPModel,
}
# Prefix a single-tower model's keys carry in transformers 4.x / hub checkpoints.
_LEGACY_PREFIX = {CLIPTextModel: "text_model.", CLIPVisionModel: "vision_model."}


def name_map(model: nnx.Module) -> dict[str, tuple[tuple, str, tuple]]:
    """torch key (transformers 5.x style) -> (our param path, layout, torch shape)."""
    out = {}
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for path, leaf in flat.items():
        rule = _LEAF_RULES.get((path[-1], len(leaf.shape)))
        if rule is None:
            raise KeyError(f"no PyTorch name rule for parameter {'.'.join(map(str, path))} "
                           f"with shape {leaf.shape}")
        torch_leaf, layout = rule
        key = ".".join([str(p) for p in path[:-1]] + [torch_leaf])
        shape = tuple(leaf.shape)
        if layout == "linear":
            shape = shape[::-1]
        elif layout == "conv":
            shape = (shape[3], shape[2], shape[0], shape[1])
        out[key] = (path, layout, shape)
    return out


def param_count(model: nnx.Module) -> int:
    """Number of scalars in the model's params (works on abstract models)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def build(config, cls=None, *, dtype=jnp.float32, attention_impl: str = "auto",
          abstract: bool = True, seed: int = 0) -> nnx.Module:
    """Build a CLIP model from a config; abstract (ShapeDtypeStruct params, no init) by default.

    cls defaults by config type: CLIPTextConfig -> CLIPTextModel, CLIPVisionConfig ->
    CLIPVisionModel, CLIPConfig -> CLIPModel.
    """
    if cls is None:
        cls = {CLIPTextConfig: CLIPTextModel, CLIPVisionConfig: CLIPVisionModel,
               CLIPConfig: CLIPModel}[type(config)]
    make = lambda: cls(config, dtype=dtype, attention_impl=attention_impl, rngs=nnx.Rngs(seed))
    if not abstract:
        return make()
    with abstract_init():
        return make()


def _normalise_keys(tensors: Mapping[str, np.ndarray], cls) -> sio.RenamedTensors:
    """A lazy view without the position_ids buffers and, for a single-tower checkpoint, without
    its 4.x prefix."""
    keys = [k for k in tensors if not k.endswith("embeddings.position_ids")]
    prefix = _LEGACY_PREFIX.get(cls)
    if prefix and keys and all(k.startswith(prefix) for k in keys):
        return sio.RenamedTensors(tensors, {k[len(prefix):]: k for k in keys})
    return sio.RenamedTensors(tensors, {k: k for k in keys})


def fill(abstract: nnx.Module, tensors: Mapping[str, np.ndarray], source: str, *,
         mesh=None, rules=None) -> nnx.Module:
    """A concrete model: `abstract`'s structure with params from PyTorch-layout `tensors` (a
    dict or a lazy `LazySafetensors`). mesh / rules: see `torch_names.fill_params`.

    Raises CheckpointMismatchError naming any missing, unexpected or mis-shaped key.
    """
    return fill_params(abstract, name_map(abstract), _normalise_keys(tensors, type(abstract)),
                       source, mesh=mesh, rules=rules)


def state_dict(model: nnx.Module, key_style: str = "hub") -> dict[str, np.ndarray]:
    """PyTorch-named float32 numpy arrays in the PyTorch layout.

    key_style "hub": single-tower CLIPTextModel / CLIPVisionModel keys get the `text_model.` /
    `vision_model.` prefix (SD hub checkpoints; loads in transformers 4.x and 5.x);
    "v5": exactly what transformers 5 `save_pretrained` writes. Other classes are the same in both.
    """
    if key_style not in KEY_STYLES:
        raise ValueError(f"key_style must be one of {KEY_STYLES}, got {key_style!r}")
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    prefix = _LEGACY_PREFIX.get(type(model), "") if key_style == "hub" else ""
    out = {}
    for key, (path, layout, _) in name_map(model).items():
        value = np.asarray(to_host(flat[path]), np.float32)   # gathers sharded params
        out[prefix + key] = sio.to_torch_layout(layout, value)
    return out


def _class_name(model: nnx.Module) -> str:
    for name, cls in _CLASSES.items():
        if type(model) is cls:
            return name
    raise TypeError(f"not a CLIP model: {type(model).__name__}")


def save(model: nnx.Module, path: str, *, key_style: str = "hub") -> None:
    """Write `path/config.json` + `path/model.safetensors` (float32, PyTorch names)."""
    os.makedirs(path, exist_ok=True)
    cfg = model.config.to_dict()
    cfg["architectures"] = [_class_name(model)]
    cfg["dtype"] = "float32"
    cfg["torch_dtype"] = "float32"
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    _write(state_dict(model, key_style), os.path.join(path, "model.safetensors"))


def _write(tensors: Mapping[str, np.ndarray], path: str) -> None:
    """Like safetensors_io.write_safetensors, but keeps 0-d tensors 0-d (`logit_scale` is a
    scalar in PyTorch; np.ascontiguousarray would make it (1,))."""
    arrays = {k: np.require(v, requirements="C") for k, v in tensors.items()}
    save_file(arrays, path, metadata={"format": "pt"})


def read_weights(path: str, variant: Optional[str] = None) -> tuple[str, Mapping[str, np.ndarray]]:
    """(file, tensors) of a transformers folder: `model[.variant].safetensors` (or its sharded
    index; tensors: a lazy `LazySafetensors`, read key by key); failing that, a legacy
    `pytorch_model.bin`, read with torch (weights_only) when torch is installed - some hub
    checkpoints, e.g. older CLIP/PickScore uploads, ship only that."""
    try:
        weights = sio.find_weights(path, WEIGHT_STEMS, variant)
    except FileNotFoundError:
        legacy = os.path.join(path, "pytorch_model.bin")
        if not os.path.exists(legacy):
            raise
        try:
            import torch
        except ImportError as e:
            raise FileNotFoundError(f"{path} has only {legacy}; reading it needs torch (or "
                                    f"convert it to model.safetensors)") from e
        sd = torch.load(legacy, map_location="cpu", weights_only=True)
        return legacy, {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
                        for k, v in sd.items()}
    return weights, sio.LazySafetensors(weights)


def _load(path: str, choose: Callable, *, dtype, attention_impl: str,
          variant: Optional[str], mesh=None, rules=None) -> nnx.Module:
    config, raw = read_config(path)
    weights, tensors = read_weights(path, variant)
    cls = choose(config, raw, tensors)
    abstract = build(config, cls, dtype=dtype, attention_impl=attention_impl)
    return fill(abstract, tensors, weights, mesh=mesh, rules=rules)


def _arch(raw: dict, options: tuple[str, ...], source: str) -> Optional[str]:
    archs = raw.get("architectures") or []
    for a in archs:
        if a in options:
            return a
    if archs:
        raise ValueError(f"{source}: architectures {archs} name none of {options}")
    return None


def _load_tower(path, config_cls, base: str, projection_key: str, **options):
    """`base` (e.g. "CLIPTextModel") or `base + "WithProjection"`, chosen by `architectures`
    or, when absent, by the presence of `projection_key` in the weights."""
    def choose(config, raw, tensors):
        if not isinstance(config, config_cls):
            raise ValueError(f"{path}: config is a {type(config).__name__}, not a "
                             f"{config_cls.__name__}")
        with_projection = base + "WithProjection"
        arch = _arch(raw, (base, with_projection), path)
        if arch is None:
            arch = with_projection if projection_key in tensors else base
        return _CLASSES[arch]
    return _load(path, choose, **options)


def load_text_encoder(path: str, *, dtype=jnp.float32, attention_impl: str = "auto",
                      variant: Optional[str] = None, mesh=None, rules=None):
    """CLIPTextModel or CLIPTextModelWithProjection (by `architectures`; when absent, by the
    presence of `text_projection.weight`) from a folder with config.json + safetensors.
    mesh / rules: None, or params placed straight into `param_sharding.param_shardings`."""
    return _load_tower(path, CLIPTextConfig, "CLIPTextModel", "text_projection.weight",
                       dtype=dtype, attention_impl=attention_impl, variant=variant, mesh=mesh,
                       rules=rules)


def load_vision_encoder(path: str, *, dtype=jnp.float32, attention_impl: str = "auto",
                        variant: Optional[str] = None, mesh=None, rules=None):
    """CLIPVisionModel or CLIPVisionModelWithProjection (by `architectures`, else by keys)."""
    return _load_tower(path, CLIPVisionConfig, "CLIPVisionModel", "visual_projection.weight",
                       dtype=dtype, attention_impl=attention_impl, variant=variant, mesh=mesh,
                       rules=rules)


def load_clip(path: str, *, dtype=jnp.float32, attention_impl: str = "auto",
              variant: Optional[str] = None, mesh=None, rules=None) -> CLIPModel:
    """The dual CLIPModel (e.g. PickScore) from a folder with config.json + safetensors."""
    def choose(config, raw, tensors):
        if not isinstance(config, CLIPConfig):
            raise ValueError(f"{path}: config is a {type(config).__name__}, not a CLIPModel "
                             f"config (text_config + vision_config)")
        _arch(raw, ("CLIPModel",), path)
        return CLIPModel
    return _load(path, choose, dtype=dtype, attention_impl=attention_impl, variant=variant,
                 mesh=mesh, rules=rules)


def save_text_encoder(model, path: str, *, key_style: str = "hub") -> None:
    """Save a CLIPTextModel / CLIPTextModelWithProjection in the transformers layout."""
    if not isinstance(model, (CLIPTextModel, CLIPTextModelWithProjection)):
        raise TypeError(f"save_text_encoder got a {type(model).__name__}")
    save(model, path, key_style=key_style)


def save_vision_encoder(model, path: str, *, key_style: str = "hub") -> None:
    """Save a CLIPVisionModel / CLIPVisionModelWithProjection in the transformers layout."""
    if not isinstance(model, (CLIPVisionModel, CLIPVisionModelWithProjection)):
        raise TypeError(f"save_vision_encoder got a {type(model).__name__}")
    save(model, path, key_style=key_style)


def save_clip(model: CLIPModel, path: str) -> None:
    """Save a CLIPModel in the transformers layout (same keys in 4.x and 5.x)."""
    if not isinstance(model, CLIPModel):
        raise TypeError(f"save_clip got a {type(model).__name__}")
    save(model, path)
