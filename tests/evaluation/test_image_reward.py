"""ImageReward against a PyTorch reference on tiny random weights saved in ImageReward.pt's
layout (float32, max abs error < 1e-4), strict name map, and the scorer end to end.

The reference: the `image-reward` wheel pins timm==0.6.13 and fairscale==0.4.13 and its BLIP
`med.py` targets transformers 4.x, so it does not install cleanly beside transformers 5 here.
It is built instead from transformers' BLIP classes, which are the same architecture:
`BlipVisionModel` (timm-layout ViT, fused qkv, final LayerNorm over all tokens) and
`BlipTextModel` configured `is_decoder=True` (that adds the cross-attention layers; called with
the default is_decoder=False it is BLIP's bidirectional "multimodal" encoder), plus a torch
`nn.Sequential` MLP with ImageReward's Linear / Dropout layout (Linears at 0, 2, 4, 6, 7). Its
state dict is renamed to ImageReward.pt's keys (`blip.visual_encoder.*` in timm names,
`blip.text_encoder.*`, `mlp.layers.*`, plus BLIP's unused `vision_proj` / `text_proj`) and saved
with torch.save; our loader reads that file without torch.
"""
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fifa_jax.evaluation import image_reward as ir  # noqa: E402
from fifa_jax.models.safetensors_io import CheckpointMismatchError  # noqa: E402

S, P, WV, D, VOCAB, LMAX = 32, 8, 192, 128, 60, 40
MLP_DIMS = (48, 24, 12, 6)

