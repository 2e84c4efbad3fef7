"""ImageReward (Xu et al. 2023, THUDM/ImageReward, PyPI `image-reward`) in JAX, read from the
published `ImageReward.pt` state dict without PyTorch.

    v = ViT(image)                       (N, 1 + (S/p)^2, Wv)  BLIP ViT-L/16, all tokens
    h = BERT(prompt ids, mask; cross-attention to v in every layer)     (N, T, D)
    r = MLP(h[:, 0])                     (N,)  five Linears, no activations (as the aesthetic
                                               head: Dropouts only, so one affine map at eval)
    ImageReward = (r - 0.16717362830052426) / 1.0333394966054072

(the package's `ImageReward.score`: `blip.visual_encoder`, `blip.text_encoder(ids, mask,
encoder_hidden_states=v)` in BLIP's "multimodal" mode, `mlp`, then the mean / std above.)
ViT (BLIP `vit.py`, timm layout): patches by a strided conv with bias, [CLS] prepended, learnt
positions, pre-LN blocks (LayerNorm eps 1e-6, fused qkv with bias, exact GELU MLP), a final
LayerNorm over every token. BERT (BLIP `med.py`): word + absolute position embeddings (no token
types), LayerNorm (eps 1e-12); per layer: self-attention (padding mask), post-LN; cross-attention
(queries from the text, keys / values Linear(Wv -> D) of the image tokens, no mask), post-LN;
GELU MLP, post-LN. Published sizes: 224 px, patch 16, Wv 1024, 24 layers, 16 heads; D 768,
12 layers, 12 heads, vocab 30524 (bert-base-uncased + [DEC] + [ENC]), 512 positions; MLP 768 ->
1024 -> 128 -> 64 -> 16 -> 1. The sizes are read from the file's shapes; heads = width / 64.

State-dict names (flat, top level), read strictly (`name_table`): `blip.visual_encoder.
{cls_token, pos_embed, patch_embed.proj, blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2}, norm}`, `blip.text_encoder.{embeddings.{word_embeddings, position_embeddings,
LayerNorm}, encoder.layer.{i}.{attention, crossattention}.{self.{query, key, value},
output.{dense, LayerNorm}}, .intermediate.dense, .output.{dense, LayerNorm}}`,
`mlp.layers.{0, 2, 4, 6, 7}`; ignored: BLIP's contrastive projections `blip.vision_proj.*`,
`blip.text_proj.*` (unused by the score) and the `position_ids` buffer. Any other key, a missing
key or a wrong shape raises CheckpointMismatchError naming it. [Not checked against the real
file, which could not be downloaded here: the names come from the package's modules.]

Inputs: images resized (shorter side 224, PIL bicubic), centre-cropped to 224, OpenAI CLIP
mean / std (the package's torchvision transform on PIL images); prompts through the
bert-base-uncased tokenizer, padded / truncated to 35 tokens with the attention mask.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fifa_jax import parallel
from fifa_jax.evaluation import clip_scores as cs
from fifa_jax.evaluation.torch_zip import read_tensors
from fifa_jax.models.safetensors_io import CheckpointMismatchError
from fifa_jax.scoring import embeddings
from fifa_jax.scoring import preprocess as pp

MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35
MLP_LAYERS = (0, 2, 4, 6, 7)
IGNORED = re.compile(r"^blip\.(vision_proj|text_proj)\.(weight|bias)$"
                     r"|^blip\.text_encoder\.embeddings\.position_ids$")
IMAGE_CFG = pp.ImageProcessorConfig(shortest_edge=224, crop_hw=(224, 224), resample=3)
V, T = "blip.visual_encoder.", "blip.text_encoder."


@dataclasses.dataclass(frozen=True)
class ImageRewardConfig:
    image_size: int = 224
    patch: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_mlp: int = 3072
    vocab_size: int = 30524
    max_positions: int = 512
    mlp_dims: tuple = (1024, 128, 64, 16)


def infer_config(tensors: Mapping, source: str = "<state dict>") -> ImageRewardConfig:
    """The sizes from the shapes of a state dict in ImageReward.pt's layout (heads = width/64)."""
    def shape(k):
        if k not in tensors:
            raise CheckpointMismatchError(f"checkpoint {source}: missing key {k}")
        return tuple(tensors[k].shape)

    def count(prefix):
        ids = {int(m.group(1)) for k in tensors for m in [re.match(prefix + r"(\d+)\.", k)] if m}
        return max(ids) + 1 if ids else 0

    wv, _, p, _ = shape(V + "patch_embed.proj.weight")
    n_tok = shape(V + "pos_embed")[1]
    vocab, d = shape(T + "embeddings.word_embeddings.weight")
    side = int(round((n_tok - 1) ** 0.5)) * p
    dims = tuple(shape(f"mlp.layers.{i}.weight")[0] for i in MLP_LAYERS[:-1])
    return ImageRewardConfig(
        image_size=side, patch=p, vision_width=wv, vision_layers=count(re.escape(V) + r"blocks\."),
        vision_heads=max(wv // 64, 1), text_width=d,
        text_layers=count(re.escape(T) + r"encoder\.layer\."), text_heads=max(d // 64, 1),
        text_mlp=shape(T + "encoder.layer.0.intermediate.dense.weight")[0], vocab_size=vocab,
        max_positions=shape(T + "embeddings.position_embeddings.weight")[0], mlp_dims=dims)


def name_table(c: ImageRewardConfig) -> dict[str, tuple]:
    """{ImageReward.pt key: torch shape} for config c: the strict map."""
    wv, d, p = c.vision_width, c.text_width, c.patch
    n = (c.image_size // p) ** 2 + 1
    out = {V + "cls_token": (1, 1, wv), V + "pos_embed": (1, n, wv),
           V + "patch_embed.proj.weight": (wv, 3, p, p), V + "patch_embed.proj.bias": (wv,)}

    def lin(k, o, i):
        out[k + ".weight"], out[k + ".bias"] = (o, i), (o,)

    def ln(k, w):
        out[k + ".weight"], out[k + ".bias"] = (w,), (w,)

    for i in range(c.vision_layers):
        b = f"{V}blocks.{i}."
        ln(b + "norm1", wv), ln(b + "norm2", wv)
        lin(b + "attn.qkv", 3 * wv, wv), lin(b + "attn.proj", wv, wv)
        lin(b + "mlp.fc1", 4 * wv, wv), lin(b + "mlp.fc2", wv, 4 * wv)
    ln(V + "norm", wv)
    out[T + "embeddings.word_embeddings.weight"] = (c.vocab_size, d)
    out[T + "embeddings.position_embeddings.weight"] = (c.max_positions, d)
    ln(T + "embeddings.LayerNorm", d)
    for i in range(c.text_layers):
        b = f"{T}encoder.layer.{i}."
        for att, kv in (("attention", d), ("crossattention", wv)):
            lin(b + att + ".self.query", d, d)
            lin(b + att + ".self.key", d, kv), lin(b + att + ".self.value", d, kv)
            lin(b + att + ".output.dense", d, d), ln(b + att + ".output.LayerNorm", d)
        lin(b + "intermediate.dense", c.text_mlp, d), lin(b + "output.dense", d, c.text_mlp)
        ln(b + "output.LayerNorm", d)
    dims = (d,) + tuple(c.mlp_dims) + (1,)
    for j, i in enumerate(MLP_LAYERS):
        lin(f"mlp.layers.{i}", dims[j + 1], dims[j])
    return out


def params_from_state_dict(tensors: Mapping, config: ImageRewardConfig | None = None,
                           source: str = "<state dict>") -> tuple[dict, ImageRewardConfig]:
    """({key: float32 array, Linear weights transposed to (in, out)}, config), strictly."""
    config = config or infer_config(tensors, source)
    table = name_table(config)
    unexpected = sorted(k for k in tensors if k not in table and not IGNORED.match(k))
    missing = sorted(k for k in table if k not in tensors)
    if unexpected or missing:
        raise CheckpointMismatchError(f"checkpoint {source}: ImageReward layout mismatch: "
                                      f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    params = {}
    for k, want in table.items():
        a = np.asarray(tensors[k], np.float32)
        if tuple(a.shape) != want:
            raise CheckpointMismatchError(f"checkpoint {source}: {k} has shape "
                                          f"{tuple(a.shape)}, expected {want}")
        is_linear = k.endswith(".weight") and a.ndim == 2 and "embeddings" not in k
        params[k] = jnp.asarray(a.T if is_linear else a)
    return params, config


# ------------------------------------------------------------------------------ forward
def _ln(x, p, k, eps):
    x = x.astype(jnp.float32)
    mu = x.mean(-1, keepdims=True)
    var = jnp.square(x - mu).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * p[k + ".weight"] + p[k + ".bias"]


def _lin(x, p, k):
    return x @ p[k + ".weight"] + p[k + ".bias"]


def _attention(q, k, v, heads, bias=None):
    """q (N, Lq, D), k / v (N, Lk, D) -> (N, Lq, D); bias (N, 1, 1, Lk) added to the logits."""
    n, lq, d = q.shape
    split = lambda x: x.reshape(n, x.shape[1], heads, d // heads).transpose(0, 2, 1, 3)  # noqa
    logits = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(d // heads)
    if bias is not None:
        logits = logits + bias
    out = jax.nn.softmax(logits, axis=-1) @ split(v)
    return out.transpose(0, 2, 1, 3).reshape(n, lq, d)


def vision_tokens(p, c: ImageRewardConfig, x):
    """(N, 3, S, S) normalised float32 -> (N, 1 + (S/p)^2, Wv) BLIP ViT tokens (final LN)."""
    n, s, pa = x.shape[0], c.image_size, c.patch
    g = s // pa
    patches = x.reshape(n, 3, g, pa, g, pa).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
    w = p[V + "patch_embed.proj.weight"].reshape(c.vision_width, -1)
    h = patches @ w.T + p[V + "patch_embed.proj.bias"]
    cls = jnp.broadcast_to(p[V + "cls_token"], (n, 1, c.vision_width))
    h = jnp.concatenate([cls, h], axis=1) + p[V + "pos_embed"]
    for i in range(c.vision_layers):
        b = f"{V}blocks.{i}."
        qkv = _lin(_ln(h, p, b + "norm1", 1e-6), p, b + "attn.qkv")
        q, k, v = jnp.split(qkv, 3, axis=-1)
        h = h + _lin(_attention(q, k, v, c.vision_heads), p, b + "attn.proj")
        m = jax.nn.gelu(_lin(_ln(h, p, b + "norm2", 1e-6), p, b + "mlp.fc1"), approximate=False)
        h = h + _lin(m, p, b + "mlp.fc2")
    return _ln(h, p, V + "norm", 1e-6)


def text_states(p, c: ImageRewardConfig, ids, mask, image_tokens):
    """ids / mask (N, L) int -> (N, L, D): BLIP's BERT with cross-attention to image_tokens."""
    eps = 1e-12
    h = p[T + "embeddings.word_embeddings.weight"][ids] \
        + p[T + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    h = _ln(h, p, T + "embeddings.LayerNorm", eps)
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, -10000.0).astype(jnp.float32)
    for i in range(c.text_layers):
        b = f"{T}encoder.layer.{i}."
        for att, src, bb in (("attention", h, bias), ("crossattention", image_tokens, None)):
            q = _lin(h, p, b + att + ".self.query")
            k, v = _lin(src, p, b + att + ".self.key"), _lin(src, p, b + att + ".self.value")
            a = _lin(_attention(q, k, v, c.text_heads, bb), p, b + att + ".output.dense")
            h = _ln(a + h, p, b + att + ".output.LayerNorm", eps)
        m = jax.nn.gelu(_lin(h, p, b + "intermediate.dense"), approximate=False)
        h = _ln(_lin(m, p, b + "output.dense") + h, p, b + "output.LayerNorm", eps)
    return h


def reward(p, c: ImageRewardConfig, x, ids, mask):
    """(N,) standardised ImageReward of normalised images x (N, 3, S, S) and prompt ids / mask."""
    h = text_states(p, c, ids, mask, vision_tokens(p, c, x))[:, 0]
    for i in MLP_LAYERS:
        h = _lin(h, p, f"mlp.layers.{i}")
    return (h[:, 0] - MEAN) / STD


# ------------------------------------------------------------------------------- scorer
class ImageRewardScorer(cs.Scorer):
    """ImageReward on (N, H, W, 3) uint8 images and their prompts."""
    name = "image_reward"

    def __init__(self, params: dict, config: ImageRewardConfig, tokenizer, *,
                 batch_size: int = 8, mesh=None, source: str = "", dtype=jnp.float32):
        self.config, self.tokenizer = config, tokenizer
        self.batch_size, self.mesh = int(batch_size), cs.default_mesh(mesh)
        self.image_cfg = dataclasses.replace(IMAGE_CFG, shortest_edge=config.image_size,
                                             crop_hw=(config.image_size,) * 2)
        self._params = jax.device_put(jax.tree.map(lambda a: a.astype(dtype), params),
                                      parallel.replicated(self.mesh))
        image_cfg = self.image_cfg

        @jax.jit
        def step(params, crops, ids, mask):
            x = pp.normalize(crops, image_cfg).astype(dtype)    # (N, 3, S, S)
            return reward(params, config, x, ids, mask).astype(jnp.float32)

        self._step = step
        self.definition = (f"ImageReward ({source or 'ImageReward.pt'}): BLIP ViT-L image "
                           f"tokens, BERT with cross-attention, MLP on [CLS], (r - {MEAN:.4f}) "
                           f"/ {STD:.4f}")

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        t = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                           max_length=MAX_LENGTH, return_tensors="np")
        return t["input_ids"].astype(np.int32), t["attention_mask"].astype(np.int32)

    def score(self, images, prompts: Sequence[str]) -> np.ndarray:
        images = cs.check_images(images, prompts)
        if images.shape[0] == 0:
            return np.zeros((0,), np.float32)
        crops = cs.clip_crops(images, self.image_cfg)
        ids, mask = self.tokenize(prompts)
        out = embeddings.run_batched(self._step, self._params, [crops, ids, mask],
                                     self.batch_size, self.mesh, what="image_reward")
        return np.asarray(out, np.float32)


def load_image_reward(path: str, tokenizer_path: str, *, config=None, dtype="float32",
                      batch_size: int = 8, mesh=None) -> ImageRewardScorer:
    """The scorer from `ImageReward.pt` (torch zip, read torch-free; or a safetensors copy)
    and a bert-base-uncased tokenizer folder (vocab.txt)."""
    from transformers import BertTokenizer
    params, config = params_from_state_dict(read_tensors(path), config, path)
    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(str(dtype), jnp.float32)
    return ImageRewardScorer(params, config, BertTokenizer.from_pretrained(tokenizer_path),
                             batch_size=batch_size, mesh=mesh, source=path, dtype=dt)


__all__ = ["MEAN", "STD", "ImageRewardConfig", "infer_config", "name_table",
           "params_from_state_dict", "vision_tokens", "text_states", "reward",
           "ImageRewardScorer", "load_image_reward"]
