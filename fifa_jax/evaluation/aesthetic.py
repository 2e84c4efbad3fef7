"""LAION aesthetic predictor v2: an MLP head on L2-normalised CLIP ViT-L/14 image embeddings.

    e = get_image_features(x)                   (N, 768) CLIP ViT-L/14 (openai/clip-vit-large-patch14)
    e = e / ||e||   (a zero norm divides by 1)
    score = head(e)                              (N,)   roughly 1..10

The head is christophschuhmann/improved-aesthetic-predictor's `MLP.layers` (nn.Sequential),
saved as a state dict (`sac+logos+ava1-l14-linearMSE.pth`):

    variant "linear" (linearMSE): keys layers.{0,2,4,6,7}: Linear 768->1024, Dropout(0.2),
        1024->128, Dropout(0.2), 128->64, Dropout(0.1), 64->16, 16->1; no activations (at eval
        the head is one affine map).
    variant "relu" (reluMSE): a ReLU after each of the first four Linears; saved from the same
        Sequential with the ReLUs in, its keys are layers.{0,3,6,9,11}.

`read_head(path)` reads the `.pth` torch zip without torch (`torch_zip`, a restricted unpickler;
the `cuda:0` storage tags are ignored) or a `.safetensors` copy with the same keys; "auto"
takes the variant from the key layout. Strict: missing / unexpected keys and shapes that do not
chain (in -> ... -> 1) raise CheckpointMismatchError naming them.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fifa_jax import parallel
from fifa_jax.dtypes import compute_dtype
from fifa_jax.evaluation import clip_scores as cs
from fifa_jax.evaluation.torch_zip import read_tensors
from fifa_jax.models.safetensors_io import CheckpointMismatchError
from fifa_jax.scoring import embeddings
from fifa_jax.scoring import preprocess as pp

LAYOUTS = {"linear": (0, 2, 4, 6, 7), "relu": (0, 3, 6, 9, 11)}
VARIANTS = ("auto", "linear", "relu")


@dataclasses.dataclass(frozen=True)
class AestheticHead:
    """kernels[i] (d_i, d_{i+1}) (the transposed torch weights), biases[i] (d_{i+1},);
    relu: a ReLU after every Linear but the last."""
    kernels: tuple
    biases: tuple
    relu: bool

    @property
    def in_dim(self) -> int:
        return int(self.kernels[0].shape[0])

    def params(self):
        """The pytree `head_apply` takes: ((kernel, bias), ...) as jnp arrays."""
        return tuple((jnp.asarray(k), jnp.asarray(b)) for k, b in zip(self.kernels, self.biases))


def _linear_indices(keys, source: str) -> tuple[int, ...]:
    idx = set()
    for k in keys:
        parts = k.split(".")
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() \
                or parts[2] not in ("weight", "bias"):
            raise CheckpointMismatchError(f"checkpoint {source}: unexpected key {k} (an "
                                          f"aesthetic head has only layers.<i>.weight/bias)")
        idx.add(int(parts[1]))
    return tuple(sorted(idx))


def read_head(path: str, variant: str = "auto") -> AestheticHead:
    """The head from a `.pth` torch zip or a `.safetensors` file (see the module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"aesthetic variant must be one of {VARIANTS}, got {variant!r}")
    tensors = read_tensors(path)
    idx = _linear_indices(tensors.keys(), path)
    layout = next((name for name, ids in LAYOUTS.items() if ids == idx), None)
    if layout is None:
        expected = " or ".join(str(v) for v in LAYOUTS.values())
        raise CheckpointMismatchError(f"checkpoint {path}: Linear layers at indices {idx}; "
                                      f"expected layers {expected}")
    relu = (layout == "relu") if variant == "auto" else (variant == "relu")
    shapes = {k: tuple(v) for k, v in
              (tensors.shapes() if hasattr(tensors, "shapes") else
               {k: np.shape(v) for k, v in tensors.items()}).items()}
    kernels, biases, prev = [], [], None
    for i in LAYOUTS[layout]:
        wk, bk = f"layers.{i}.weight", f"layers.{i}.bias"
        for k in (wk, bk):
            if k not in shapes:
                raise CheckpointMismatchError(f"checkpoint {path}: missing key {k}")
        w = shapes[wk]
        if len(w) != 2 or shapes[bk] != (w[0],) or (prev is not None and w[1] != prev):
            raise CheckpointMismatchError(
                f"checkpoint {path}: wrong shape for {wk} {w} / {bk} {shapes[bk]} (input "
                f"{prev if prev is not None else 'any'} expected)")
        prev = w[0]
        kernels.append(np.ascontiguousarray(np.asarray(tensors[wk], np.float32).T))
        biases.append(np.asarray(tensors[bk], np.float32))
    if prev != 1:
        raise CheckpointMismatchError(f"checkpoint {path}: the last layer has {prev} outputs, "
                                      f"expected 1")
    return AestheticHead(tuple(kernels), tuple(biases), relu)


