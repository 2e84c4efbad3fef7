"""Shared tiny pieces for the trainer tests: a one-level UNet and synthetic pair batches."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fifa_jax.models.unet import UNet2DConditionModel
from fifa_jax.parallel import mesh as mesh_lib
from fifa_jax.parallel import param_sharding
from fifa_jax.training import noise_schedule as ns
from fifa_jax.training.optimizer import learning_rate_schedule
from fifa_jax.training.train_step import StepConfig
from fifa_jax.training.trainer import Trainer

TINY = dict(block_out_channels=[8], layers_per_block=1, cross_attention_dim=6,
            down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"],
            attention_head_dim=2, norm_num_groups=4, sample_size=4)
SCHED = ns.from_scheduler_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                  "beta_end": 0.012})
L, D, C, H = 3, 6, 4, 4


# 16 channels: the widths our CPU kernels take (Cout % 16), so the CPU form of the step calls
# them (convolution, linear weight gradient, attention) and the accelerator form does not
TINY16 = dict(TINY, block_out_channels=[16])


def unet(seed=0, cfg=None, attention_impl="xla"):
    return UNet2DConditionModel(cfg or TINY, rngs=nnx.Rngs(seed), attention_impl=attention_impl)


def pairs(n, seed=0, separable=False, size=H):
    """n pairs as flat (n, ...) arrays of size x size latents; `separable`: winners' means
    near +1, losers' near -1."""
    rng = np.random.default_rng(seed)
    mean_w = rng.standard_normal((n, C, size, size)).astype(np.float32) * 0.3
    mean_l = rng.standard_normal((n, C, size, size)).astype(np.float32) * 0.3
    if separable:
        mean_w += 1.0
        mean_l -= 1.0
    logvar = np.full((n, C, size, size), -6.0, np.float32)
    out = {"moments_w": np.concatenate([mean_w, logvar], 1),
           "moments_l": np.concatenate([mean_l, logvar], 1),
           "prompt_embeds": rng.standard_normal((n, L, D)).astype(np.float32),
           "weights": np.ones((n,), np.float32)}
    return out


def as_steps(flat, a):
    """(n, ...) -> (a, n / a, ...)."""
    return {k: v.reshape((a, v.shape[0] // a) + v.shape[1:]) for k, v in flat.items()}


CONSTS = {"empty_embeds": np.zeros((L, D), np.float32)}


def trainer(mesh_shape=(1, 1), optimizer=None, lr=1e-3, seed=0, beta=50.0, dropout=0.2,
            ref_dtype=jnp.float32, model_seed=0, kernels=False, unet_cfg=None, lora=None,
            accumulate="scan", tactic="fsdp"):
    """A Trainer of the tiny UNet; `kernels`: the 16-channel UNet with "auto" attention, whose
    CPU form takes our CPU kernels (the form in force decides: tests' `forms` fixture);
    `unet_cfg`: another UNet config (with "auto" attention); `lora`: a lora.LoraConfig."""
    devices = jax.devices()[: mesh_shape[0] * mesh_shape[1]]
    cfg = mesh_lib.default_config()
    cfg.data, cfg.fsdp = mesh_shape
    mesh = mesh_lib.make_mesh(cfg, devices=devices)
    optimizer = optimizer or optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr))
    step_cfg = StepConfig(beta=beta, caption_dropout=dropout, scaling_factor=0.5)
    model = (unet(model_seed, unet_cfg or TINY16, "auto") if kernels or unet_cfg
             else unet(model_seed))
    return Trainer(model, SCHED, step_cfg, optimizer, mesh, seed=seed,
                   lr_fn=learning_rate_schedule(lr, 0), consts=CONSTS, ref_dtype=ref_dtype,
                   min_size=64, lora=lora, accumulate=accumulate,
                   rules=param_sharding.rules_from_config({"param_tactic": tactic}),
                   state_rules=param_sharding.state_rules_from_config(
                       {"param_tactic": tactic}))


# SDXL-style added conditioning: pooled text embeddings + 6 time ids
TINY_XL = dict(TINY, addition_embed_type="text_time", addition_time_embed_dim=4,
               projection_class_embeddings_input_dim=5 + 6 * 4)
CONSTS_XL = dict(CONSTS, empty_pooled=np.zeros((5,), np.float32),
                 time_ids=np.array([32, 32, 0, 0, 32, 32], np.float32))


def trainer_xl(seed=0):
    cfg = mesh_lib.default_config()
    mesh = mesh_lib.make_mesh(cfg, devices=jax.devices()[:1])
    step_cfg = StepConfig(beta=50.0, caption_dropout=0.5, scaling_factor=0.5)
    model = UNet2DConditionModel(TINY_XL, rngs=nnx.Rngs(0), attention_impl="xla")
    return Trainer(model, SCHED, step_cfg, optax.adamw(1e-3), mesh, seed=seed,
                   lr_fn=learning_rate_schedule(1e-3, 0), consts=CONSTS_XL)
