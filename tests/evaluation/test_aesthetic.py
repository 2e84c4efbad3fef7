"""LAION aesthetic predictor v2: the torch-free .pth reader, the head, the full score.

Heads are real torch `nn.Sequential`s (the predictor's layer indices) saved with torch.save and
read back without torch; the full score is compared with the torch composition
(transformers CLIPVisionModelWithProjection / CLIPModel.get_image_features -> L2 norm -> head).
"""
import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import save_file

from fifa_jax.errors import InputError
from fifa_jax.evaluation import aesthetic
from fifa_jax.evaluation.torch_zip import UnsafePickleError, load as torch_zip_load
from fifa_jax.models.safetensors_io import CheckpointMismatchError
from tests.evaluation.common import (ATOL, clip_pixels, images, max_err, randomize,
                                     write_processor)

VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
              image_size=16, patch_size=4, projection_dim=8, hidden_act="quick_gelu")


class MLP(torch.nn.Module):
    """improved-aesthetic-predictor's MLP (linearMSE), or with ReLUs after the first four
    Linears (reluMSE; the ReLU modules shift the indices)."""

    def __init__(self, dims=(768, 1024, 128, 64, 16), relu=False):
        super().__init__()
        d0, d1, d2, d3, d4 = dims
        act = (lambda: [torch.nn.ReLU()]) if relu else (lambda: [])
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(d0, d1), *act(), torch.nn.Dropout(0.2),
            torch.nn.Linear(d1, d2), *act(), torch.nn.Dropout(0.2),
            torch.nn.Linear(d2, d3), *act(), torch.nn.Dropout(0.1),
            torch.nn.Linear(d3, d4), *act(), torch.nn.Linear(d4, 1))

    def forward(self, x):
        return self.layers(x)


def _head(tmp_path, name, dims, relu, seed):
    torch.manual_seed(seed)
    mlp = MLP(dims, relu).eval()
    path = str(tmp_path / name)
    torch.save(mlp.state_dict(), path)
    return mlp, path


def _run_head(head, x):
    return np.asarray(jax.jit(lambda p, x: aesthetic.head_apply(p, x, head.relu))(
        head.params(), jnp.asarray(x)))


def test_true_shape_linear_head_read_without_torch(tmp_path):
    mlp, path = _head(tmp_path, "sac+logos+ava1-l14-linearMSE.pth", (768, 1024, 128, 64, 16),
                      False, 0)
    head = aesthetic.read_head(path)
    assert not head.relu and head.in_dim == 768
    assert [k.shape for k in head.kernels] == [(768, 1024), (1024, 128), (128, 64), (64, 16),
                                               (16, 1)]
    x = np.random.default_rng(0).normal(size=(5, 768)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with torch.no_grad():
        ref = mlp(torch.tensor(x))[:, 0]
    assert max_err(_run_head(head, x), ref) < 1e-5
    # a safetensors copy with the same keys reads to the same head
    st = str(tmp_path / "head.safetensors")
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, st)
    again = aesthetic.read_head(st)
    for a, b in zip(head.kernels + head.biases, again.kernels + again.biases):
        np.testing.assert_array_equal(a, b)


def test_relu_variant_layout_and_flag(tmp_path):
    mlp, path = _head(tmp_path, "ava+logos-l14-reluMSE.pth", (8, 12, 10, 6, 4), True, 1)
    head = aesthetic.read_head(path)
    assert head.relu   # the reluMSE layout layers.{0,3,6,9,11} selects the ReLUs
    x = np.random.default_rng(1).normal(size=(7, 8)).astype(np.float32)
    with torch.no_grad():
        ref = mlp(torch.tensor(x))[:, 0]
    assert max_err(_run_head(head, x), ref) < 1e-5
    lin = aesthetic.read_head(path, variant="linear")   # explicit flag overrides
    assert not lin.relu and max_err(_run_head(lin, x), ref) > 1e-3


