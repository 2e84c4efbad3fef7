"""Config-only model folders of the public checkpoints, for the check without any download.

    python -m fifa_jax.aot.layouts ROOT
        -> ROOT/stable-diffusion-v1-5/, ROOT/stable-diffusion-2-1/,
           ROOT/stable-diffusion-xl-base-1.0/, ROOT/sdxl-vae-fp16-fix/, ROOT/PickScore_v1/,
           ROOT/CLIP-ViT-H-14-laion2B-s32B-b79K/ (preprocessor_config.json)

Each holds what `fifa_jax.aot` reads: model_index.json, every component's config.json and
scheduler/scheduler_config.json (values as published with runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0,
madebyollin/sdxl-vae-fp16-fix, yuvalkirstain/PickScore_v1 and
laion/CLIP-ViT-H-14-laion2B-s32B-b79K). No weights, no tokenizer. With a real download the
check reads the same files from it.
"""
from __future__ import annotations

import json
import os
import sys

_UNET_COMMON = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "center_input_sample": False,
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"]}
UNET_SD15 = dict(_UNET_COMMON, attention_head_dim=8, cross_attention_dim=768, sample_size=64)
UNET_SD21 = dict(_UNET_COMMON, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                 sample_size=96, use_linear_projection=True, upcast_attention=True)
UNET_SDXL = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True}
_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
        "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
        "up_block_types": ["UpDecoderBlock2D"] * 4}
VAE_SD15 = dict(_VAE, sample_size=512)
VAE_SD21 = dict(_VAE, sample_size=768)
VAE_SDXL = dict(_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
VAE_SDXL_FP16_FIX = dict(_VAE, sample_size=512, scaling_factor=0.13025, force_upcast=False)
CLIP_L_TEXT = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
               "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
               "num_hidden_layers": 12, "max_position_embeddings": 77,
               "hidden_act": "quick_gelu", "projection_dim": 768, "vocab_size": 49408,
               "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
OPENCLIP_H_TEXT_SD2 = dict(CLIP_L_TEXT, hidden_size=1024, intermediate_size=4096,
                           num_attention_heads=16, num_hidden_layers=23, hidden_act="gelu",
                           projection_dim=512)
OPENCLIP_BIGG_TEXT = dict(CLIP_L_TEXT, architectures=["CLIPTextModelWithProjection"],
                          hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                          num_hidden_layers=32, hidden_act="gelu", projection_dim=1280)
_SCHED = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
          "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False,
          "set_alpha_to_one": False}
SCHED_SD15 = dict(_SCHED, _class_name="PNDMScheduler", skip_prk_steps=True)
SCHED_SD21 = dict(_SCHED, _class_name="DDIMScheduler", prediction_type="v_prediction")
SCHED_SDXL = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085,
              "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
              "steps_offset": 1, "interpolation_type": "linear", "prediction_type": "epsilon",
              "timestep_spacing": "leading", "use_karras_sigmas": False, "sample_max_value": 1.0,
              "set_alpha_to_one": False, "skip_prk_steps": True, "clip_sample": False}
PICKSCORE = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 1024,
             "logit_scale_init_value": 2.6592,
             "text_config": {"hidden_size": 1024, "intermediate_size": 4096,
                             "num_attention_heads": 16, "num_hidden_layers": 24,
                             "max_position_embeddings": 77, "hidden_act": "gelu",
                             "projection_dim": 1024, "vocab_size": 49408,
                             "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
             "vision_config": {"hidden_size": 1280, "intermediate_size": 5120,
                               "num_attention_heads": 16, "num_hidden_layers": 32,
                               "image_size": 224, "patch_size": 14, "hidden_act": "gelu",
                               "projection_dim": 1024}}
CLIP_PROCESSOR = {"crop_size": 224, "do_center_crop": True, "do_normalize": True,
                  "do_resize": True, "resample": 3, "size": 224,
                  "image_mean": [0.48145466, 0.4578275, 0.40821073],
                  "image_std": [0.26862954, 0.26130258, 0.27577711]}


def _entry(library: str, cls: str) -> list:
    return [library, cls]


def pipeline_layout(unet: dict, vae: dict, scheduler: dict, encoders: list[dict],
                    name: str) -> dict[str, dict]:
    """{relative file: json} of a diffusers pipeline folder holding config files only."""
    sdxl = len(encoders) == 2
    index = {"_class_name": name, "unet": _entry("diffusers", "UNet2DConditionModel"),
             "vae": _entry("diffusers", "AutoencoderKL"),
             "scheduler": _entry("diffusers", scheduler["_class_name"]),
             "text_encoder": _entry("transformers", "CLIPTextModel"),
             "tokenizer": _entry("transformers", "CLIPTokenizer")}
    files = {"model_index.json": index, "unet/config.json": unet, "vae/config.json": vae,
             "scheduler/scheduler_config.json": scheduler,
             "text_encoder/config.json": encoders[0]}
    if sdxl:
        index["text_encoder_2"] = _entry("transformers", "CLIPTextModelWithProjection")
        index["tokenizer_2"] = _entry("transformers", "CLIPTokenizer")
        files["text_encoder_2/config.json"] = encoders[1]
    return files


LAYOUTS: dict[str, dict[str, dict]] = {
    "stable-diffusion-v1-5": pipeline_layout(UNET_SD15, VAE_SD15, SCHED_SD15, [CLIP_L_TEXT],
                                             "StableDiffusionPipeline"),
    "stable-diffusion-2-1": pipeline_layout(UNET_SD21, VAE_SD21, SCHED_SD21,
                                            [OPENCLIP_H_TEXT_SD2], "StableDiffusionPipeline"),
    "stable-diffusion-xl-base-1.0": pipeline_layout(UNET_SDXL, VAE_SDXL, SCHED_SDXL,
                                                    [CLIP_L_TEXT, OPENCLIP_BIGG_TEXT],
                                                    "StableDiffusionXLPipeline"),
    "sdxl-vae-fp16-fix": {"config.json": VAE_SDXL_FP16_FIX},
    "PickScore_v1": {"config.json": PICKSCORE},
    "CLIP-ViT-H-14-laion2B-s32B-b79K": {"preprocessor_config.json": CLIP_PROCESSOR},
}


def write(root: str, names=None) -> list[str]:
    """Write the layouts `names` (default: all) under `root`; returns the folders written."""
    out = []
    for name in names or LAYOUTS:
        for rel, obj in LAYOUTS[name].items():
            path = os.path.join(root, name, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2)
        out.append(os.path.join(root, name))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print("usage: python -m fifa_jax.aot.layouts ROOT (writes config-only model folders "
              "under ROOT)", file=sys.stderr)
        sys.exit(0 if sys.argv[1:] in (["--help"], ["-h"]) else 2)
    for folder in write(sys.argv[1]):
        print(folder)
