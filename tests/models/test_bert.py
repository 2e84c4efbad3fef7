"""Flax BERT encoder == transformers' PyTorch BertModel on a tiny random config; strict loading."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fifa_jax.models import bert
from fifa_jax.models.safetensors_io import CheckpointMismatchError, write_safetensors

TINY = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=24, type_vocab_size=2,
            layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)


@pytest.fixture(scope="module")
def torch_tiny(tmp_path_factory):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY)).eval()
    with torch.no_grad():  # non-trivial LayerNorm params so a swapped scale/bias shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(folder)  # includes pooler.* keys, which we tolerate
    return model, folder


def test_tiny_parity(torch_tiny):
    model, folder = torch_tiny
    ours = bert.load_bert(str(folder))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, TINY["vocab_size"], (3, 11))
    mask = np.ones((3, 11), np.int64)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    types = rng.integers(0, 2, (3, 11))
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)))
    valid = mask.astype(bool)  # padded query rows are not part of the contract
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)
    # mean pooling against the obvious numpy formula
    pooled = np.asarray(bert.mean_pool(jnp.asarray(want), jnp.asarray(mask)))
    ref = (want * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(pooled, ref, atol=1e-6)


def test_strict_loading_names_keys(torch_tiny, tmp_path):
    model, _ = torch_tiny
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    del sd["encoder.layer.1.output.dense.bias"]
    sd["encoder.layer.0.intermediate.dense.weight"] = np.zeros((7, 32), np.float32)
    sd["encoder.layer.9.extra.weight"] = np.zeros((2,), np.float32)
    write_safetensors(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY, model_type="bert")))
    with pytest.raises(CheckpointMismatchError) as e:
        bert.load_bert(str(tmp_path))
    msg = str(e.value)
    for key in ("encoder.layer.1.output.dense.bias", "encoder.layer.0.intermediate.dense.weight",
                "encoder.layer.9.extra.weight", "model.safetensors"):
        assert key in msg


def test_rejects_relative_positions():
    with pytest.raises(ValueError, match="position_embedding_type"):
        bert.BertConfig.from_dict(dict(TINY, position_embedding_type="relative_key"), "x.json")
