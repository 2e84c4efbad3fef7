"""FiFA + Diffusion-DPO on Pick-a-Pic v2 for Stable Diffusion 1.5: select 5,000 pairs, train,
export.

Command (ROOT as in configs/pickapic.py, plus ROOT/stable-diffusion-v1-5/, the diffusers
pipeline folder of runwayml/stable-diffusion-v1-5):
    python -m fifa_jax.main --config configs/pickapic_sd15.py:ROOT --workdir /runs/fifa_sd15

Hardware assumed by the defaults: a TPU v5p-8 slice (4 chips of 95 GiB) or 8 GPUs of 80 GB,
bfloat16 compute; `train.batch_size=16` pairs a micro-batch (global) and 8 micro-batches per
update, parameters replicated. (A v4-8 runs as 4 devices of 30.75 GiB, a chip each:
megacore; with these defaults its chips would hold the v5p-8 program below, 20.59 GiB there.)
For any other slice or host name it after the root and the recipe sets pairs a chip, remat,
the FSDP split and the reference dtype, keeping the effective batch through grad_accum
(`fifa_jax/aot/recipes.py`):
    --config configs/pickapic_sd15.py:ROOT,v5e-8      (also v5e-16 ... v5e-256, v5p-8, v6e-8,
                                                       v4-8, h100-8, h200-8; ROOT,greedy,v5e-8)
Evaluation after training: `--config.stages=evaluate` samples base and tuned on Pick-a-Pic's
test prompts (ROOT/pickapic_v2/test_unique/, the parquet shards of the test_unique split) and
scores them with PickScore.
Check a recipe on a CPU before renting the slice (README, "Checking a config for a TPU
slice before renting it"):
    python -m fifa_jax.aot --config configs/pickapic_sd15.py:ROOT,v5e-8 --topology v5e-8
Compiler figures (XLA's memory analysis a chip; `python -m fifa_jax.aot`, jax 0.10.2 / libtpu
0.0.42.1, 512 px = 64 x 64 latents, bf16 compute, AdamW, float32 policy and optimiser state;
the recipes accumulate on the host: `grad_accum` micro-steps, then an update; JSON in
benchmarks/aot_recipes/):
  v5e-8 recipe (2 pairs a chip, remat nothing_saveable, mesh.param_tactic=zero over 8: weights
    whole, AdamW moments and the gradient accumulator split; bf16 reference): micro-step
    12.03 GiB of 15.75 (6.04 arguments + 5.63 temporaries), update 7.87, eval step 5.34;
    roofline 0.219 s a micro-step (XLA gives no v5e estimate): 1.80 s or more an update of 128.
  v5p-8 recipe (4 chips; 4 pairs a chip, nothing_saveable, replicated, float32 reference):
    micro-step 20.59 GiB of 95.74, update 12.94, eval step 7.29; XLA's estimate 0.139 s a
    micro-step, 1.13 s an update of 128.
  v6e-8 recipe (2 pairs a chip, nothing_saveable, zero over 8, bf16 reference; the full
    compile, 62 min for the micro-step on a shared 2-core host): micro-step 13.26 GiB of 31.25
    (6.04 arguments + 6.14 temporaries), update 6.01, eval step 5.74; no XLA estimate
    with memory-space assignment, roofline at least 0.106 s a micro-step, 0.87 s an update
    of 128 (without memory-space assignment: 12.80 GiB, XLA's estimate 0.53 s).
  v4-8 recipe (4 chips, compiled as a v4 VM runs them, megacore: a device a chip, 30.75 GiB;
    v6e's settings, zero over 4): micro-step 10.47 GiB of 30.75 (7.24 arguments + 2.43
    temporaries), update 7.21, eval step 5.52; no XLA estimate on v4, roofline at least
    0.124 s a micro-step, 2.03 s an update of 128.
  The other stages' programs (score, k-NN, encode, sampler, VAE decode) fit all four slices.
  Not fitting: v5e, 8 pairs a chip, no remat, replicated, float32 reference: 34.91 GiB a chip.
  h100-8 / h200-8: the v5p settings (4 pairs a device, replicated, nothing_saveable); memory
    about that of the v5p row (the same per-device shapes): an estimate from the TPU compile,
    not measured on a GPU.
Out of memory elsewhere: `--config.train.remat=nothing_saveable`, `--config.mesh.fsdp=8`,
`--config.train.ref_dtype=bfloat16`, or fewer pairs a chip with more grad_accum.

The recipe (method.md section 3.6, the official SD1.5 settings): AdamW (0.9, 0.999, 1e-2,
1e-8), learning rate 1e-8 per pair of the effective batch, linear warm-up then constant,
gradient clipping 1.0, beta 5000 (official convention), caption dropout 0.2, 512 px, random
flips, epsilon prediction. FiFA's own training length and batch are not published in what we
have [open]: the defaults (effective batch 128, 400 updates = 51,200 pair-steps) are about 1%
of the official full-data run (2,048 x 2,000), the paper's "1% of the GPU hours".
Expected: select keeps 5,000 pairs (see configs/pickapic.py); train's held-out implicit
accuracy (train/metrics.jsonl, kind "eval") rises above 0.5 (the official full-data SD1.5 run
reports 60.8% on the Pick-a-Pic validation set); export/pipeline loads with
`DiffusionPipeline.from_pretrained`.
"""
import os

import ml_collections

from fifa_jax.aot import recipes
from fifa_jax.config_check import load_config_file
from fifa_jax.evaluation import stage as eval_stage
from fifa_jax.training import encode, export, train


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    root, rest, target = recipes.split_arg(arg)
    here = os.path.dirname(os.path.abspath(__file__))
    config = load_config_file(os.path.join(here, "pickapic.py") + ":" + ",".join([root] + rest))
    config.stages = "ingest,score,select,encode,train,export"

    config.encode = encode.default_config()
    config.encode.base_model = f"{root}/stable-diffusion-v1-5"
    config.encode.resolution = 512
    config.encode.num_val_pairs = 500
    config.encode.vae_dtype = "bfloat16"

    config.train = train.default_config()
    config.train.batch_size = 16
    config.train.grad_accum = 8
    config.train.learning_rate = 1e-8 * 16 * 8
    config.train.warmup_steps = 50
    config.train.num_steps = 400
    config.train.optimizer = "adamw"
    config.train.beta = 5000.0
    config.train.dtype = "bfloat16"
    config.train.eval_every = 50
    config.train.checkpoint_every = 50

    if target:                  # settings that fit the named slice / host (docstring)
        recipes.apply(config, "sd15", target)

    config.export = export.default_config()
    config.export.variants = "fp16"

    # after training: --config.stages=evaluate (base vs tuned on Pick-a-Pic's test prompts,
    # scored by PickScore), the sampler's programs checked by fifa_jax.aot with it
    config.evaluate = eval_stage.default_config()
    config.evaluate.prompt_sets = f"pickapic:{root}/pickapic_v2/test_unique"
    config.evaluate.batch_size = 32
    config.evaluate.scorers.pickscore = f"{root}/PickScore_v1"
    config.evaluate.scorers.pickscore_processor = f"{root}/CLIP-ViT-H-14-laion2B-s32B-b79K"
    return config
