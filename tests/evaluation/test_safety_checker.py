"""SD safety checker against diffusers' torch `StableDiffusionSafetyChecker` (0.42.1).

A tiny CLIPConfig checker with random weights is saved with save_pretrained and loaded by our
loader. diffusers' own per-image result dicts (special / concept scores) are read from its
`forward` frame with a tracer, so the reference is diffusers' code itself, not a copy.
"""
import os
import sys

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from diffusers.pipelines.stable_diffusion import safety_checker as dsc

from fifa_jax.evaluation import safety_checker as sc
from fifa_jax.models.safetensors_io import CheckpointMismatchError
from tests.evaluation.common import clip_pixels, images, max_err, randomize, write_processor

VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
              image_size=16, patch_size=4, hidden_act="quick_gelu")
N_IMG = 8


def torch_forward(model, px):
    """diffusers' forward on pixel values: (has_nsfw list, its per-image result dicts, the
    cosines it computed (special (N, 3), concept (N, 17)))."""
    captured = {}
    code = dsc.StableDiffusionSafetyChecker.forward.__wrapped__.__code__ \
        if hasattr(dsc.StableDiffusionSafetyChecker.forward, "__wrapped__") \
        else dsc.StableDiffusionSafetyChecker.forward.__code__

    def tracer(frame, event, arg):
        if frame.f_code is code:
            def local(frame, event, arg):
                if event == "return":
                    captured["result"] = frame.f_locals["result"]
                    captured["special"] = frame.f_locals["special_cos_dist"]
                    captured["concept"] = frame.f_locals["cos_dist"]
                return local
            return local
        return None

    imgs = [np.ones((2, 2, 3), np.float32) for _ in range(px.shape[0])]
    sys.settrace(tracer)
    try:
        _, has = model(clip_input=px, images=imgs)
    finally:
        sys.settrace(None)
    return list(has), captured["result"], captured["special"], captured["concept"]


def _scores(result, key, n):
    return np.array([[r[key][j] for j in range(n)] for r in result], np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    cfg = tf.CLIPConfig(text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=24,
                                         num_hidden_layers=1, num_attention_heads=2),
                        vision_config=VISION, projection_dim=8)
    torch.manual_seed(0)
    model = randomize(dsc.StableDiffusionSafetyChecker(cfg), 1, scale=0.3)
    imgs = images(N_IMG, 18, 16, seed=2)
    proc = write_processor(str(root / "probe"), 16)
    px = clip_pixels(imgs, proc)
    # thresholds above every image's cosine but for concepts 3 and 10 (about half of the
    # images, a few more with the special-care adjustment): a mix of flags
    _, _, s_cos, c_cos = torch_forward(model, px)
    c_thr = c_cos.max(0) + 0.02
    c_thr[3] = np.median(c_cos[:, 3])
    c_thr[10] = np.quantile(c_cos[:, 10], 0.8)
    _set(model, np.quantile(s_cos, 0.7, 0).astype(np.float32), c_thr.astype(np.float32))
    path = str(root / "safety_checker")
    model.save_pretrained(path)
    write_processor(str(root / "feature_extractor"), 16)   # the pipeline's sibling folder
    checker = sc.load_safety_checker(path, batch_size=4)
    return model, checker, imgs, px, path


@pytest.fixture(autouse=True)
def _restore_thresholds(world):
    """Tests move the torch model's thresholds; put the saved ones back afterwards."""
    model = world[0]
    saved = [model.special_care_embeds_weights.detach().clone(),
             model.concept_embeds_weights.detach().clone()]
    yield
    _set(model, *saved)


