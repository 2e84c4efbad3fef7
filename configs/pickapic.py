"""FiFA on Pick-a-Pic v2: PickScore margins, an LLM judge, CLIP text diversity, K = 5,000.

Command (ROOT holds the data and checkpoints, laid out as below):
    python -m fifa_jax.main --config configs/pickapic.py:ROOT --workdir /runs/fifa_pickapic

    ROOT/pickapic_v2/train-*.parquet          the published train shards (caption, jpg_0, ...)
    ROOT/PickScore_v1/                        CLIPModel config.json + safetensors (proxy reward)
    ROOT/CLIP-ViT-H-14-laion2B-s32B-b79K/     PickScore's processor config and tokenizer
    ROOT/judge/                               an instruct LM (Llama / Qwen2 / Gemma 2 or 3) in
                                              transformers layout, with its tokenizer

Every path can be overridden, e.g. `--config.data.path=/elsewhere/*.parquet`.

Expected: ingest keeps about 851k pairs over about 59k unique prompts (ties dropped); score
writes PickScore margins for every pair (resumable in chunks of 4,096 pairs), an expected
0-10 rating per unique prompt and PickScore's projected text embedding per unique prompt;
select keeps the top 5,000 pairs by the importance score (the paper's method). Use
`:ROOT,greedy` for the greedy set maximisation instead.
"""
import ml_collections

from fifa_jax import parallel
from fifa_jax.data import ingest
from fifa_jax.scoring import stage as score_stage
from fifa_jax.selection import stage as select_stage


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    root, _, method = (arg or "/data/fifa").partition(",")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.stages = "ingest,score,select"
    config.mesh = parallel.default_config()

    config.data = ingest.default_config()
    config.data.format = "pickapic"
    config.data.path = f"{root}/pickapic_v2/train-*.parquet"

    config.score = score_stage.default_config()
    config.score.reward.path = f"{root}/PickScore_v1"
    config.score.reward.processor_path = f"{root}/CLIP-ViT-H-14-laion2B-s32B-b79K"
    config.score.embedder.kind = "clip"
    config.score.embedder.path = f"{root}/PickScore_v1"
    config.score.judge.backend = "jax"
    config.score.judge.model_path = f"{root}/judge"
    config.score.judge.answer_prefix = "Rating: "

    config.select = select_stage.default_config()
    config.select.method = method or "importance"
    config.select.k_pairs = 5000
    return config
