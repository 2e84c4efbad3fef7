"""Prompt embeddings: MiniLM (BERT path) == sentence-transformers on the real weights; CLIP
path == transformers' CLIP text features; 8 devices == 1 device bit for bit (batch_size is per
device); truncation counted; no prompts give (0, d)."""
import jax
import ml_collections
import numpy as np
import pytest

from fifa_jax import parallel
from fifa_jax.demo import reward as demo_reward
from fifa_jax.scoring import embeddings

PROMPTS = [
    "a photo of a cat sitting on a red chair",
    "A majestic dragon flying over a medieval castle at sunset, highly detailed, 8k",
    "portrait of an old man, oil painting",
    "",  # empty prompts happen in real data
    "cyberpunk street at night with neon lights and rain reflections " * 30,  # > 256 tokens
    "ÉLÉPHANT rose dans la neige — 雪の中の象",
    "minimal logo",
]


def _mesh(n):
    return parallel.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}),
                              devices=jax.devices()[:n])


def _cfg(kind, path="", batch_size=4):
    return ml_collections.ConfigDict({"kind": kind, "path": path, "batch_size": batch_size})


@pytest.fixture(scope="module")
def minilm8():
    with jax.default_matmul_precision("highest"):
        return embeddings.embed_prompts(PROMPTS, _cfg("bert"), _mesh(8))


def test_minilm_matches_sentence_transformers(minilm8):
    from sentence_transformers import SentenceTransformer
    path = embeddings.default_bert_path()
    st = SentenceTransformer(path, device="cpu")
    want = st.encode(PROMPTS, convert_to_numpy=True, normalize_embeddings=False,
                     batch_size=len(PROMPTS))
    got = minilm8.embeddings
    assert got.shape == (len(PROMPTS), 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert minilm8.n_truncated == 1 and minilm8.truncated_ids == [4]
    assert minilm8.max_length == st.max_seq_length == 256


def test_minilm_one_device_equals_eight(minilm8):
    with jax.default_matmul_precision("highest"):
        one = embeddings.embed_prompts(PROMPTS, _cfg("bert"), _mesh(1))
    np.testing.assert_array_equal(one.embeddings, minilm8.embeddings)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return demo_reward.build_demo_reward(tmp_path_factory.mktemp("clip") / "reward")


def test_clip_path_matches_transformers(clip_path):
    import torch
    from transformers import CLIPModel
    path = clip_path
    texts = PROMPTS[:4] + ["a " * 100]
    with jax.default_matmul_precision("highest"):
        res = embeddings.embed_prompts(texts, _cfg("clip", str(path)), _mesh(8))
    tok = embeddings.load_tokenizer(str(path))
    enc = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    model = CLIPModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        want = model.get_text_features(input_ids=enc["input_ids"],
                                       attention_mask=enc["attention_mask"])
        want = getattr(want, "pooler_output", want).numpy()
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(res.embeddings, want, atol=1e-5, rtol=0)
    assert res.n_truncated == 1 and res.truncated_ids == [4] and res.max_length == 77


def test_bad_kind_is_named():
    with pytest.raises(ValueError, match="score.embedder.kind"):
        embeddings.embed_prompts(["x"], _cfg("word2vec"), _mesh(1))


def test_clip_one_device_equals_eight(clip_path):
    eight = embeddings.embed_prompts(PROMPTS, _cfg("clip", str(clip_path), 2), _mesh(8))
    one = embeddings.embed_prompts(PROMPTS, _cfg("clip", str(clip_path), 2), _mesh(1))
    np.testing.assert_array_equal(one.embeddings, eight.embeddings)


def test_no_prompts_give_empty_embeddings(clip_path):
    res = embeddings.embed_prompts([], _cfg("bert"), _mesh(8))
    assert res.embeddings.shape == (0, 384) and res.embeddings.dtype == np.float32
    assert res.n_truncated == 0 and res.truncated_ids == []
    res = embeddings.embed_prompts([], _cfg("clip", str(clip_path)), _mesh(8))
    assert res.embeddings.shape == (0, 16) and res.embeddings.dtype == np.float32
