"""HPSv2: open_clip ViT state dicts on our Flax CLIP, against a small torch open_clip reference.

open_clip / hpsv2 are not installable beside our dependencies, so `OpenCLIPRef` below is the
open_clip ViT forward written out in torch with open_clip's module names (its state dict has
open_clip's keys: fused `attn.in_proj_weight`, `conv1`, `class_embedding`, `ln_pre`, `proj`,
...). Tiny random weights, saved as hpsv2 ships them (torch.save({'state_dict': ...})).
"""
import collections
import os

import jax
import numpy as np
import pytest
import torch
from torch import nn

from fifa_jax.evaluation import hpsv2
from fifa_jax.models import clip_io
from fifa_jax.models.safetensors_io import CheckpointMismatchError
from fifa_jax.scoring.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from tests.evaluation.common import (ATOL, images, max_err, randomize, write_tokenizer)


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(collections.OrderedDict(
            [("c_fc", nn.Linear(d, 4 * d)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(4 * d, d))]))

    def forward(self, x, mask=None):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, d, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])

    def forward(self, x, mask=None):
        for b in self.resblocks:
            x = b(x, mask)
        return x


class Visual(nn.Module):
    def __init__(self, size, patch, width, layers, heads, embed):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((size // patch) ** 2 + 1, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.proj = nn.Parameter(torch.randn(width, embed))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], 1) + self.positional_embedding)
        return self.ln_post(self.transformer(x)[:, 0]) @ self.proj


class OpenCLIPRef(nn.Module):
    """open_clip CLIP (OpenAI-style ViT, exact GELU) with open_clip's parameter names."""

    def __init__(self, c):
        super().__init__()
        v, t = c["vision_cfg"], c["text_cfg"]
        self.visual = Visual(v["image_size"], v["patch_size"], v["width"], v["layers"],
                             v["width"] // v["head_width"], c["embed_dim"])
        self.token_embedding = nn.Embedding(t["vocab_size"], t["width"])
        self.positional_embedding = nn.Parameter(torch.randn(t["context_length"], t["width"]))
        self.transformer = Transformer(t["width"], t["layers"], t["heads"])
        self.ln_final = nn.LayerNorm(t["width"])
        self.text_projection = nn.Parameter(torch.randn(t["width"], c["embed_dim"]))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        n = t["context_length"]
        self.register_buffer("attn_mask", torch.full((n, n), float("-inf")).triu(1),
                             persistent=False)

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.ln_final(self.transformer(x, self.attn_mask))
        return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.text_projection

    def forward(self, pixels, ids):
        i = nn.functional.normalize(self.visual(pixels), dim=-1)
        t = nn.functional.normalize(self.encode_text(ids), dim=-1)
        return i, t, (i * t).sum(-1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hps")
    vocab, _, _ = write_tokenizer(str(root / "tok"))
    cfg = {"embed_dim": 8,
           "vision_cfg": {"image_size": 16, "layers": 2, "width": 24, "head_width": 8,
                          "patch_size": 4},
           "text_cfg": {"context_length": 12, "vocab_size": vocab, "width": 16, "heads": 2,
                        "layers": 2}}
    torch.manual_seed(0)
    ref = randomize(OpenCLIPRef(cfg), 1, scale=0.25)
    path = str(root / "HPS_v2_compressed.pt")
    torch.save({"state_dict": ref.state_dict(), "epoch": 1}, path)
    scorer = hpsv2.load_hpsv2(path, str(root / "tok"), config=cfg, batch_size=2)
    return cfg, ref, path, scorer, root


def _ref_pixels(imgs):
    x = torch.tensor(imgs).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    return (x - mean) / std


PROMPTS = ["a red cat", "a photo of a dog in the city at night", "a red cat",
           "sunset over the beach, oil painting, highly detailed digital art by an artist"]


def test_features_and_score_match_open_clip(world):
    cfg, ref, _, scorer, _ = world
    imgs = images(4, 16, 16, seed=1)   # already 16 px: ResizeMaxSize leaves them as they are
    ids, trunc = hpsv2.open_clip_tokenize(scorer.tokenizer, PROMPTS, 12)
    assert trunc[3] and not trunc[0]
    with jax.default_matmul_precision("highest"):
        feats_i = scorer.image_features(imgs)
        feats_t = scorer.text_features(PROMPTS)
        score = scorer.score(imgs, PROMPTS)
    with torch.no_grad():
        ri, rt, rs = ref(_ref_pixels(imgs), torch.tensor(ids, dtype=torch.long))
    assert max_err(feats_i, ri) < ATOL
    assert max_err(feats_t, rt) < ATOL
    assert score.shape == (4,) and score.dtype == np.float32
    assert max_err(score, rs) < ATOL
    assert "no logit_scale" in scorer.definition and "x100" in scorer.definition


def test_open_clip_tokenizer_convention(world):
    _, _, _, scorer, _ = world
    tok = scorer.tokenizer
    ids, trunc = hpsv2.open_clip_tokenize(tok, PROMPTS, 12)
    sot, eot = tok.bos_token_id, tok.eos_token_id
    for row, p, cut in zip(ids, PROMPTS, trunc):
        full = [sot] + tok(p, add_special_tokens=False)["input_ids"] + [eot]
        if cut:
            assert len(full) > 12
            want = full[:11] + [eot]      # cut to the context, last token forced to EOT
        else:
            want = full + [0] * (12 - len(full))   # padded with 0
        np.testing.assert_array_equal(row, want)
        assert row.argmax() == list(row).index(eot)   # EOT = argmax pooling position


@pytest.mark.parametrize("hw", [(32, 32), (20, 12), (12, 30), (8, 8)])
def test_preprocess_matches_torch_resize_max_size(hw):
    """ToTensor -> interpolate(bicubic, antialias) of the longest side to 16 -> F.pad zeros
    [w//2, h//2, w - w//2, h - h//2] -> normalise."""
    imgs = images(2, *hw, seed=2)
    h, w = hw
    scale = 16 / max(h, w)
    x = torch.tensor(imgs).permute(0, 3, 1, 2).float() / 255
    nh, nw = round(h * scale), round(w * scale)
    x = nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True,
                                  align_corners=False)
    ph, pw = 16 - nh, 16 - nw
    x = nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    mean = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    ref = (x - mean) / std
    ours = jax.jit(lambda a: hpsv2.hps_preprocess(a, 16))(imgs)
    assert max_err(ours, ref) < 1e-5


def test_strict_open_clip_names(world, tmp_path):
    cfg, ref, _, _, _ = world
    sd = collections.OrderedDict(ref.state_dict())
    sd["visual.transformer.resblocks.1.attn.in_proj"] = sd.pop(
        "visual.transformer.resblocks.1.attn.in_proj_weight")
    torch.save({"state_dict": sd}, str(tmp_path / "renamed.pt"))
    with pytest.raises(CheckpointMismatchError) as e:
        hpsv2.load_model(str(tmp_path / "renamed.pt"), cfg)
    missing, unexpected = [l for l in str(e.value).splitlines() if "keys" in l]
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in missing
    assert unexpected.endswith("visual.transformer.resblocks.1.attn.in_proj")
    sd = collections.OrderedDict(ref.state_dict())
    sd["text_projection"] = torch.zeros(8, 16)
    torch.save({"state_dict": sd}, str(tmp_path / "shape.pt"))
    with pytest.raises(CheckpointMismatchError, match="wrong shape for text_projection"):
        hpsv2.load_model(str(tmp_path / "shape.pt"), cfg)


def test_flat_state_dict_safetensors_and_attn_mask_buffer(world, tmp_path):
    """A flat .pt state dict holding the attn_mask buffer, and a safetensors copy, load the
    same params as hpsv2's {'state_dict': ...} file."""
    from flax import nnx
    from safetensors.torch import save_file
    cfg, ref, path, scorer, _ = world
    sd = dict(ref.state_dict())
    torch.save({**sd, "attn_mask": ref.attn_mask}, str(tmp_path / "flat.pt"))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "hps.safetensors"))
    leaves = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))
    for p in ("flat.pt", "hps.safetensors"):
        m = hpsv2.load_model(str(tmp_path / p), cfg)
        for a, b in zip(leaves(m), leaves(scorer.model)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vit_h_14_config_and_name_map():
    """ViT-H-14 (exact GELU, 16 vision heads of width 80): our model's transformers-layout
    keys and shapes are exactly what the open_clip table produces (no weights needed)."""
    cfg = hpsv2.read_open_clip_config(None)
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size,
            v.patch_size, v.hidden_act) == (1280, 32, 16, 5120, 14, "gelu")
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size,
            t.max_position_embeddings, t.hidden_act) == (1024, 24, 16, 49408, 77, "gelu")
    assert cfg.projection_dim == 1024
    table = hpsv2.name_table(cfg)
    src = {s: shape for s, shape, _, _ in table}
    n_open_clip = sum(int(np.prod(s)) for s in src.values())
    fake = {k: np.broadcast_to(np.float32(0), s) for k, s in src.items()}
    view = hpsv2.OpenCLIPAsHF(fake, table)
    abstract = clip_io.build(cfg)
    ours = {k: shape for k, (_, _, shape) in clip_io.name_map(abstract).items()}
    assert view.shapes() == ours
    assert clip_io.param_count(abstract) == n_open_clip
    assert 985e6 < n_open_clip < 987e6   # open_clip ViT-H-14: 986M parameters
    with pytest.raises(Exception, match="ls_init_value"):
        hpsv2.config_from_open_clip({**hpsv2.VIT_H_14, "vision_cfg": {
            **hpsv2.VIT_H_14["vision_cfg"], "ls_init_value": 1e-5}})
