"""CLIP score (torchmetrics' definition) and PickScore against transformers' CLIPModel."""
import jax
import numpy as np
import pytest
import torch
import transformers as tf

from fifa_jax.evaluation import clip_scores as cs
from tests.evaluation.common import (ATOL, clip_pixels, images, max_err, randomize,
                                     write_processor, write_tokenizer)

PROMPTS = ["a red cat", "a dog in the city", "a red cat", "portrait of a woman, oil painting"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clip") / "clip")
    vocab, bos, eos = write_tokenizer(path)
    cfg = tf.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=16, intermediate_size=24,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=3, image_size=16, patch_size=4),
        projection_dim=8)
    model = randomize(tf.CLIPModel(cfg), 1, scale=0.3)
    model.save_pretrained(path)
    proc = write_processor(path, 16)
    tok = tf.CLIPTokenizer.from_pretrained(path)
    return model, path, proc, tok


def _torch_cos(model, proc, tok, imgs, prompts):
    enc = tok(prompts, padding="max_length", max_length=77, truncation=True,
              return_tensors="pt")
    with torch.no_grad():
        t = model.get_text_features(input_ids=enc["input_ids"],
                                    attention_mask=enc["attention_mask"]).pooler_output
        i = model.get_image_features(pixel_values=clip_pixels(imgs, proc)).pooler_output
    t = t / t.norm(dim=-1, keepdim=True)
    i = i / i.norm(dim=-1, keepdim=True)
    return (i * t).sum(-1), model.logit_scale.exp()


def test_clip_score_matches_transformers(world):
    model, path, proc, tok = world
    scorer = cs.load_clip_score(path, batch_size=2)
    imgs = images(4, 20, 17, seed=3)
    with jax.default_matmul_precision("highest"):
        ours = scorer.score(imgs, PROMPTS)
        cos = scorer.cosines(imgs, PROMPTS)
    ref_cos, _ = _torch_cos(model, proc, tok, imgs, PROMPTS)
    assert max_err(cos, ref_cos) < ATOL / 100
    ref = torch.clamp(100 * ref_cos, min=0)   # torchmetrics: max(100 * cos, 0)
    assert ours.shape == (4,) and ours.dtype == np.float32
    assert max_err(ours, ref) < ATOL * 10   # x100 scale: 1e-3 on the score = 1e-5 on cos
    assert (ref_cos < 0).any() and (ours[ref_cos.numpy() < 0] == 0).all()
    assert "max(100 * cos" in scorer.definition


def test_pickscore_matches_transformers(world):
    model, path, proc, tok = world
    scorer = cs.load_pickscore(path, batch_size=2)
    imgs = images(3, 16, 16, seed=4)
    with jax.default_matmul_precision("highest"):
        ours = scorer.score(imgs, PROMPTS[:3])
    ref_cos, scale = _torch_cos(model, proc, tok, imgs, PROMPTS[:3])
    assert max_err(ours, scale * ref_cos) < ATOL
    assert scorer.name == "pickscore" and "exp(logit_scale)" in scorer.definition


def test_bad_inputs(world):
    _, path, _, _ = world
    scorer = cs.load_clip_score(path)
    with pytest.raises(ValueError, match="uint8"):
        scorer.score(np.zeros((1, 16, 16, 3), np.float32), ["x"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.score(images(2, 16, 16), ["x"])
    assert scorer.score(images(0, 16, 16), []).shape == (0,)
