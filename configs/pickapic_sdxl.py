"""FiFA + Diffusion-DPO on Pick-a-Pic v2 for Stable Diffusion XL: select 5,000 pairs, train,
export.

Command (ROOT as in configs/pickapic.py, plus ROOT/stable-diffusion-xl-base-1.0/, the
diffusers pipeline folder, and ROOT/sdxl-vae-fp16-fix/, the fp16-fix VAE folder):
    python -m fifa_jax.main --config configs/pickapic_sdxl.py:ROOT --workdir /runs/fifa_sdxl

Hardware assumed by the defaults: 8 GPUs of 80 GB (or a TPU v5p-16 slice, 8 chips),
bfloat16 compute, the UNet (2.6 B parameters) FSDP-sharded over 8 devices with per-block remat
and a bfloat16 reference; 1 pair per device per micro-batch. For any other slice or host name
it after the root and the recipe sets pairs a chip, remat, the FSDP split and the reference
dtype, keeping the effective batch through grad_accum (`fifa_jax/aot/recipes.py`):
    --config configs/pickapic_sdxl.py:ROOT,v5p-8      (also v5e-8 ... v5e-256, v6e-8, v4-16,
                                                       h100-8, h200-8)
Evaluation after training: `--config.stages=evaluate` (Pick-a-Pic's test prompts from
ROOT/pickapic_v2/test_unique/, PickScore), as configs/pickapic_sd15.py.
Check it on a CPU first: `python -m fifa_jax.aot --config configs/pickapic_sdxl.py:ROOT,v5p-8
--topology v5p-8` (README, "Checking a config for a TPU slice before renting it"). The SDXL
recipes (1 pair a chip, nothing_saveable, bf16 reference, accumulation on the host; FSDP,
the weights split, over 8 on v5e-8 (16 from v5e-16), v6e and v4; mesh.param_tactic=zero, weights
whole and the gradient accumulator split, over 4 on v5p and 8 / 4 on h100-8 / h200-8) were
sized from the parameter bytes (2.6 B parameters: 10.3 GB float32 policy, 5.2 GB bfloat16
reference, a factored Adafactor state of a few MB). Compiler figures (jax 0.10.2 / libtpu
0.0.42.1, 1024 px = 128 x 128 latents, the full compile with memory-space assignment; JSON
in benchmarks/aot_recipes/):
  v5p-8: micro-step 22.87 GiB of 95.74 (17.00 arguments + 5.46 temporaries), update 19.24
    GiB, eval step 16.06; XLA's estimate 0.321 s a micro-step, 5.20 s an update of 64 pairs.
  v6e-8 (FSDP over the 8 chips; 48 min on a 24 GB host with swap, 24.2 GB resident):
    micro-step 24.96 GiB of 31.25 (3.14 arguments + 21.43 temporaries; 6.3 GiB to spare),
    update 3.21, eval step 3.03; no XLA estimate on v6e, roofline at least 0.429 s a
    micro-step, 3.45 s an update of 64. (The earlier zero recipe, weights whole, needed 29.98
    GiB without memory-space assignment: too close to the chip's HBM to keep.)
  v5e-8 (FSDP over the 8 chips; 68 min on a 24 GB host with 40 GB of swap, 24.2 GB resident
    at most): micro-step 15.30 GiB of 15.75 (3.14 arguments + 11.57 temporaries; 0.45 GiB
    to spare: v5e-16, FSDP over 16, for more), update 3.46, eval step 3.61; no XLA estimate
    on v5e, roofline at least 0.859 s a micro-step, 6.91 s an update of 64.
  v4-16 (compiled as a v4 VM runs it, megacore: a device a chip of two TensorCores, 30.75
    GiB; the v6e recipe, FSDP over the 8 chips; 38 min on a 24 GB host with swap):
    micro-step 23.74 GiB of 30.75 (3.14 arguments + 20.18 temporaries; 7.0 GiB to spare),
    update 3.53, eval step 3.27; no XLA estimate on v4, roofline at least 0.552 s a
    micro-step, 4.44 s an update of 64. `:ROOT,v4-8` (4 chips) is refused: each chip would
    hold twice the weights.
The other stages' programs (score, k-NN, encode, sampler, VAE decode) fit v5e-8, v5p-8,
v6e-8 and v4-16. GPU memory: about the v5p micro-step's (the same per-device shapes), an
estimate, not measured.

The recipe (method.md section 3.6, the official SDXL settings): Adafactor (no relative step,
no parameter scaling, clip threshold 1.0, weight decay 1e-2), 200 warm-up steps scaled down
with the run, 1024 px (Pick-a-Pic images are upsampled), the fp16-fix VAE, both text
encoders' penultimate states and the second's pooled embedding, add_time_ids =
[1024, 1024, 0, 0, 1024, 1024], beta 5000, caption dropout 0.2. FiFA's own SDXL length and
batch are not published in what we have [open]: the defaults (effective batch 64, 300
updates) are about 1% of the official run's pair-steps.
Expected: held-out implicit accuracy above 0.5 (the official SDXL run: 72.0%);
export/pipeline loads with `StableDiffusionXLPipeline.from_pretrained`.
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
    config.mesh.fsdp = 8
    config.mesh.data = -1

    config.encode = encode.default_config()
    config.encode.base_model = f"{root}/stable-diffusion-xl-base-1.0"
    config.encode.vae_path = f"{root}/sdxl-vae-fp16-fix"
    config.encode.resolution = 1024
    config.encode.num_val_pairs = 500
    config.encode.vae_dtype = "bfloat16"
    config.encode.batch_size = 2

    config.train = train.default_config()
    config.train.batch_size = 8
    config.train.grad_accum = 8
    config.train.optimizer = "adafactor"
    config.train.learning_rate = 1e-8 * 8 * 8
    config.train.warmup_steps = 20
    config.train.num_steps = 300
    config.train.beta = 5000.0
    config.train.dtype = "bfloat16"
    config.train.ref_dtype = "bfloat16"
    config.train.remat = "nothing_saveable"
    config.train.eval_every = 50
    config.train.checkpoint_every = 50

    if target:                  # settings that fit the named slice / host (docstring)
        recipes.apply(config, "sdxl", target)

    config.export = export.default_config()
    config.export.variants = "fp16"

    # after training: --config.stages=evaluate (base vs tuned on Pick-a-Pic's test prompts,
    # scored by PickScore), the sampler's programs checked by fifa_jax.aot with it
    config.evaluate = eval_stage.default_config()
    config.evaluate.prompt_sets = f"pickapic:{root}/pickapic_v2/test_unique"
    config.evaluate.batch_size = 32
    config.evaluate.scorers.pickscore = f"{root}/PickScore_v1"
    config.evaluate.scorers.pickscore_processor = f"{root}/CLIP-ViT-H-14-laion2B-s32B-b79K"
    config.export.max_shard_mb = 10000
    return config
