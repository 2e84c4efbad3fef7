"""Load a diffusers Stable Diffusion pipeline folder into our Flax models.

    <dir>/model_index.json
    <dir>/unet/          config.json + diffusion_pytorch_model[.variant].safetensors
    <dir>/vae/           config.json + diffusion_pytorch_model[.variant].safetensors
    <dir>/text_encoder/  config.json + model[.variant].safetensors     (CLIPTextModel)
    <dir>/text_encoder_2/  ... (SDXL: CLIPTextModelWithProjection)
    <dir>/tokenizer/, <dir>/tokenizer_2/
    <dir>/scheduler/scheduler_config.json

Which components exist is read from `model_index.json` (a component whose entry is
`[null, null]` is absent). Components we do not model (safety_checker, feature_extractor,
image_encoder, ...) are listed in `Pipeline.skipped`, never silently dropped.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax.numpy as jnp

from fifa_jax.files import read_json
from fifa_jax.models.clip_io import load_text_encoder
from fifa_jax.models.diffusers_io import read_folder_json
from fifa_jax.models.tokenizers import load_tokenizer
from fifa_jax.models.unet_io import load_unet
from fifa_jax.models.vae_io import load_vae

MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                    "scheduler")


@dataclasses.dataclass
class Pipeline:
    """The loaded parts of a diffusers pipeline folder (absent or not requested -> None)."""
    path: str
    model_index: dict
    unet: Any = None
    vae: Any = None
    text_encoder: Any = None          # CLIPTextModel
    text_encoder_2: Any = None        # CLIPTextModelWithProjection (SDXL)
    tokenizer: Any = None
    tokenizer_2: Any = None
    scheduler_config: Optional[dict] = None
    skipped: tuple = ()               # model_index components not loaded (names)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None or "text_encoder_2" in self.model_index


def read_model_index(path: str) -> dict:
    return read_folder_json(path, "model_index.json",
                            f"{path} is not a diffusers pipeline folder: no model_index.json")


def _present(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def load_pipeline(path: str, *, dtype=jnp.float32, attention_impl: str = "auto",
                  variant: Optional[str] = None,
                  components: Optional[Sequence[str]] = None, mesh=None,
                  rules=None) -> Pipeline:
    """Load a diffusers pipeline folder.

    Args:
      path: the folder holding model_index.json.
      dtype: compute dtype for the models (params stay float32).
      attention_impl: "auto" | "xla" | "cudnn" for every model.
      variant: weight variant, e.g. "fp16" (falls back to the plain files when absent).
      components: subset of MODEL_COMPONENTS to load (default: all present ones).
      mesh: None (params on the default device) or a Mesh with an "fsdp" axis: every model's
        params go straight into their NamedSharding as they are read.
      rules: (regex, tactic) pairs for that (None: param_sharding.DEFAULT_RULES).
    Returns:
      Pipeline. Tokenizers are checked against their text encoder's vocab_size.
    """
    index = read_model_index(path)
    wanted = set(MODEL_COMPONENTS if components is None else components)
    unknown = wanted - set(MODEL_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown pipeline components {sorted(unknown)}; "
                         f"expected some of {MODEL_COMPONENTS}")
    for name in MODEL_COMPONENTS:
        if name in wanted and _present(index, name) and not os.path.isdir(os.path.join(path, name)):
            raise FileNotFoundError(f"{path}/model_index.json names {name!r} but the folder "
                                    f"{os.path.join(path, name)} is missing")
    opts = dict(dtype=dtype, attention_impl=attention_impl, variant=variant, mesh=mesh,
                rules=rules)
    pipe = Pipeline(path=path, model_index=index)
    for kind, loader in (("unet", load_unet), ("vae", load_vae)):
        if kind in wanted and _present(index, kind):
            setattr(pipe, kind, loader(os.path.join(path, kind), **opts))
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        vocab = None
        if enc in wanted and _present(index, enc):
            model = load_text_encoder(os.path.join(path, enc), **opts)
            setattr(pipe, enc, model)
            vocab = model.config.vocab_size
        if tok in wanted and _present(index, tok):
            setattr(pipe, tok, load_tokenizer(os.path.join(path, tok), expected_vocab_size=vocab))
    if "scheduler" in wanted and _present(index, "scheduler"):
        sched = os.path.join(path, "scheduler", "scheduler_config.json")
        if not os.path.exists(sched):
            raise FileNotFoundError(f"scheduler config not found: {sched}")
        pipe.scheduler_config = read_json(sched, "a scheduler config")
    pipe.skipped = tuple(sorted(k for k in index if not k.startswith("_") and _present(index, k)
                                and (k not in MODEL_COMPONENTS or k not in wanted)))
    return pipe