def test_random_inputs_match_diffusers(world):
    model, checker, imgs, px, _ = world
    with jax.default_matmul_precision("highest"):
        ours = checker.check(imgs)
    has, result, s_cos, c_cos = torch_forward(model, px)
    assert max_err(ours.special_cos, s_cos) < 1e-5
    assert max_err(ours.concept_cos, c_cos) < 1e-5
    np.testing.assert_array_equal(ours.has_nsfw, has)
    assert 0 < sum(has) < N_IMG, "the fixture should flag some images, not all"
    assert max_err(ours.concept_scores, _scores(result, "concept_scores", 17)) < 1e-5
    assert max_err(ours.special_scores, _scores(result, "special_scores", 3)) < 1e-5
    np.testing.assert_array_equal(ours.bad_concepts.nonzero()[1],
                                  [c for r in result for c in r["bad_concepts"]])
    np.testing.assert_array_equal(checker.score(imgs, [""] * N_IMG), np.float32(has))
    assert not checker.higher_is_better


def _boundary_thresholds(s_cos, c_cos, deltas_c, deltas_s):
    """Thresholds putting image i_k's cosine at cos - thr = delta_k for each concept k."""
    n = c_cos.shape[0]
    c_thr = np.array([c_cos[k % n, k] - d for k, d in enumerate(deltas_c)], np.float32)
    s_thr = np.array([s_cos[(2 * j) % n, j] - d for j, d in enumerate(deltas_s)], np.float32)
    return s_thr, c_thr


# cos - thr just either side of the 3-decimal rounding boundary (+0.0005), of 0.0015, of -0.0005,
# and 0.0095 below it (flagged only with the special-care adjustment +0.01)
DELTAS_C = [5.2e-4, 4.8e-4, 1.52e-3, -4.8e-4, -9.48e-3, -9.52e-3, 5.2e-4, 4.8e-4, -9.48e-3,
            -9.52e-3, 1e-2, -2e-2, 5.02e-4, 4.98e-4, -9.498e-3, -9.502e-3, 0.0]
DELTAS_S = [5.2e-4, 4.8e-4, 5.2e-4]


def _set(model, s_thr, c_thr):
    with torch.no_grad():
        model.special_care_embeds_weights.copy_(torch.as_tensor(s_thr))
        model.concept_embeds_weights.copy_(torch.as_tensor(c_thr))


def test_boundary_cases_end_to_end(world, tmp_path):
    """Thresholds 2e-6 .. 2e-5 from the rounding boundaries, saved and loaded; the decisions on
    our own (JAX) cosines match diffusers' exactly."""
    model, checker, imgs, px, _ = world
    with jax.default_matmul_precision("highest"):
        s_ours, c_ours = checker.cosines(imgs)
    _, _, s_cos, c_cos = torch_forward(model, px)
    s_thr, c_thr = _boundary_thresholds(s_cos, c_cos, DELTAS_C, DELTAS_S)
    _set(model, s_thr, c_thr)
    path = str(tmp_path / "boundary")
    model.save_pretrained(path)
    loaded = sc.load_model(path)   # thresholds through the file; the tower is the same
    ours = sc.nsfw_decision(s_ours, c_ours, np.asarray(loaded.special_care_embeds_weights[...]),
                            np.asarray(loaded.concept_embeds_weights[...]))
    has, result, _, _ = torch_forward(model, px)
    np.testing.assert_array_equal(ours.has_nsfw, has)
    np.testing.assert_array_equal(ours.bad_concepts,
                                  _scores(result, "concept_scores", 17) > 0)
    np.testing.assert_array_equal(ours.special_care, _scores(result, "special_scores", 3) > 0)
    assert max_err(ours.concept_scores, _scores(result, "concept_scores", 17)) < 1e-5
    assert ours.special_care.any() and not ours.special_care.all()


def _ulps(x, k):
    """x moved k float32 steps."""
    x = np.float32(x)
    for _ in range(abs(k)):
        x = np.nextafter(x, np.float32(np.inf if k > 0 else -np.inf))
    return x