_VISION = [(r"^embeddings\.class_embedding$", "cls_token"),
           (r"^embeddings\.position_embedding$", "pos_embed"),
           (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
           (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
           (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
           (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
           (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
           (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
           (r"^post_layernorm\.", "norm.")]


def _vision_name(k):
    for pat, rep in _VISION:
        if re.match(pat, k):
            return "blip.visual_encoder." + re.sub(pat, rep, k)
    raise KeyError(k)


class Reference(torch.nn.Module):
    """ImageReward's forward on transformers' BLIP towers (see the module docstring)."""

    def __init__(self):
        super().__init__()
        vc = transformers.BlipVisionConfig(hidden_size=WV, intermediate_size=4 * WV,
                                           num_hidden_layers=2, num_attention_heads=WV // 64,
                                           image_size=S, patch_size=P, layer_norm_eps=1e-6,
                                           hidden_act="gelu")
        tc = transformers.BlipTextConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=2 * D,
                                         num_hidden_layers=2, num_attention_heads=D // 64,
                                         max_position_embeddings=LMAX, encoder_hidden_size=WV,
                                         is_decoder=True, hidden_act="gelu",
                                         layer_norm_eps=1e-12)
        self.vision = transformers.BlipVisionModel(vc)
        self.text = transformers.BlipTextModel(tc, add_pooling_layer=False)
        dims = (D,) + MLP_DIMS
        L = torch.nn.Linear
        self.mlp = torch.nn.Sequential(L(dims[0], dims[1]), torch.nn.Dropout(0.2),
                                       L(dims[1], dims[2]), torch.nn.Dropout(0.2),
                                       L(dims[2], dims[3]), torch.nn.Dropout(0.1),
                                       L(dims[3], dims[4]), L(dims[4], 1))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x, ids, mask):
        v = self.vision(pixel_values=x).last_hidden_state
        h = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=v,
                      encoder_attention_mask=torch.ones(v.shape[:2], dtype=torch.long)
                      ).last_hidden_state[:, 0]
        return ((self.mlp(h) - ir.MEAN) / ir.STD)[:, 0]

    def image_reward_state_dict(self):
        out = {_vision_name(k): v for k, v in self.vision.state_dict().items()}
        out.update({"blip.text_encoder." + k: v for k, v in self.text.state_dict().items()
                    if not k.endswith("position_ids")})
        out.update({"mlp.layers." + k: v for k, v in self.mlp.state_dict().items()})
        out["blip.text_encoder.embeddings.position_ids"] = torch.arange(LMAX)[None]
        out["blip.vision_proj.weight"] = torch.zeros(16, WV)        # BLIP's, unused
        out["blip.vision_proj.bias"] = torch.zeros(16)
        out["blip.text_proj.weight"] = torch.zeros(16, D)
        out["blip.text_proj.bias"] = torch.zeros(16)
        return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    ref = Reference().eval()
    path = tmp_path_factory.mktemp("ir") / "ImageReward.pt"
    torch.save(ref.image_reward_state_dict(), path)
    return ref, str(path)


def _inputs(n=3, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, S, S)).astype(np.float32)
    ids = rng.integers(1, VOCAB, (n, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, 7:] = 0                       # padding on one prompt
    ids[0, 7:] = 0
    return x, ids, mask


def test_forward_matches_the_torch_reference(saved):
    ref, path = saved
    params, cfg = ir.params_from_state_dict(ir.read_tensors(path), source=path)
    assert (cfg.image_size, cfg.patch, cfg.vision_width, cfg.vision_layers, cfg.vision_heads,
            cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.mlp_dims) == \
        (S, P, WV, 2, 3, D, 2, 2, MLP_DIMS)
    x, ids, mask = _inputs()
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(lambda p, *a: ir.reward(p, cfg, *a))(
            params, x, ids.astype(np.int32), mask.astype(np.int32)))
    assert np.max(np.abs(got - want)) < 1e-4, (got, want)
    assert np.std(want) > 1e-3              # the inputs really change the reward


def test_strict_name_map(saved, tmp_path):
    ref, _ = saved
    sd = {k: v.numpy() for k, v in ref.image_reward_state_dict().items()}
    extra = dict(sd, **{"blip.itm_head.weight": np.zeros((2, D), np.float32)})
    with pytest.raises(CheckpointMismatchError, match="blip.itm_head.weight"):
        ir.params_from_state_dict(extra)
    less = {k: v for k, v in sd.items() if k != "blip.text_encoder.encoder.layer.1."
            "crossattention.self.key.weight"}
    with pytest.raises(CheckpointMismatchError, match="crossattention.self.key.weight"):
        ir.params_from_state_dict(less, ir.infer_config(sd))
    bad = dict(sd, **{"mlp.layers.7.bias": np.zeros((2,), np.float32)})
    with pytest.raises(CheckpointMismatchError, match=r"mlp.layers.7.bias has shape \(2,\)"):
        ir.params_from_state_dict(bad)
    # the published sizes give the published table
    table = ir.name_table(ir.ImageRewardConfig())
    assert table["blip.visual_encoder.pos_embed"] == (1, 197, 1024)
    assert table["blip.text_encoder.encoder.layer.11.crossattention.self.key.weight"] == \
        (768, 1024)
    assert table["mlp.layers.0.weight"] == (1024, 768) and table["mlp.layers.7.weight"] == (1, 16)


def test_scorer_end_to_end(saved, tmp_path):
    """Images at the crop size pass through unchanged; prompts go through a BERT tokenizer
    padded to 35: the scorer equals the reference on the same normalised pixels and ids."""
    ref, path = saved
    words = ["a", "red", "cat", "on", "the", "mat", "dog", "blue"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    scorer = ir.load_image_reward(path, str(tmp_path), batch_size=2)
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, S, S, 3), dtype=np.uint8)
    prompts = ["a red cat on the mat", "a blue dog", "the cat"]
    got = scorer.score(images, prompts)
    ids, mask = scorer.tokenize(prompts)
    assert ids.shape == (3, ir.MAX_LENGTH) and ids[0, 0] == 2 and mask[1].sum() == 5
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
    x = ((images.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2)
    with torch.no_grad():
        want = ref(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(ids).long(),
                   torch.from_numpy(mask).long()).numpy()
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_evaluate_stage_builds_it_as_an_optional_scorer(saved, tmp_path):
    from fifa_jax.errors import InputError
    from fifa_jax.evaluation import scorers, stage
    _, path = saved
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n")
    sc = stage.default_config().scorers
    built, missing = scorers.build(sc, workdir=tmp_path, base_model=str(tmp_path))
    assert "image_reward" in missing and "image_reward" not in built
    sc.image_reward = path
    with pytest.raises(InputError, match="evaluate.scorers.image_reward_tokenizer"):
        scorers.build(sc, workdir=tmp_path, base_model=str(tmp_path))
    sc.image_reward_tokenizer = str(tmp_path)
    built, missing = scorers.build(sc, workdir=tmp_path, base_model=str(tmp_path))
    assert "image_reward" not in missing
    fn, key = built["image_reward"]
    images = np.zeros((2, S, S, 3), np.uint8)
    assert fn(images, ["a", "a"]).shape == (2,) and len(key) == 12
