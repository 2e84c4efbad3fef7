"""Flax NNX models with strict weight interchange to the PyTorch diffusers / transformers layouts.

    load_unet / save_unet           diffusers UNet2DConditionModel folders (SD1.5, 2.x, XL)
    load_vae / save_vae             diffusers AutoencoderKL folders
    load_clip / save_clip           transformers CLIPModel (PickScore and other dual towers)
    load_text_encoder / save_text_encoder, load_vision_encoder / save_vision_encoder
    load_pipeline                   a diffusers pipeline folder (model_index.json)
    load_bert                       BERT-family sentence encoders (all-MiniLM-L6-v2)
    load_llm                        Llama / Qwen2 / Gemma 2 / Gemma 3 decoders (the prompt judge)
"""
from fifa_jax.models.bert import load_bert
from fifa_jax.models.clip_io import (load_clip, load_text_encoder, load_vision_encoder, save_clip,
                                     save_text_encoder, save_vision_encoder)
from fifa_jax.models.llm_io import load_llm
from fifa_jax.models.pipeline import load_pipeline
from fifa_jax.models.unet_io import load_unet, save_unet
from fifa_jax.models.vae_io import load_vae, save_vae

__all__ = ["load_bert", "load_clip", "load_llm", "load_pipeline", "load_text_encoder",
           "load_unet", "load_vae", "load_vision_encoder", "save_clip", "save_text_encoder",
           "save_unet", "save_vae", "save_vision_encoder"]