def test_zero_embedding_divides_by_one():
    e = jnp.zeros((2, 3)).at[1].set(jnp.array([3.0, 0.0, 4.0]))
    np.testing.assert_allclose(np.asarray(aesthetic.normalize_embeds(e)),
                               [[0, 0, 0], [0.6, 0, 0.8]], atol=1e-7)


def test_strict_keys_shapes_and_pickle(tmp_path):
    mlp, _ = _head(tmp_path, "ok.pth", (8, 12, 10, 6, 4), False, 2)
    sd = mlp.state_dict()
    bad = collections.OrderedDict(sd)
    bad["layers.5.weight"] = bad.pop("layers.4.weight")
    torch.save(bad, str(tmp_path / "renamed.pth"))
    with pytest.raises(CheckpointMismatchError, match="indices"):
        aesthetic.read_head(str(tmp_path / "renamed.pth"))
    bad = collections.OrderedDict(sd)
    bad["layers.2.weight"] = torch.zeros(10, 11)
    torch.save(bad, str(tmp_path / "shape.pth"))
    with pytest.raises(CheckpointMismatchError, match=r"layers\.2\.weight"):
        aesthetic.read_head(str(tmp_path / "shape.pth"))
    bad = collections.OrderedDict(sd)
    bad["extra.weight"] = torch.zeros(2)
    torch.save(bad, str(tmp_path / "extra.pth"))
    with pytest.raises(CheckpointMismatchError, match=r"extra\.weight"):
        aesthetic.read_head(str(tmp_path / "extra.pth"))
    torch.save(mlp, str(tmp_path / "module.pth"))   # a pickled module: code, not tensors
    with pytest.raises(UnsafePickleError, match="MLP"):
        torch_zip_load(str(tmp_path / "module.pth"))
    (tmp_path / "legacy.pth").write_bytes(b"\x80\x02not a zip")
    with pytest.raises(InputError, match="not a torch zip"):
        aesthetic.read_head(str(tmp_path / "legacy.pth"))


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("aes")
    vision = randomize(tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**VISION)), 3)
    dual = randomize(tf.CLIPModel(tf.CLIPConfig(
        text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=24,
                         num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=8, projection_dim=8),
        vision_config={**VISION, "projection_dim": 512}, projection_dim=8)), 4)
    dirs = {}
    for name, m in (("vision", vision), ("dual", dual)):
        dirs[name] = str(root / name)
        m.save_pretrained(dirs[name])
        cfg = write_processor(dirs[name], 16)
    mlp, head_path = _head(root, "head.pth", (8, 12, 10, 6, 4), False, 5)
    return {"vision": vision, "dual": dual}, dirs, cfg, mlp, head_path


@pytest.mark.parametrize("which", ["vision", "dual"])
def test_aesthetic_score_matches_torch(towers, which):
    models, dirs, cfg, mlp, head_path = towers
    scorer = aesthetic.load_aesthetic(head_path, dirs[which], batch_size=2)
    imgs = images(3, 20, 24, seed=6)   # resized (short side 16) and centre-cropped
    with jax.default_matmul_precision("highest"):
        ours = scorer.score(imgs, ["a", "b", "c"])
    px = clip_pixels(imgs, cfg)
    with torch.no_grad():
        m = models[which]
        e = (m(pixel_values=px).image_embeds if which == "vision"
             else m.get_image_features(pixel_values=px).pooler_output)
        e = e / e.norm(dim=-1, keepdim=True)
        ref = mlp(e)[:, 0]
    assert ours.shape == (3,) and ours.dtype == np.float32
    assert max_err(ours, ref) < ATOL
    assert scorer.name == "aesthetic" and "linearMSE" in scorer.definition


def test_head_dim_must_match_tower(towers, tmp_path):
    _, dirs, _, _, _ = towers
    _, path = _head(tmp_path, "wide.pth", (9, 12, 10, 6, 4), False, 7)
    with pytest.raises(CheckpointMismatchError, match="9-d"):
        aesthetic.load_aesthetic(path, dirs["vision"])
