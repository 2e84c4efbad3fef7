"""Parity of the Flax decoder LM with transformers' PyTorch models (CPU, float32).

Tiny random configs of each family (Llama with llama3 rope scaling and biases, Qwen2, Gemma2
with soft-capping and sliding windows, Gemma3-text with q/k norms, local/global rope bases and
linear scaling); a padded batch (one full row, one left-padded, one right-padded).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fifa_jax.models import llm_io  # noqa: E402
from fifa_jax.models.llm import positions_from_mask  # noqa: E402

V = 97
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)

CONFIGS = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        COMMON, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})),
    "llama_linear_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        COMMON, head_dim=16, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 100.0, "factor": 3.0})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        COMMON, tie_word_embeddings=False, rope_parameters={"rope_type": "default",
                                                             "rope_theta": 1000.0})),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        COMMON, head_dim=16, query_pre_attn_scalar=12, sliding_window=3,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        COMMON, head_dim=16, query_pre_attn_scalar=12, sliding_window=3,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
}

T = 9
MASK = np.ones((3, T), np.int32)
MASK[1, :3] = 0   # left padding
MASK[2, -2:] = 0  # right padding


def _randomise(model, seed):
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                base = 0.0 if "Gemma" in type(model).__name__ else 1.0
                p.copy_(torch.from_numpy(base + 0.2 * rng.standard_normal(p.shape)).float())
            else:
                p.copy_(torch.from_numpy(0.15 * rng.standard_normal(p.shape)).float())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request, tmp_path_factory):
    cfg_name, cls_name, kw = CONFIGS[request.param]
    cfg = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(0)
    ref = getattr(transformers, cls_name)(cfg).eval()
    ref.config._attn_implementation = "eager"
    _randomise(ref, seed=len(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return request.param, ref, str(folder)


def _flax_logits(folder):
    model = llm_io.load_llm(folder, dtype=jnp.float32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, ids, mask):
        m = nnx.merge(graphdef, state)
        return m.logits(m(ids, mask))

    return fwd, state


def test_logits_match_transformers(family):
    name, ref, folder = family
    ids = np.random.default_rng(1).integers(1, V, size=(3, T)).astype(np.int32)
    ids = np.where(MASK == 1, ids, 0)
    pos = np.array(positions_from_mask(jnp.asarray(MASK)))
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids).long(),
                   attention_mask=torch.from_numpy(MASK).long(),
                   position_ids=torch.from_numpy(pos).long()).logits.numpy()
    fwd, state = _flax_logits(folder)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(fwd(state, jnp.asarray(ids), jnp.asarray(MASK)))
    real = MASK.astype(bool)
    assert np.all(np.isfinite(got))
    err = np.max(np.abs(got[real] - want[real]))
    assert err < 1e-4, f"{name}: max abs logit error {err}"
    # The test is not vacuous: logits vary across positions and rows.
    assert np.std(want[real]) > 0.05


def test_gemma3_multimodal_checkpoint_text_path(tmp_path):
    """A Gemma3 image-text checkpoint: our LM reads `language_model.*`, skips the vision tower."""
    text = dict(CONFIGS["gemma3"][2])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(0)
    ref = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    ref.config._attn_implementation = "eager"
    ref.config.text_config._attn_implementation = "eager"
    _randomise(ref, seed=7)
    ref.save_pretrained(tmp_path)
    ids = np.random.default_rng(2).integers(1, V, size=(3, T)).astype(np.int32)
    ids = np.where(MASK == 1, ids, 0)
    pos = np.array(positions_from_mask(jnp.asarray(MASK)))
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids).long(),
                   attention_mask=torch.from_numpy(MASK).long(),
                   position_ids=torch.from_numpy(pos).long()).logits.numpy()
    fwd, state = _flax_logits(str(tmp_path))
    with jax.default_matmul_precision("highest"):
        got = np.asarray(fwd(state, jnp.asarray(ids), jnp.asarray(MASK)))
    real = MASK.astype(bool)
    assert np.max(np.abs(got[real] - want[real])) < 1e-4
