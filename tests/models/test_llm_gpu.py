"""GPU-only checks of the decoder LM and the jax judge (skipped on CPU).

Run on a GPU machine with `JAX_PLATFORMS=cuda python -m pytest tests/models/test_llm_gpu.py -s`:
bf16 with the cuDNN attention path ("auto") agrees with float32 XLA on a left-padded batch, for a
Llama-shaped model (head_dim 128) and a Gemma2-shaped one (soft-capping, windows, head_dim 256),
and the judge's throughput on a ~0.2B-parameter random model is printed.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

from fifa_jax.models import llm_io  # noqa: E402
from fifa_jax.models.llm import next_token_logits  # noqa: E402
from fifa_jax.models.llm_config import from_hf_dict  # noqa: E402

SHAPES = {
    "llama": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 1024,
              "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 4, "head_dim": 128, "rope_theta": 500000.0,
              "tie_word_embeddings": False},
    "gemma2": {"model_type": "gemma2", "vocab_size": 32000, "hidden_size": 1024,
               "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 256, "query_pre_attn_scalar": 256,
               "sliding_window": 64, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0},
}


def _logprobs(folder, dtype, impl, ids, mask):
    model = llm_io.load_llm(folder, dtype=dtype, attn_impl=impl)
    g, s = nnx.split(model)
    f = jax.jit(lambda s, i, m: jax.nn.log_softmax(next_token_logits(nnx.merge(g, s), i, m)))
    return np.asarray(f(s, ids, mask))


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_bf16_auto_matches_f32(name, tmp_path):
    hf = SHAPES[name]
    llm_io.save_checkpoint(str(tmp_path), hf,
                           llm_io.random_torch_weights(from_hf_dict(hf), seed=0, std=0.05))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32000, (8, 200)).astype(np.int32)
    mask = np.ones_like(ids)
    for i in range(8):
        mask[i, :17 * i] = 0
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    with jax.default_matmul_precision("highest"):
        ref = _logprobs(str(tmp_path), jnp.float32, "xla", ids, mask)
    bf_auto = _logprobs(str(tmp_path), jnp.bfloat16, "auto", ids, mask)
    bf_xla = _logprobs(str(tmp_path), jnp.bfloat16, "xla", ids, mask)
    p = np.exp(ref)
    tv_auto = 0.5 * np.abs(np.exp(bf_auto) - p).sum(-1).max()
    tv_xla = 0.5 * np.abs(np.exp(bf_xla) - p).sum(-1).max()
    print(f"\n{name}: total variation bf16-auto vs f32 {tv_auto:.4f}, "
          f"bf16-xla vs f32 {tv_xla:.4f}, "
          f"max |dlogp| auto-vs-xla {np.abs(bf_auto - bf_xla).max():.4f}")
    assert np.isfinite(bf_auto).all()
    assert tv_auto < 0.05 and tv_xla < 0.05


def test_judge_throughput(tmp_path):
    from fifa_jax.scoring.judge import build_tiny_judge_checkpoint, default_config, judge_prompts
    path = build_tiny_judge_checkpoint(str(tmp_path / "j"), seed=0, hidden_size=1024,
                                       num_layers=12)
    cfg = default_config()
    cfg.model_path = path
    cfg.batch_size = 128
    cfg.max_length = 256
    cfg.buckets = (192, 256)
    cfg.min_rating_mass = 0.0
    words = "a photo of the red cat in the forest with cinematic lighting".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=rng.integers(5, 120))) + f" {i}"
             for i in range(2048)]
    judge_prompts(texts[:128], cfg)                          # compile both buckets
    t0 = time.time()
    r = judge_prompts(texts, cfg)
    dt = time.time() - t0
    print(f"\njudge: {len(texts)} prompts in {dt:.2f}s = {len(texts) / dt:.0f} prompts/s "
          f"(bf16, {jax.devices()[0].device_kind}); ok {int(r.ok.sum())}")
    assert r.ok.all()