@pytest.mark.parametrize("thr_base", [0.0, 0.25])
def test_bitwise_decision_on_synthetic_cosines(world, monkeypatch, thr_base):
    """diffusers' loop runs on our numbers (its `cosine_distance` patched to return them):
    cosines a few float32 steps either side of every rounding boundary (cos - thr at 0.0005,
    0.0015, -0.0005, and -0.0095 where only the special-care +0.01 flags). Our vectorised
    decision and scores equal diffusers' bit for bit."""
    model, _, _, px, _ = world
    base = [0.0005, 0.0015, -0.0005, -0.0095, -0.0105, 0.0]
    cands = np.array([_ulps(np.float32(b) + np.float32(thr_base), k)
                      for b in base for k in range(-3, 4)], np.float32)
    far = np.float32(thr_base) - np.float32(0.5)
    thr = lambda n: np.full(n, thr_base, np.float32)
    _set(model, thr(3), thr(17))
    flags = []
    for seed in range(6):   # each image: two near-boundary concepts, the others far below
        rng = np.random.default_rng(seed)
        c_cos = np.full((N_IMG, 17), far, np.float32)
        s_cos = np.full((N_IMG, 3), far, np.float32)
        for i in range(N_IMG):
            c_cos[i, rng.choice(17, 2, replace=False)] = rng.choice(cands, 2)
            s_cos[i, rng.integers(3)] = rng.choice(cands)

        def fake(image_embeds, text_embeds, s_cos=s_cos, c_cos=c_cos):
            return torch.as_tensor(s_cos if text_embeds.shape[0] == 3 else c_cos)
        monkeypatch.setattr(dsc, "cosine_distance", fake)
        has, result, s2, _ = torch_forward(model, px)
        np.testing.assert_array_equal(s2, s_cos)
        ours = sc.nsfw_decision(s_cos, c_cos, thr(3), thr(17))
        np.testing.assert_array_equal(ours.has_nsfw, has)
        np.testing.assert_array_equal(ours.concept_scores,
                                      _scores(result, "concept_scores", 17))
        np.testing.assert_array_equal(ours.special_scores,
                                      _scores(result, "special_scores", 3))
        flags += has
    assert 0.2 < np.mean(flags) < 0.8


def test_special_adjustment_is_sequential():
    """Special concept j is scored with +0.01 only after an earlier one fired (diffusers'
    loop), and any special hit lowers every concept threshold by 0.01."""
    s_cos = np.array([[0.0, 0.2, 0.0], [0.2, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    s_thr = np.array([0.1, 0.1, 0.0053], np.float32)
    c_cos = np.full((3, 17), 0.3, np.float32)
    c_thr = np.full(17, 0.3 + 0.006, np.float32)
    r = sc.nsfw_decision(s_cos, c_cos, s_thr, c_thr)
    np.testing.assert_allclose(r.special_scores[:, 2], [0.005, 0.005, -0.005], atol=1e-7)
    np.testing.assert_array_equal(r.has_nsfw, [True, True, False])
    np.testing.assert_allclose(r.concept_scores[:, 0], [0.004, 0.004, -0.006], atol=1e-7)


def test_strict_loading(world, tmp_path):
    from safetensors.numpy import load_file, save_file
    _, _, _, _, path = world
    t = load_file(os.path.join(path, "model.safetensors"))
    t["concept_embeds"] = np.zeros((16, 8), np.float32)
    out = tmp_path / "bad"
    out.mkdir()
    save_file(t, str(out / "model.safetensors"))
    (out / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(CheckpointMismatchError, match="wrong shape for concept_embeds"):
        sc.load_model(str(out))
    del t["concept_embeds"]
    save_file(t, str(out / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="concept_embeds"):
        sc.load_model(str(out))


def test_pytorch_bin_read_without_torch(world, tmp_path):
    """A folder with only pytorch_model.bin (4.x-style, with the position_ids buffer) loads
    torch-free to the same params as the safetensors folder."""
    from flax import nnx
    model, checker, _, _, path = world
    sd = dict(model.state_dict())
    sd["vision_model.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(sd, str(tmp_path / "pytorch_model.bin"))
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    a = sc.load_model(str(tmp_path))
    leaves = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))
    assert len(leaves(a)) == len(leaves(checker.model))
    for x, y in zip(leaves(a), leaves(checker.model)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_blank_flagged():
    x = np.full((3, 2, 2, 3), 7, np.uint8)
    out = sc.blank_flagged(x, np.array([False, True, False]))
    assert out[1].max() == 0 and out[0].min() == 7 and x[1].min() == 7
