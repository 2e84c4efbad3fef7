"""HPSv2 (Human Preference Score v2): an open_clip ViT-H-14 fine-tune, run on our Flax CLIP.

    HPSv2(image, prompt) = cos(E_I, E_C) = <f_I / ||f_I||, f_C / ||f_C||>     (N,) float32
The plain cosine: no logit_scale (hpsv2's `img_score.py` takes the diagonal of
image_features @ text_features.T after the model's L2 normalisation). Papers report it x100
("28.16" = 0.2816); this scorer returns the cosine.

Checkpoint: `HPS_v2_compressed.pt` (xswu/HPSv2; v2.1: `HPS_v2.1_compressed.pt`), a torch zip
whose `['state_dict']` is an open_clip `CLIP` state dict, read torch-free (`torch_zip`), or a
`.safetensors` copy of that state dict. open_clip names -> ours (`OPEN_CLIP_TO_HF`):
    text (top level): token_embedding.weight, positional_embedding [ctx, D],
        transformer.resblocks.{i}.{ln_1, attn.in_proj_weight [3D, D] (fused q; k; v),
        attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_final,
        text_projection [D, E] (applied as x @ P: our kernel as is), logit_scale
    vision (`visual.`): conv1.weight [W, 3, p, p] (no bias), class_embedding [W],
        positional_embedding [1 + (S/p)^2, W], ln_pre, transformer.resblocks.{i}.* (as text),
        ln_post, proj [W, E] (x @ P)
Strict: a missing, unexpected or mis-shaped open_clip key raises CheckpointMismatchError naming
it; only the non-persistent `attn_mask` buffer, should a file hold it, is ignored. ViT-H-14:
embed 1024; vision 224 px, patch 14, width 1280, 32 layers, 16 heads (head_width 80); text ctx
77, vocab 49408, width 1024, 16 heads, 24 layers; exact GELU (not quick_gelu).

Text: the open_clip tokenizer convention (`open_clip_tokenize`): [SOT] + BPE + [EOT], cut to 77
with the last token forced to EOT, padded with 0; pooled at argmax(ids) (EOT has the largest
id), causal mask, no padding mask. The BPE comes from a CLIP tokenizer folder (vocab.json +
merges.txt, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K: the same 49408-token vocabulary).
Text cleanup is transformers' (open_clip also runs ftfy + html unescape: only unusual text
differs).

Images (`hps_preprocess`, open_clip's val transform with resize_longest_max, hpsv2's
light_augmentation): ToTensor (x / 255) -> ResizeMaxSize(224): the longest side to 224 with
torchvision's tensor bicubic resize (antialias=True, torchvision >= 0.17's default; PIL's
kernel, a = -0.5), new size round(side * scale), then zero padding (before normalising) to
224 x 224, centred as F.pad [w//2, h//2, w - w//2, h - h//2] -> OpenAI mean/std. Square SD
outputs: a plain resize to 224. An image whose longest side is already 224 is not resized
(open_clip would then not pad either; we pad so the model gets 224 x 224).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fifa_jax.files import read_json
from fifa_jax import parallel
from fifa_jax.dtypes import compute_dtype
from fifa_jax.errors import InputError
from fifa_jax.evaluation import clip_scores as cs
from fifa_jax.evaluation.torch_zip import load as torch_load, TensorRef, TorchTensors
from fifa_jax.models import clip_io
from fifa_jax.models import safetensors_io as sio
from fifa_jax.models.clip import CLIPModel
from fifa_jax.models.clip_config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from fifa_jax.scoring import embeddings
from fifa_jax.scoring.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from fifa_jax.scoring.score_step import l2_normalize

# open_clip's model_configs/ViT-H-14.json
VIT_H_14 = {"embed_dim": 1024,
            "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80,
                           "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16,
                         "layers": 24}}
IGNORED_BUFFERS = ("attn_mask",)
_VISION_KEYS = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio",
                "patch_dropout", "ls_init_value"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
              "ls_init_value"}
_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text"}


# ------------------------------------------------------------------------------- config
def config_from_open_clip(d: Mapping, source: str = "<open_clip config>") -> CLIPConfig:
    """Our CLIPConfig from an open_clip model config (model_configs/*.json layout).

    Fields that change the architecture beyond a plain OpenAI-style CLIP (layer scale,
    attentional pooling, HF text towers, ...) raise InputError naming them.
    """
    def check(obj, allowed, where):
        bad = sorted(k for k, v in obj.items() if k not in allowed and v not in (None, False))
        if bad:
            raise InputError(f"{source}: {where} fields {bad} are not supported")
    check(d, _TOP_KEYS, "top-level")
    v, t = dict(d.get("vision_cfg", {})), dict(d.get("text_cfg", {}))
    check(v, _VISION_KEYS, "vision_cfg")
    check(t, _TEXT_KEYS, "text_cfg")
    for cfg, where in ((v, "vision_cfg"), (t, "text_cfg")):
        if cfg.get("ls_init_value") is not None:
            raise InputError(f"{source}: {where}.ls_init_value (layer scale) is not supported")
    act = "quick_gelu" if d.get("quick_gelu", False) else "gelu"
    embed = int(d["embed_dim"])
    size = v.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise InputError(f"{source}: vision_cfg.image_size {size} is not square")
        size = size[0]
    vw, head_width = int(v.get("width", 768)), int(v.get("head_width", 64))
    if vw % head_width:
        raise InputError(f"{source}: vision width {vw} is not a multiple of head_width "
                         f"{head_width}")
    vision = CLIPVisionConfig(
        hidden_size=vw, intermediate_size=int(vw * float(v.get("mlp_ratio", 4.0))),
        num_hidden_layers=int(v.get("layers", 12)), num_attention_heads=vw // head_width,
        image_size=int(size), patch_size=int(v.get("patch_size", 16)), hidden_act=act,
        layer_norm_eps=1e-5, projection_dim=embed)
    tw = int(t.get("width", 512))
    text = CLIPTextConfig(
        vocab_size=int(t.get("vocab_size", 49408)), hidden_size=tw,
        intermediate_size=int(tw * float(t.get("mlp_ratio", 4.0))),
        num_hidden_layers=int(t.get("layers", 12)), num_attention_heads=int(t.get("heads", 8)),
        max_position_embeddings=int(t.get("context_length", 77)), hidden_act=act,
        layer_norm_eps=1e-5, projection_dim=embed,
        eos_token_id=2,   # 2 = pool at argmax(ids), open_clip's rule (see clip.eos_positions)
        pad_token_id=0)
    for c, where in ((vision, "vision_cfg"), (text, "text_cfg")):
        if c.hidden_size % c.num_attention_heads:
            raise InputError(f"{source}: {where} width is not a multiple of its heads")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed,
                      logit_scale_init_value=math.log(1 / 0.07))


def read_open_clip_config(config) -> CLIPConfig:
    """None -> ViT-H-14; a dict (open_clip layout); a path to such a JSON file; a CLIPConfig."""
    if config is None:
        return config_from_open_clip(VIT_H_14, "ViT-H-14")
    if isinstance(config, CLIPConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return config_from_open_clip(read_json(config, "an open_clip model config"),
                                     str(config))
    return config_from_open_clip(config)


# ------------------------------------------------------------------------------- name map
_BLOCK = {  # open_clip block leaf -> (our block leaf, transform)
    "ln_1.weight": ("layer_norm1.weight", None), "ln_1.bias": ("layer_norm1.bias", None),
    "ln_2.weight": ("layer_norm2.weight", None), "ln_2.bias": ("layer_norm2.bias", None),
    "attn.out_proj.weight": ("self_attn.out_proj.weight", None),
    "attn.out_proj.bias": ("self_attn.out_proj.bias", None),
    "mlp.c_fc.weight": ("mlp.fc1.weight", None), "mlp.c_fc.bias": ("mlp.fc1.bias", None),
    "mlp.c_proj.weight": ("mlp.fc2.weight", None), "mlp.c_proj.bias": ("mlp.fc2.bias", None),
}


def _tower_keys(prefix: str, ours: str, n_layers: int, width: int, mlp: int):
    """[(open_clip key, shape, our key, transform)] for one tower's residual blocks."""
    rows = []
    shapes = {"ln_1.weight": (width,), "ln_1.bias": (width,), "ln_2.weight": (width,),
              "ln_2.bias": (width,), "attn.out_proj.weight": (width, width),
              "attn.out_proj.bias": (width,), "mlp.c_fc.weight": (mlp, width),
              "mlp.c_fc.bias": (mlp,), "mlp.c_proj.weight": (width, mlp),
              "mlp.c_proj.bias": (width,)}
    for i in range(n_layers):
        src = f"{prefix}transformer.resblocks.{i}."
        dst = f"{ours}encoder.layers.{i}."
        for leaf, (our_leaf, tf) in _BLOCK.items():
            rows.append((src + leaf, shapes[leaf], dst + our_leaf, tf))
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            rows.append((src + "attn.in_proj_weight", (3 * width, width),
                         f"{dst}self_attn.{name}.weight", ("rows", j, width)))
            rows.append((src + "attn.in_proj_bias", (3 * width,),
                         f"{dst}self_attn.{name}.bias", ("rows", j, width)))
    return rows


def name_table(config: CLIPConfig) -> list[tuple[str, tuple, str, object]]:
    """[(open_clip key, its shape, our transformers-layout key, transform)] of the whole model;
    transform None (same), "T" (transpose) or ("rows", j, D) (rows j*D:(j+1)*D of a fused
    q; k; v tensor)."""
    t, v, e = config.text_config, config.vision_config, config.projection_dim
    tw, vw, p = t.hidden_size, v.hidden_size, v.patch_size
    rows = [("token_embedding.weight", (t.vocab_size, tw),
             "text_model.embeddings.token_embedding.weight", None),
            ("positional_embedding", (t.max_position_embeddings, tw),
             "text_model.embeddings.position_embedding.weight", None),
            ("ln_final.weight", (tw,), "text_model.final_layer_norm.weight", None),
            ("ln_final.bias", (tw,), "text_model.final_layer_norm.bias", None),
            ("text_projection", (tw, e), "text_projection.weight", "T"),
            ("logit_scale", (), "logit_scale", None),
            ("visual.conv1.weight", (vw, v.num_channels, p, p),
             "vision_model.embeddings.patch_embedding.weight", None),
            ("visual.class_embedding", (vw,), "vision_model.embeddings.class_embedding", None),
            ("visual.positional_embedding", (v.num_positions, vw),
             "vision_model.embeddings.position_embedding.weight", None),
            ("visual.ln_pre.weight", (vw,), "vision_model.pre_layrnorm.weight", None),
            ("visual.ln_pre.bias", (vw,), "vision_model.pre_layrnorm.bias", None),
            ("visual.ln_post.weight", (vw,), "vision_model.post_layernorm.weight", None),
            ("visual.ln_post.bias", (vw,), "vision_model.post_layernorm.bias", None),
            ("visual.proj", (vw, e), "visual_projection.weight", "T")]
    rows += _tower_keys("", "text_model.", t.num_hidden_layers, tw, t.intermediate_size)
    rows += _tower_keys("visual.", "vision_model.", v.num_hidden_layers, vw,
                        v.intermediate_size)
    return rows


def _transform(a: np.ndarray, tf) -> np.ndarray:
    if tf is None:
        return a
    if tf == "T":
        return np.ascontiguousarray(a.T)
    _, j, d = tf
    return a[j * d:(j + 1) * d]


def _out_shape(shape: tuple, tf) -> tuple:
    if tf is None:
        return tuple(shape)
    if tf == "T":
        return tuple(shape[::-1])
    return (tf[2],) + tuple(shape[1:])


class OpenCLIPAsHF(Mapping):
    """A lazy view of open_clip tensors under transformers CLIPModel key names (the fused
    in_proj split into q/k/v, the x @ P projections transposed into Linear weights)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], table):
        self.tensors = tensors
        self.rows = {ours: (src, tf) for src, _, ours, tf in table}
        self._src_shapes = sio.tensor_shapes(tensors)

    def shapes(self) -> dict[str, tuple]:
        return {ours: _out_shape(self._src_shapes[src], tf)
                for ours, (src, tf) in self.rows.items()}

    def __getitem__(self, key: str) -> np.ndarray:
        src, tf = self.rows[key]
        return _transform(np.asarray(self.tensors[src]), tf)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def read_state_dict(path: str) -> Mapping[str, np.ndarray]:
    """open_clip tensors from a torch zip (`obj['state_dict']`, or the object itself when it
    is already the flat state dict) or a `.safetensors` file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"HPSv2 checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return sio.LazySafetensors(path)
    obj = torch_load(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a state dict (or a dict with 'state_dict'), got "
                         f"a {type(obj).__name__}")
    bad = [k for k, x in obj.items() if not isinstance(x, TensorRef)]
    if bad:
        raise InputError(f"{path}: state dict entries that are not tensors: {bad[:10]}")
    return TorchTensors(obj, path)


def convert(tensors: Mapping[str, np.ndarray], config: CLIPConfig, source: str, *,
            dtype=jnp.float32, attention_impl: str = "auto", mesh=None,
            rules=None) -> CLIPModel:
    """Our CLIPModel from open_clip-named tensors. Strict on open_clip's names (see module)."""
    table = name_table(config)
    expected = {src: shape for src, shape, _, _ in table}
    got = {k: s for k, s in sio.tensor_shapes(tensors).items() if k not in IGNORED_BUFFERS}
    sio.check_shapes(expected, got, source)
    abstract = clip_io.build(config, CLIPModel, dtype=dtype, attention_impl=attention_impl)
    return clip_io.fill(abstract, OpenCLIPAsHF(tensors, table), source, mesh=mesh, rules=rules)


def load_model(path: str, config=None, *, dtype=jnp.float32, attention_impl: str = "auto",
               mesh=None, rules=None) -> CLIPModel:
    """The HPSv2 CLIP from `HPS_v2_compressed.pt` (or a safetensors copy); config: see
    `read_open_clip_config` (default ViT-H-14)."""
    return convert(read_state_dict(path), read_open_clip_config(config), path, dtype=dtype,
                   attention_impl=attention_impl, mesh=mesh, rules=rules)


# ------------------------------------------------------------------------------- tokens
def open_clip_tokenize(tokenizer, texts: Sequence[str], context_length: int = 77,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """open_clip's convention on a CLIP BPE tokenizer: ids (N, L) int32 = [SOT] + BPE + [EOT],
    cut to L with the last token forced to EOT, padded with 0; truncated (N,) bool."""
    texts = list(texts)
    ids = np.zeros((len(texts), context_length), np.int32)
    trunc = np.zeros((len(texts),), bool)
    if not texts:
        return ids, trunc
    sot, eot = tokenizer.bos_token_id, tokenizer.eos_token_id
    enc = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    for i, row in enumerate(enc):
        row = list(row)
        if not row or row[0] != sot or row[-1] != eot:
            raise InputError(f"tokenizer did not wrap prompt {i} in SOT/EOT ({sot}, {eot})")
        if len(row) > context_length:
            row, trunc[i] = row[:context_length], True
            row[-1] = eot
        ids[i, :len(row)] = row
    return ids, trunc


# ------------------------------------------------------------------------------- images
def _bicubic(x: np.float32) -> np.float32:
    """PIL's / torch's antialias cubic kernel (a = -0.5), evaluated in double, as float32."""
    x, a = abs(float(x)), -0.5
    if x < 1.0:
        return np.float32(((a + 2.0) * x - (a + 3.0)) * x * x + 1)
    if x < 2.0:
        return np.float32((((x - 5) * x + 8) * x - 4) * a)
    return np.float32(0.0)


@functools.lru_cache(maxsize=32)
def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of torch's antialiased bicubic resize along one axis
    (`interpolate(mode="bicubic", antialias=True, align_corners=False)`, PIL's kernel), with
    torch's CPU float32 arithmetic for the centres and weights (within ~3e-7 of torch)."""
    f32 = np.float32
    scale = f32(n_in / n_out)
    support = f32(2.0) * scale if scale >= 1.0 else f32(2.0)
    inv = f32(1.0) / scale if scale >= 1.0 else f32(1.0)
    w = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        center = f32(float(scale) * (i + 0.5))
        lo = max(int(float(f32(center - support)) + 0.5), 0)
        hi = min(int(float(f32(center + support)) + 0.5), n_in)
        ks = [_bicubic(f32((float(f32(f32(j) - center)) + 0.5) * float(inv)))
              for j in range(lo, hi)]
        total = f32(0.0)
        for k in ks:
            total = f32(total + k)
        w[i, lo:hi] = [f32(k / total) for k in ks] if total != 0 else ks
    w.setflags(write=False)
    return w


def resize_max_size_plan(h: int, w: int, size: int) -> tuple[Optional[tuple[int, int]], tuple]:
    """(resized (h', w') or None when scale == 1, padding (top, bottom, left, right)) of
    ResizeMaxSize(size) for an h x w image."""
    scale = size / float(max(h, w))
    new = None
    if scale != 1.0:
        new = (round(h * scale), round(w * scale))
        h, w = new
    ph, pw = size - h, size - w
    if ph < 0 or pw < 0:
        raise ValueError(f"ResizeMaxSize({size}) of {h}x{w} does not fit")
    return new, (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)


def hps_preprocess(images: jax.Array, size: int = 224,
                   mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> jax.Array:
    """(N, H, W, 3) uint8 -> (N, 3, size, size) float32 (see the module docstring; jit-safe:
    the resize weights follow from the static shape)."""
    n, h, w, _ = images.shape
    x = images.astype(jnp.float32) / jnp.float32(255.0)
    new, (top, bottom, left, right) = resize_max_size_plan(h, w, size)
    hi = jax.lax.Precision.HIGHEST
    if new is not None:
        x = jnp.einsum("pw,nhwc->nhpc", jnp.asarray(resize_matrix(w, new[1])), x, precision=hi)
        x = jnp.einsum("oh,nhpc->nopc", jnp.asarray(resize_matrix(h, new[0])), x, precision=hi)
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return jnp.transpose(x, (0, 3, 1, 2))


def hps_score(image_features: jax.Array, text_features: jax.Array) -> jax.Array:
    """(N, E), (N, E) raw projections -> (N,) float32 cosine (no logit_scale)."""
    return jnp.sum(l2_normalize(image_features) * l2_normalize(text_features), axis=-1)


# ------------------------------------------------------------------------------- scorer
class HPSv2(cs.Scorer):
    name = "hpsv2"

    def __init__(self, model: CLIPModel, tokenizer, *, batch_size: int = 8, mesh=None,
                 source: str = ""):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.mesh = int(batch_size), cs.default_mesh(mesh)
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.image_size = int(model.config.vision_config.image_size)
        graphdef, state = nnx.split(model)
        self._state = jax.device_put(state, parallel.replicated(self.mesh))
        size = self.image_size

        @jax.jit
        def image_fn(state, images):
            m = nnx.merge(graphdef, state)
            return l2_normalize(m.get_image_features(hps_preprocess(images, size)))

        @jax.jit
        def text_fn(state, ids):
            return l2_normalize(nnx.merge(graphdef, state).get_text_features(ids))

        self._image_fn, self._text_fn = image_fn, text_fn
        self.definition = (f"HPSv2: cos(E_I, E_C) of L2-normalised open_clip ViT-H-14 features "
                           f"({source or 'HPS_v2_compressed.pt'}), no logit_scale; papers "
                           f"report it x100")

    def text_features(self, prompts: Sequence[str]) -> np.ndarray:
        ids, _ = open_clip_tokenize(self.tokenizer, prompts, self.context_length)
        return embeddings.run_batched(self._text_fn, self._state, [ids], self.batch_size,
                                      self.mesh, what="hpsv2 text")

    def image_features(self, images) -> np.ndarray:
        images = cs.check_images(images)
        return embeddings.run_batched(self._image_fn, self._state, [images], self.batch_size,
                                      self.mesh, what="hpsv2 images")

    def score(self, images, prompts: Sequence[str]) -> np.ndarray:
        images = cs.check_images(images, prompts)
        texts, rows = cs.unique_prompts(prompts)
        if not texts:
            return np.zeros((0,), np.float32)
        img = self.image_features(images)
        txt = self.text_features(texts)[rows]
        return np.sum(img.astype(np.float32) * txt.astype(np.float32), axis=-1)


def load_hpsv2(path: str, tokenizer_path: str, *, config=None, dtype="float32",
               batch_size: int = 8, mesh=None, attention_impl: str = "auto") -> HPSv2:
    """HPSv2 from the checkpoint (`HPS_v2_compressed.pt` or a safetensors copy) and a CLIP
    tokenizer folder (vocab.json + merges.txt; laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."""
    model = load_model(path, config, dtype=compute_dtype(dtype),
                       attention_impl=attention_impl)
    tok = embeddings.load_tokenizer(tokenizer_path)
    return HPSv2(model, tok, batch_size=batch_size, mesh=mesh, source=path)


__all__ = ["VIT_H_14", "config_from_open_clip", "read_open_clip_config", "name_table",
           "OpenCLIPAsHF", "read_state_dict", "convert", "load_model", "open_clip_tokenize",
           "resize_matrix", "resize_max_size_plan", "hps_preprocess", "hps_score", "HPSv2",
           "load_hpsv2"]
