"""load_pipeline on tiny diffusers pipeline folders assembled here (SD-like and SDXL-like)."""
import json

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from fifa_jax.models import clip_io
from fifa_jax.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from fifa_jax.models.pipeline import load_pipeline
from fifa_jax.models.tokenizers import TokenizerVocabError
from tests.models.test_clip_tokenizer import write_tiny_clip_tokenizer

TEXT = dict(vocab_size=57, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=8, projection_dim=16,
            bos_token_id=0, eos_token_id=2, pad_token_id=1)
SCHEDULER = {"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
             "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading"}


def _count(torch_model):
    return sum(p.numel() for p in torch_model.parameters())


def _text(root, name, cls, seed, **over):
    torch.manual_seed(seed)
    model = cls(tf.CLIPTextConfig(**{**TEXT, **over})).eval()
    model.save_pretrained(str(root / name))
    return model


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    root = tmp_path_factory.mktemp("sd_pipe")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32)
    unet.save_pretrained(str(root / "unet"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(32, 64), norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    vae.save_pretrained(str(root / "vae"))
    text = _text(root, "text_encoder", tf.CLIPTextModel, 1)
    write_tiny_clip_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"],
             "safety_checker": [None, None],
             "feature_extractor": ["transformers", "CLIPImageProcessor"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root, {"unet": unet, "vae": vae, "text_encoder": text}


def test_load_sd_pipeline(sd_folder):
    root, ref = sd_folder
    pipe = load_pipeline(str(root))
    assert pipe.unet is not None and pipe.vae is not None
    assert clip_io.param_count(pipe.unet) == _count(ref["unet"])
    assert clip_io.param_count(pipe.vae) == _count(ref["vae"])
    assert type(pipe.text_encoder) is CLIPTextModel
    assert pipe.text_encoder_2 is None and pipe.tokenizer_2 is None and not pipe.is_sdxl
    assert pipe.scheduler_config == SCHEDULER
    assert pipe.skipped == ("feature_extractor",)
    # the tokenizer and text encoder work together and match transformers
    ids = np.asarray(pipe.tokenizer(["a cat", "ab"], padding="max_length", max_length=8).input_ids)
    graphdef, state = nnx.split(pipe.text_encoder)
    with jax.default_matmul_precision("highest"):
        out = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))(state, ids)
    with torch.no_grad():
        want = ref["text_encoder"](torch.tensor(ids, dtype=torch.long)).last_hidden_state
    assert np.max(np.abs(np.asarray(out.last_hidden_state) - want.numpy())) < 1e-4


def test_load_pipeline_components_subset(sd_folder):
    root, _ = sd_folder
    pipe = load_pipeline(str(root), components=("text_encoder", "tokenizer", "scheduler"))
    assert pipe.unet is None and pipe.vae is None
    assert set(pipe.skipped) == {"feature_extractor", "unet", "vae"}
    with pytest.raises(ValueError, match="unknown pipeline components"):
        load_pipeline(str(root), components=("unet", "refiner"))


def test_load_sdxl_like_text_parts(tmp_path):
    _text(tmp_path, "text_encoder", tf.CLIPTextModel, 1)
    _text(tmp_path, "text_encoder_2", tf.CLIPTextModelWithProjection, 2, hidden_act="gelu")
    write_tiny_clip_tokenizer(tmp_path / "tokenizer")
    write_tiny_clip_tokenizer(tmp_path / "tokenizer_2")
    index = {"_class_name": "StableDiffusionXLPipeline",
             "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    pipe = load_pipeline(str(tmp_path))
    assert type(pipe.text_encoder) is CLIPTextModel
    assert type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert pipe.is_sdxl and len(pipe.tokenizer_2) == 57
    assert pipe.scheduler_config is None and pipe.skipped == ()


def test_pipeline_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"text_encoder": ["transformers", "CLIPTextModel"],
         "tokenizer": ["transformers", "CLIPTokenizer"]}))
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        load_pipeline(str(tmp_path))
    _text(tmp_path, "text_encoder", tf.CLIPTextModel, 1, vocab_size=40)
    write_tiny_clip_tokenizer(tmp_path / "tokenizer")        # 57 tokens > vocab_size 40
    with pytest.raises(TokenizerVocabError, match="vocab_size 40"):
        load_pipeline(str(tmp_path))
