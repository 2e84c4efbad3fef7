"""The evaluate stage's scorers, from `config.evaluate.scorers`: which checkpoint makes which
metric, and what each metric means.

    scorers, missing = build(ec.scorers, workdir=..., base_model=..., dtype="float32")
    scorers["pickscore"][0](images (N, H, W, 3) uint8, prompts) -> (N,) float32

Each entry is (score function, cache key); the key changes when the checkpoint's files change,
so cached scores are recomputed. A scorer whose checkpoint is not given is listed in `missing`
(reported as not configured, never silently absent).
"""
from __future__ import annotations

import hashlib
import json
import os

from fifa_jax.files import file_stats

DEFINITIONS = {
    "pickscore": "PickScore: exp(logit_scale) * cos(image, prompt) (PickScore_v1: x100 scale)",
    "clip_score": "CLIP score: max(100 * cos(image, prompt), 0) (torchmetrics' definition; "
                  "openai/clip-vit-large-patch14)",
    "aesthetic": "LAION aesthetic predictor v2: linear head on the L2-normalised CLIP ViT-L/14 "
                 "image embedding (about 1-10)",
    "hpsv2": "HPSv2: cos(image, prompt) of the HPSv2 OpenCLIP ViT-H/14 (papers report x100)",
    "image_reward": "ImageReward: BLIP ViT-L image tokens, BERT with cross-attention, MLP on "
                    "[CLS], standardised (r - 0.1672) / 1.0333 (THUDM ImageReward.pt)",
    "nsfw": "SD safety checker's has_nsfw_concept (diffusers' decision); mean = harm rate",
    "true_reward": "the demo world's true reward measured from pixels by its oracle "
                   "(fifa_jax/demo/oracle.py): colour 1 + shape 1 + count 0.5 + position 0.5 "
                   "+ aesthetic 0..1, minus 1 for the harmful mark",
    "oracle_aesthetic": "the true reward's aesthetic term, 0..1: 1 - the image's pixel-noise "
                        "std / the world's noise scale (fifa_jax/demo/oracle.py)",
}


def definition(metric: str) -> str:
    return DEFINITIONS.get(metric, metric)


def _key(*paths) -> str:
    stats = {p: file_stats(p) for p in paths if p and os.path.exists(p)}
    return hashlib.sha256(json.dumps(stats, sort_keys=True, default=str).encode()
                          ).hexdigest()[:12]


def build(sc, *, workdir, base_model: str, dtype: str = "float32", batch_size: int = 16
          ) -> tuple[dict, list[str]]:
    """({metric: (fn(images, prompts) -> (N,), key)}, [metrics not configured])."""
    from fifa_jax.evaluation import aesthetic, clip_scores, hpsv2, image_reward, safety_checker
    out, missing = {}, []
    pick = sc.pickscore
    if pick == "demo":
        pick = os.path.join(os.fspath(workdir), "score", "demo_reward")
    if pick:
        s = clip_scores.load_pickscore(pick, processor_path=sc.pickscore_processor,
                                       dtype=dtype, batch_size=batch_size)
        out["pickscore"] = (s.score, _key(pick, sc.pickscore_processor))
    else:
        missing.append("pickscore")
    if sc.clip:
        s = clip_scores.load_clip_score(sc.clip, dtype=dtype, batch_size=batch_size)
        out["clip_score"] = (s.score, _key(sc.clip))
    else:
        missing.append("clip_score")
    if sc.aesthetic and sc.aesthetic_clip:
        s = aesthetic.load_aesthetic(sc.aesthetic, sc.aesthetic_clip, dtype=dtype,
                                     batch_size=batch_size)
        out["aesthetic"] = (s.score, _key(sc.aesthetic, sc.aesthetic_clip))
    else:
        missing.append("aesthetic")
    if sc.hpsv2:
        s = hpsv2.load_hpsv2(sc.hpsv2, tokenizer_path=sc.hpsv2_tokenizer, dtype=dtype,
                             batch_size=batch_size)
        out["hpsv2"] = (s.score, _key(sc.hpsv2, sc.hpsv2_tokenizer))
    else:
        missing.append("hpsv2")
    if sc.get("image_reward"):
        if not sc.get("image_reward_tokenizer"):
            from fifa_jax.errors import InputError
            raise InputError("config key 'evaluate.scorers.image_reward_tokenizer' is empty: "
                             "name a bert-base-uncased tokenizer folder for ImageReward")
        s = image_reward.load_image_reward(sc.image_reward, sc.image_reward_tokenizer,
                                           dtype=dtype, batch_size=batch_size)
        out["image_reward"] = (s.score, _key(sc.image_reward, sc.image_reward_tokenizer))
    else:
        missing.append("image_reward")
    checker = sc.safety_checker
    if checker == "auto":
        checker = os.path.join(base_model, "safety_checker")
        checker = checker if os.path.isdir(checker) else ""
    if checker:
        s = safety_checker.load_safety_checker(checker, dtype=dtype, batch_size=batch_size)
        out["nsfw"] = (s.score, _key(checker))
    else:
        missing.append("nsfw")
    return out, missing