def head_apply(params, x: jax.Array, relu: bool = False) -> jax.Array:
    """The MLP head: x (N, D) float32 -> (N,) float32 (Dropout is the identity at eval)."""
    y = x.astype(jnp.float32)
    for i, (k, b) in enumerate(params):
        y = jnp.dot(y, k, precision=jax.lax.Precision.HIGHEST) + b
        if relu and i < len(params) - 1:
            y = jax.nn.relu(y)
    return y[:, 0]


def normalize_embeds(e: jax.Array) -> jax.Array:
    """(N, D) -> (N, D) float32 e / ||e||, where a zero norm divides by 1 (as the reference)."""
    e = e.astype(jnp.float32)
    n = jnp.linalg.norm(e, axis=-1, keepdims=True)
    return e / jnp.where(n == 0, 1.0, n)


def aesthetic_from_embeds(params, image_embeds: jax.Array, relu: bool = False) -> jax.Array:
    """(N, D) raw CLIP image embeddings -> (N,) aesthetic scores."""
    return head_apply(params, normalize_embeds(image_embeds), relu)


class AestheticScorer(cs.Scorer):
    """LAION aesthetic predictor v2 on (N, H, W, 3) uint8 images; prompts are ignored."""
    name = "aesthetic"

    def __init__(self, head: AestheticHead, tower, image_cfg: pp.ImageProcessorConfig, *,
                 batch_size: int = 16, mesh=None, source: str = ""):
        from flax import nnx
        proj = int(tower.config.projection_dim)
        if proj != head.in_dim:
            raise CheckpointMismatchError(f"aesthetic head takes {head.in_dim}-d embeddings but "
                                          f"the CLIP image tower gives {proj}-d")
        self.head, self.tower, self.image_cfg = head, tower, image_cfg
        self.batch_size, self.mesh = int(batch_size), cs.default_mesh(mesh)
        graphdef, state = nnx.split(tower)
        rep = parallel.replicated(self.mesh)
        self._state = jax.device_put((state, head.params()), rep)
        relu = head.relu

        @jax.jit
        def step(state_and_head, crops):
            st, hp = state_and_head
            x = pp.normalize(crops, image_cfg)
            return aesthetic_from_embeds(hp, nnx.merge(graphdef, st)(x).image_embeds, relu)

        self._step = step
        self.definition = ("LAION aesthetic predictor v2 "
                           f"({'reluMSE' if relu else 'linearMSE'} head {source}): "
                           "MLP(get_image_features(x) / ||.||) with CLIP ViT-L/14, ~1..10")

    def score(self, images, prompts: Sequence[str] = None) -> np.ndarray:
        images = cs.check_images(images, prompts)
        if images.shape[0] == 0:
            return np.zeros((0,), np.float32)
        crops = cs.clip_crops(images, self.image_cfg)
        out = embeddings.run_batched(self._step, self._state, [crops], self.batch_size,
                                     self.mesh, what="aesthetic")
        return np.asarray(out, np.float32)


def load_aesthetic(head_path: str, clip_path: str, *, variant: str = "auto",
                   processor_path: str = "", dtype="float32", batch_size: int = 16, mesh=None,
                   attention_impl: str = "auto") -> AestheticScorer:
    """The aesthetic scorer: the head file (`.pth` or `.safetensors`) and a transformers CLIP
    folder (openai/clip-vit-large-patch14: a CLIPModel, only its image tower is read; or a
    CLIPVisionModelWithProjection) with preprocessor_config.json (or in `processor_path`)."""
    head = read_head(head_path, variant)
    tower = cs.load_image_tower(clip_path, dtype=compute_dtype(dtype),
                                attention_impl=attention_impl)
    return AestheticScorer(head, tower, pp.load_config(processor_path or clip_path),
                           batch_size=batch_size, mesh=mesh, source=head_path)
