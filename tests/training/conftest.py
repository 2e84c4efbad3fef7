"""Shared fixtures: a tiny SD-layout pipeline folder, a tiny ingest + manifest work directory,
and one encode run over it (module tests reuse them; building them costs one VAE compile)."""
import json
import shutil

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers as tf

from fifa_jax.data import ingest
from fifa_jax.training import encode
from tests.models.test_clip_tokenizer import write_tiny_clip_tokenizer

TEXT = dict(vocab_size=57, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=12, projection_dim=16,
            bos_token_id=0, eos_token_id=2, pad_token_id=1)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
           norm_num_groups=4, layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
RESOLUTION = 16
K_PAIRS = 24
CORRUPT_RANK = 5          # the manifest pair whose winner image is made undecodable


def _text(root, name, cls, seed, **over):
    torch.manual_seed(seed)
    model = cls(tf.CLIPTextConfig(**{**TEXT, **over})).eval()
    model.save_pretrained(str(root / name))
    return model


@pytest.fixture(scope="session")
def sd_pipe(tmp_path_factory):
    """(folder, {"vae": torch AutoencoderKL, "text_encoder": torch CLIPTextModel})."""
    from diffusers import AutoencoderKL
    root = tmp_path_factory.mktemp("tiny_sd")
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE).eval()
    vae.save_pretrained(str(root / "vae"))
    text = _text(root, "text_encoder", tf.CLIPTextModel, 1)
    write_tiny_clip_tokenizer(root / "tokenizer")
    index = {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [None, None]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root, {"vae": vae, "text_encoder": text}


def make_workdir(root):
    """ingest (the real stage) on a tiny demo world + a hand-made select manifest of K_PAIRS
    pairs; the winner of the manifest's CORRUPT_RANK-th pair points at a broken file."""
    c = ml_collections.ConfigDict({"data": ingest.default_config()})
    c.data.format = "demo"
    c.data.demo.n_prompts = 20
    c.data.demo.n_pairs = 120
    c.data.demo.rows_per_shard = 60
    c.data.num_workers = 1
    ingest.run(c, root)
    pairs = pq.read_table(root / "ingest" / "pairs.parquet")
    rng = np.random.default_rng(0)
    pick = rng.choice(pairs.num_rows, K_PAIRS, replace=False)
    pid = pairs.column("pair_id").to_numpy()[pick]
    prm = pairs.column("prompt_id").to_numpy()[pick]
    (root / "select").mkdir()
    pq.write_table(pa.table({"rank": np.arange(K_PAIRS, dtype=np.int64), "pair_id": pid,
                             "prompt_id": prm}), root / "select" / "manifest.parquet")
    bad = root / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    win = pairs.column("winner_ref").to_pylist()
    win[int(pick[CORRUPT_RANK])] = str(bad)
    pairs = pairs.set_column(pairs.column_names.index("winner_ref"), "winner_ref",
                             pa.array(win, pa.string()))
    pq.write_table(pairs, root / "ingest" / "pairs.parquet")
    return root, int(pid[CORRUPT_RANK])


def encode_config(base_model, **over):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.encode = encode.default_config()
    c.encode.base_model = str(base_model)
    c.encode.resolution = RESOLUTION
    c.encode.num_val_pairs = 10
    c.encode.batch_size = 1          # x 8 CPU devices = 8 images per step
    c.encode.chunk_size = 8
    c.encode.num_workers = 2
    for k, v in over.items():
        c.encode[k] = v
    return c


@pytest.fixture(scope="session")
def ingest_dir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("wd"))


@pytest.fixture(scope="session")
def encoded(ingest_dir, sd_pipe, tmp_path_factory):
    """(workdir, summary, corrupt pair_id) after one full encode run (flips, float32)."""
    src, corrupt = ingest_dir
    wd = tmp_path_factory.mktemp("enc")
    for stage in ("ingest", "select"):
        shutil.copytree(src / stage, wd / stage)
    shutil.copy(src / "broken.jpg", wd / "broken.jpg")
    # refs in pairs.parquet are absolute: the copy reads the same shards and broken file
    summary = encode.run(encode_config(sd_pipe[0]), wd)
    return wd, summary, corrupt
