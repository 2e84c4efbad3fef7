"""The train stage: Diffusion-DPO fine-tuning of the base model's UNet on the encoded pairs.

Reads:  encode/ (tfds pairs and prompts, empty_prompt.npz, dataset_spec.json), the base
        model's unet/ and scheduler/ (train.base_model, "" = encode.base_model).
Writes (workdir/train/):
  checkpoints/<step>/   Orbax: params (LoRA, train.lora.rank > 0: the adapters only, lora.py),
                        opt_state, meta (checkpoints.py); the last
                        `keep_checkpoints` are kept, and always the final step
  metrics.jsonl         one record per logged step (kind "train") and evaluation ("eval")
  tensorboard/          the same scalars as TensorBoard event files
  train_report.json     the settings, the final metrics, throughput, MFU, trainable_params
                        (LoRA: the adapters' count; "lora": rank, alpha, layers)

Each update draws `grad_accum` micro-batches of `batch_size` pairs (global, over all devices
and hosts) from the loader: effective batch = batch_size * grad_accum (the paper: 2048).
Every random draw comes from fold_in(seed, step, pair), the loader's order and flips from
(seed, position), so a resumed run draws what an uninterrupted one would.

Resume: rerunning the same command continues from the last checkpoint (`compat`, the hash of
every setting that changes the trajectory, must match). Nothing finished is deleted silently:
checkpoints of other settings are moved, with their metrics, to
`checkpoints.superseded/<time>/`, and a checkpoint that cannot be read back (a truncated file,
a missing folder) to `checkpoints.corrupt/<step>-<time>/`, each with a message, and the next
older one is tried; `--force=train` deletes them. A full disk while saving ends in one line
naming the path and the space needed; the unfinished folder is removed on the next start.
Raising `num_steps` continues a finished run. SIGTERM / SIGINT: the
current step ends, a checkpoint is saved, the stage raises `Interrupted` (exit code 128 +
signal) and the runner does not mark the stage done.
Several hosts: every process runs the same checkpoint calls in the same order (Orbax's save,
restore, delete, wait and close are collective); which checkpoints exist, and so whether to
resume, from which step or to discard them, is process 0's view, given to all. Each process
writes and reads only its own shards (FSDP may split the parameters over hosts; nothing is
gathered). The hosts exchange nothing between steps but at log, eval and checkpoint steps
(every `log_every` steps, default 10): there they also agree whether a signal reached any of
them, so a SIGTERM / SIGINT that reached any host stops every host at the next such step, all
saving the same checkpoint (one process checks for signals after every step).
Faults: a non-finite loss or gradient stops the run naming the step and the metric (that step
is not applied and nothing non-finite is saved); a step that does not fit in device memory
names the settings to change.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from fifa_jax import errors, parallel
from fifa_jax.dtypes import DTYPES, HALF_OR_FULL
from fifa_jax.errors import InputError
from fifa_jax.files import file_stats, read_json
from fifa_jax.models.attention import IMPLEMENTATIONS
from fifa_jax.models.attention import platform_error as attention_platform_error
from fifa_jax.models import remat
from fifa_jax.models.diffusers_io import read_config
from fifa_jax.models.platform import device_platform
from fifa_jax.parallel import hosts, param_sharding
from fifa_jax.demo import assets
from fifa_jax.training import (batches as batches_lib, checkpoints, metrics as metrics_lib,
                               noise_schedule, pair_dataset)
from fifa_jax.training.loader import PairLoader
from fifa_jax.training.optimizer import OPTIMIZERS, learning_rate_schedule, make_optimizer
from fifa_jax.training import lora as lora_lib
from fifa_jax.training import pref_loss
from fifa_jax.training.pref_loss import SMPO_GAIN, SMPO_TEMPERATURE
from fifa_jax.training.train_step import StepConfig
from fifa_jax.training.trainer import ACCUMULATE, Trainer

STAGE = "train"
SECTION = "train"
CONFIG_KEYS = ("seed", "train")
UPSTREAM = ("encode",)
SPEED_ONLY = ("log_every", "progress", "async_checkpoints", "checkpoint_every",
              "keep_checkpoints", "loader_threads", "accumulate")
# settings that only say how far to go: a changed num_steps continues the same trajectory
NOT_IN_TRAJECTORY = SPEED_ONLY + ("num_steps", "eval_every")
CKPT_DIR = "checkpoints"
REPORT = "train_report.json"
RULES = {"num_steps": ("min", 1), "batch_size": ("min", 1), "grad_accum": ("min", 1),
         "accumulate": ("choice", ACCUMULATE),
         "learning_rate": ("min", 0.0), "warmup_steps": ("min", 0),
         "optimizer": ("choice", OPTIMIZERS), "grad_clip": ("min", 0.0),
         "beta": ("min", 0.0), "weight_decay": ("min", 0.0),
         "dtype": ("choice", HALF_OR_FULL), "ref_dtype": ("choice", HALF_OR_FULL),
         "prediction_type": ("choice", ("", "epsilon", "v_prediction")),
         "remat": ("choice", ("none",) + remat.POLICIES),
         "attention_impl": ("choice", IMPLEMENTATIONS),        # the UNet alone: no masks
         "checkpoint_every": ("min", 0), "keep_checkpoints": ("min", 1),
         "eval_every": ("min", 0), "eval_pairs": ("min", 0), "log_every": ("min", 1),
         "lora.rank": ("min", 0), "lora.alpha": ("min", 0.0)}


class Interrupted(errors.Interrupted):
    """SIGTERM / SIGINT arrived: a checkpoint was saved; rerun the command to resume."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"train: stopped by signal {signum} after step {step}; checkpoint "
                         f"saved; rerun the same command to resume", signum)
        self.step = step


class NonFiniteError(InputError):
    """The loss or the gradient became non-finite (the message names step and metric)."""


def default_config() -> ml_collections.ConfigDict:
    """The `train` section of the experiment config (defaults: the SD1.5 recipe, method.md
    section 3.6)."""
    c = ml_collections.ConfigDict()
    c.base_model = ""          # diffusers pipeline folder for unet/ + scheduler/ ("" = encode's)
    c.num_steps = 2000         # optimiser updates
    c.batch_size = 8           # pairs per micro-batch, global (all devices and hosts)
    c.grad_accum = 256         # micro-batches per update: effective batch = batch * accum
    c.accumulate = "scan"      # scan: the micro-batch loop inside one compiled step | host:
    #                            one compiled micro-step a micro-batch adding into a donated
    #                            gradient buffer, then an update (same values; loop-free
    #                            programs, cheaper to compile for TPU at SD scale)
    c.learning_rate = 2.048e-5  # 1e-8 per pair x 2048 (the official SD1.5 setting)
    c.warmup_steps = 500       # linear warm-up from 0, then constant
    c.optimizer = "adamw"      # adamw | adafactor (the SDXL recipe)
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.weight_decay = 1e-2
    c.grad_clip = 1.0          # global-norm clipping (0 = off)
    c.beta = 5000.0            # official convention (diffusers' beta_dpo = beta / 2)
    c.loss = "dpo"             # dpo | ipo | hinge, as diffusers' research DPO script
    #                            defines them; sft: the winners' epsilon MSE alone (a
    #                            reference point, beta unused) (training/pref_loss.py)
    c.sft_weight = 0.0         # lambda: each pair's loss + lambda * w(t) * the winner's
    #                            epsilon MSE (an anchor against DPO raising the winners'
    #                            error too; RPO-style; off in the paper's recipes; training
    #                            only, held-out metrics stay plain DPO) (training/dpo.py)
    c.margin_weighting = "none"  # none | smpo: each pair's beta * smpo_gain * (2p - 1),
    #                            p = sigmoid(proxy margin / smpo_temperature) from the
    #                            select manifest (SmPO-Diffusion; held-out metrics unweighted)
    c.smpo_temperature = SMPO_TEMPERATURE  # 16.658: SmPO's PickScore min-max range x 100
    c.smpo_gain = SMPO_GAIN    # 10: SmPO's constant factor on (2p - 1)
    c.timestep_weighting = "none"  # none | min_snr | inverse_snr: each pair's beta * w(t)
    #                            (formulas: training/timestep_weighting.py; off in the
    #                            paper's recipes)
    c.snr_gamma = 5.0          # min_snr's gamma: w = min(SNR_t, gamma) / SNR_t
    c.min_timestep = 0         # training draws t ~ U{min_timestep..max_timestep} (-1: T - 1);
    c.max_timestep = -1        # held-out metrics use every t; the whole range in the recipes
    c.caption_dropout = 0.2    # P(prompt replaced by "")
    c.random_flip = True       # use the encode stage's mirrored posteriors (if stored)
    c.prediction_type = ""     # "" = the base scheduler's; epsilon | v_prediction
    c.dtype = "bfloat16"       # compute dtype (parameters and optimiser state stay float32)
    c.ref_dtype = "float32"    # reference parameters: float32 | bfloat16 (half the memory)
    c.remat = "none"           # none | a jax.checkpoint_policies name (per UNet block)
    c.attention_impl = "auto"  # auto | xla | cudnn (GPU) | einsum | fused (CPU)
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0            # 0 = full fine-tuning; r > 0: LoRA adapters (training/lora.py)
    #                            of rank r train, the base UNet is frozen and is the reference;
    #                            checkpoints hold the adapters; export writes them for
    #                            diffusers' load_lora_weights (learning_rate: ~1e-4 is usual)
    c.lora.alpha = 4.0         # scale alpha / rank on B @ A (PEFT's lora_alpha)
    c.lora.targets = lora_lib.DEFAULT_TARGETS  # comma list of regexes searched in the
    #                            diffusers module names of the UNet's linear and conv layers;
    #                            default the attention q / k / v / out; add e.g. the
    #                            feed-forward ff\.net\.(0\.proj|2)$, resnet convs
    #                            resnets\.\d+\.conv[12]$
    c.eval_every = 100         # held-out loss / implicit accuracy every N steps (0 = end only)
    c.eval_pairs = 0           # held-out pairs used (0 = all the encode stage holds)
    c.checkpoint_every = 250   # steps between checkpoints (0 = only the last)
    c.keep_checkpoints = 3     # keep the last M
    c.async_checkpoints = True
    c.log_every = 10
    c.loader_threads = 4
    c.progress = True
    return c


def check_config(tc) -> None:
    from fifa_jax.errors import ConfigError
    pref_loss.check_config(tc)
    if not 0.0 <= tc.caption_dropout <= 1.0:
        raise ConfigError(f"config key 'train.caption_dropout' must be in [0, 1]; got "
                          f"{tc.caption_dropout}")
    lc = tc.get("lora")
    if lc is None:
        return
    for pat in str(lc.targets).split(","):
        try:
            re.compile(pat.strip())
        except re.error as e:
            raise ConfigError(f"config key 'train.lora.targets': {pat!r} is not a regex ({e})")
    if int(lc.rank) > 0 and float(lc.alpha) <= 0:
        raise ConfigError(f"config key 'train.lora.alpha' must be > 0; got {lc.alpha}")


def _base_model(config, workdir=None) -> str:
    """train.base_model, or encode's when empty ("demo": the demo base in the work dir)."""
    base = config.train.base_model or (config.get("encode") or {}).get("base_model", "")
    if not base:
        raise InputError("config key 'train.base_model' is empty and so is "
                         "'encode.base_model': name the base diffusers pipeline folder")
    if base == assets.DEMO:
        return (assets.resolve_base_model(base, workdir) if workdir is not None
                else base)
    return base


def input_signature(config, workdir) -> dict:
    """Sizes and times of the base UNet and scheduler files (the VAE and text encoders are
    the encode stage's)."""
    try:
        base = _base_model(config)
    except InputError:
        return {}
    if base == assets.DEMO:
        return {}                 # made from the code: the fingerprint's config covers it
    out = {}
    for sub in ("unet", "scheduler"):
        path = os.path.join(base, sub)
        if os.path.isdir(path) and not _inside(path, workdir):
            out.update(file_stats(path))
    return out


def _inside(path, workdir) -> bool:
    return workdir is not None and os.path.abspath(path).startswith(
        os.path.abspath(workdir) + os.sep)


def discard_resume_state(workdir) -> None:
    """--force=train: forget every checkpoint and metric."""
    out = pathlib.Path(workdir) / STAGE
    shutil.rmtree(out / CKPT_DIR, ignore_errors=True)
    for name in ("metrics.jsonl", "tensorboard"):
        p = out / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def trajectory_hash(config, workdir) -> str:
    """Hash of what decides the parameters at every step: the train section (less
    NOT_IN_TRAJECTORY), the seed and the encode stage's fingerprint."""
    tc = json.loads(json.dumps(config.train.to_dict(), sort_keys=True, default=str))
    for k in NOT_IN_TRAJECTORY:
        tc.pop(k, None)
    if not int((tc.get("lora") or {}).get("rank", 0)):
        tc.pop("lora", None)        # full fine-tuning: the hash it had before LoRA existed
    done = pathlib.Path(workdir) / "encode" / "STAGE_DONE.json"
    enc = json.loads(done.read_text()).get("fingerprint") if done.exists() else None
    blob = json.dumps({"train": tc, "seed": int(config.seed), "encode": enc}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ set-up
def _check_base(unet_cfg, spec: dict, path: str) -> None:
    """The base UNet must fit the encoded data (one line naming the mismatch)."""
    c_lat = spec["latent_shape"][0]
    if unet_cfg.in_channels != c_lat:
        raise InputError(f"{path}/config.json: in_channels={unet_cfg.in_channels}, but the "
                         f"encoded latents have {c_lat} channels (encode.base_model's VAE)")
    d = spec["embeds_shape"][-1]
    dims = unet_cfg.cross_attention_dim
    if any(x != d for x in (dims if isinstance(dims, (tuple, list)) else (dims,))):
        raise InputError(f"{path}/config.json: cross_attention_dim="
                         f"{unet_cfg.cross_attention_dim}, but the encoded text states have "
                         f"{d} features (encode.base_model's text encoder(s))")
    f = 2 ** (len(unet_cfg.block_out_channels) - 1)
    h = spec["latent_shape"][1]
    if h % f:
        raise InputError(f"{path}: latents of {h}x{h} are not a multiple of the UNet's "
                         f"downsampling factor {f}; change encode.resolution")
    sdxl = unet_cfg.addition_embed_type == "text_time"
    if sdxl != bool(spec.get("is_sdxl")):
        raise InputError(f"{path}/config.json: addition_embed_type="
                         f"{unet_cfg.addition_embed_type!r} but the encoded text states are "
                         f"{'SDXL' if spec.get('is_sdxl') else 'SD1/2'}-style")


def _micro_batch(tc, mesh) -> int:
    b = int(tc.batch_size)
    multiple = parallel.batch_multiple(mesh)
    if b % multiple:
        raise InputError(f"config key 'train.batch_size' = {b} must be a multiple of the "
                         f"{multiple} devices of the mesh (the pairs are split over them)")
    return b


def proxy_probabilities(workdir, tc):
    """pair_id (L,) -> (L,) float32 p = sigmoid(m / train.smpo_temperature), m the manifest's
    `proxy_margin` (trained winner minus loser, after select.relabel; older manifests:
    `margin_signed`). Reads workdir/select/manifest.parquet."""
    import pyarrow.parquet as pq
    path = pathlib.Path(workdir) / "select" / "manifest.parquet"
    if not path.exists():
        raise InputError(f"train.margin_weighting='smpo' needs {path} (run the select stage)")
    names = pq.read_schema(path).names
    col = "proxy_margin" if "proxy_margin" in names else "margin_signed"
    if col not in names:
        raise InputError(f"{path}: no proxy_margin or margin_signed column for "
                         f"train.margin_weighting='smpo'")
    t = pq.read_table(path, columns=["pair_id", col])
    ids = t.column("pair_id").to_numpy().astype(np.int64)
    order = np.argsort(ids)
    ids = ids[order]
    prob = pref_loss.proxy_probability(t.column(col).to_numpy()[order],
                                       float(tc.smpo_temperature)).astype(np.float32)

    def lookup(pair_id):
        pair_id = np.asarray(pair_id, np.int64)
        pos = np.minimum(np.searchsorted(ids, pair_id), max(ids.size - 1, 0))
        bad = ids[pos] != pair_id if ids.size else np.ones(pair_id.shape, bool)
        if np.any(bad):
            raise InputError(f"{path}: no row for pair_id {int(pair_id[np.argmax(bad)])} of "
                             f"the encoded train split (rerun select and encode)")
        return prob[pos]
    return lookup


@contextlib.contextmanager
def _signals():
    """Record SIGTERM / SIGINT instead of dying mid-step; restore the old handlers after."""
    got = []
    old = {}

    def handler(signum, frame):
        got.append(signum)

    for s in (signal.SIGTERM, signal.SIGINT):
        try:
            old[s] = signal.signal(s, handler)
        except ValueError:       # not the main thread: leave signals alone
            pass
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _memory_error(e: Exception) -> bool:
    text = str(e)
    return any(m in text for m in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                   "Allocator", "OOM"))


def _too_large(tc, mesh, e) -> InputError:
    return InputError(
        f"train: the step does not fit in device memory (batch_size={tc.batch_size} pairs over "
        f"{mesh.size} devices, remat={tc.remat}, mesh.fsdp={mesh.shape['fsdp']}, "
        f"ref_dtype={tc.ref_dtype}); lower train.batch_size and raise train.grad_accum to keep "
        f"the effective batch, set train.remat=nothing_saveable, raise mesh.fsdp, or set "
        f"train.ref_dtype=bfloat16 ({str(e).splitlines()[0][:200]})")


def step_config(tc, scaling_factor: float, shift_factor: float = 0.0) -> StepConfig:
    """The train step's settings from the `train` section and the VAE's latent factors."""
    return StepConfig(beta=float(tc.beta), caption_dropout=float(tc.caption_dropout),
                      scaling_factor=scaling_factor, shift_factor=shift_factor,
                      loss=tc.get("loss", "dpo"),
                      margin_weighting=tc.get("margin_weighting", "none"),
                      smpo_gain=float(tc.get("smpo_gain", SMPO_GAIN)),
                      timestep_weighting=tc.get("timestep_weighting", "none"),
                      snr_gamma=float(tc.get("snr_gamma", 5.0)),
                      min_timestep=int(tc.get("min_timestep", 0)),
                      max_timestep=int(tc.get("max_timestep", -1)),
                      sft_weight=float(tc.get("sft_weight", 0.0)))


# ------------------------------------------------------------------------------ the loop
def run(config, workdir) -> dict:
    tc = config.train
    workdir = pathlib.Path(workdir)
    out = workdir / STAGE
    encode_dir = workdir / "encode"
    spec = pair_dataset.read_spec(encode_dir)
    base = _base_model(config, workdir)
    mesh = parallel.make_mesh(config.get("mesh"))
    bad_impl = attention_platform_error(tc.attention_impl, device_platform(mesh),
                                        "train.attention_impl")
    if bad_impl:
        raise InputError(bad_impl)
    leader = jax.process_index() == 0
    if leader:
        out.mkdir(parents=True, exist_ok=True)
    hosts.barrier("train:mkdir")

    from fifa_jax.models.unet_config import parse_unet_config
    from fifa_jax.models.unet_io import load_unet
    unet_dir = os.path.join(base, "unet")
    unet_cfg = parse_unet_config(read_config(unet_dir))
    _check_base(unet_cfg, spec, unet_dir)
    sched_path = os.path.join(base, "scheduler", "scheduler_config.json")
    if not os.path.exists(sched_path):
        raise InputError(f"{base}: no scheduler/scheduler_config.json (the base model's noise "
                         f"schedule)")
    schedule = noise_schedule.from_scheduler_config(
        read_json(sched_path, "a scheduler config"), sched_path, tc.prediction_type or None)
    if int(tc.get("max_timestep", -1)) >= schedule.num_train_timesteps \
            or int(tc.get("min_timestep", 0)) >= schedule.num_train_timesteps:
        raise InputError(f"config keys 'train.min_timestep' / 'train.max_timestep' "
                         f"({tc.min_timestep} / {tc.max_timestep}) must be below the base "
                         f"model's {schedule.num_train_timesteps} timesteps ({sched_path})")
    rules = param_sharding.rules_from_config(config.get("mesh") or {})   # mesh.param_tactic
    unet = load_unet(unet_dir, dtype=DTYPES[tc.dtype], attention_impl=tc.attention_impl,
                     remat_policy=None if tc.remat == "none" else tc.remat, mesh=mesh,
                     rules=rules)
    micro = _micro_batch(tc, mesh)
    accum = int(tc.grad_accum)
    optimizer = make_optimizer(tc)
    step_cfg = step_config(tc, float(spec["scaling_factor"]),
                           float(spec.get("shift_factor") or 0.0))
    trainer = Trainer(unet, schedule, step_cfg, optimizer, mesh, seed=int(config.seed),
                      lr_fn=learning_rate_schedule(float(tc.learning_rate),
                                                   int(tc.warmup_steps)),
                      consts=batches_lib.step_consts(encode_dir, spec), rules=rules,
                      ref_dtype=DTYPES[tc.ref_dtype], lora=lora_lib.from_config(tc.get("lora")),
                      accumulate=tc.get("accumulate", "scan"),
                      state_rules=param_sharding.state_rules_from_config(
                          config.get("mesh") or {}))
    del unet
    loader = PairLoader(encode_dir, "train", global_batch=micro, seed=int(config.seed),
                        flip="random" if tc.random_flip else "none",
                        num_threads=int(tc.loader_threads),
                        pair_values=({"proxy_prob": proxy_probabilities(workdir, tc)}
                                     if step_cfg.margin_weighting == "smpo" else None))
    val = _validation(encode_dir, spec, tc, micro)

    compat = trajectory_hash(config, workdir)
    summary = {"effective_batch": micro * accum, "micro_batch": micro, "grad_accum": accum,
               "devices": int(mesh.size), "mesh": dict(mesh.shape),
               "trainable_params": int(sum(x.size for x in jax.tree.leaves(
                   trainer.state.params)))}
    if trainer.lora is not None:
        summary["lora"] = {"rank": trainer.lora.rank, "alpha": trainer.lora.alpha,
                           "layers": len(jax.tree.leaves(trainer.state.params)) // 2}
    summary.update(fit(config, trainer, loader, val, out, compat))
    if leader:
        tmp = out / (REPORT + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
        tmp.replace(out / REPORT)
    return summary


def _validation(encode_dir, spec, tc, micro):
    if not spec.get("splits", {}).get("validation"):
        logging.warning("train: the encode stage holds no validation pairs; no held-out "
                        "metrics")
        return None
    return PairLoader(encode_dir, "validation", global_batch=micro, seed=0, shuffle=False,
                      flip="none", num_threads=int(tc.loader_threads))


def fit(config, trainer: Trainer, loader, val, out: pathlib.Path, compat: str) -> dict:
    """Resume from out/checkpoints (or discard other settings' checkpoints), train to
    train.num_steps, wait for the last save; every process calls it (the checkpoint calls
    are collective). `loader` yields this host's rows of each micro-batch and keeps a
    host-count-free position (get_state / set_state); `val` the held-out pairs or None."""
    tc = config.train
    mgr = checkpoints.manager(out / CKPT_DIR, max_to_keep=int(tc.keep_checkpoints),
                              async_save=bool(tc.async_checkpoints))
    try:
        start = _resume(mgr, trainer, loader, compat, int(tc.num_steps), out)
        writer = metrics_lib.MetricWriter(out, resume_step=start)
        try:
            result = _loop(config, trainer, loader, val, mgr, writer, compat, start, out)
        finally:
            writer.close()
    finally:
        try:
            with _writing(mgr, None, trainer):
                mgr.wait_until_finished()
        finally:
            mgr.close()
    return {"start_step": start, "resumed": start > 0, **result}


@contextlib.contextmanager
def _writing(mgr, step: int | None, trainer: Trainer):
    """Checkpoint writes (Orbax raises a background write's failure at the next save or
    wait): a full disk or another write error becomes one line naming the path."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 (the writer's: one line naming the checkpoint)
        if not checkpoints.from_writer(e):
            raise
        needed = checkpoints.bytes_of((trainer.state.params, trainer.state.opt_state))
        raise checkpoints.write_error(mgr.directory, step, e, needed) from e


def _leader_steps(mgr, directory) -> list[int]:
    """Process 0's saved steps, the same list on every process. Raises (on every process)
    when some process's manager does not see them all (a stale view of shared storage):
    Orbax's restore and delete are collective and would leave the others waiting."""
    steps = sorted(mgr.all_steps())
    if jax.process_count() == 1:
        return steps
    steps = [int(s) for s in json.loads(hosts.bytes_from_leader(json.dumps(steps).encode()))]
    if not hosts.on_all_hosts(set(steps) <= set(mgr.all_steps())):
        raise InputError(f"train: the processes see different checkpoints in {directory} "
                         f"(process 0: {steps}, process {jax.process_index()}: "
                         f"{sorted(mgr.all_steps())}); every host must see the same "
                         f"storage (or rerun with --force=train)")
    return steps


def _resume(mgr, trainer: Trainer, loader, compat: str, num_steps: int,
            out: pathlib.Path) -> int:
    """Restore the latest readable, compatible checkpoint at or below num_steps; returns its
    step (0: start from the base model).

    A step that cannot be read back is moved to `checkpoints.corrupt/` and the next older one
    is tried; checkpoints of other settings are moved to `checkpoints.superseded/` (never
    deleted: --force=train deletes). Every process calls it and takes the same decisions
    (process 0's steps; a read counts as failed when it failed on any process): Orbax's
    restore is collective."""
    while True:
        steps = _leader_steps(mgr, out / CKPT_DIR)
        if not steps:
            return 0
        meta = _agreed(lambda: checkpoints.read_meta(mgr, steps[-1]), mgr, out, steps[-1])
        if meta is None:
            continue                 # set aside: look again
        if meta.get("compat") != compat:
            _supersede(mgr, out, steps, meta.get("compat"), compat)
            return 0
        usable = [s for s in steps if s <= num_steps]
        if not usable:
            raise InputError(f"train: every checkpoint in {out / CKPT_DIR} is past "
                             f"train.num_steps={num_steps} (steps {steps}); raise num_steps "
                             f"or use --force=train")
        step = usable[-1]
        got = _agreed(lambda: checkpoints.restore(mgr, step, trainer.abstract_state,
                                                  trainer.state_shardings), mgr, out, step)
        if got is None:
            continue
        state, meta = got
        trainer.restore(state)
        loader.set_state(meta["loader"])
        logging.info("train: resumed from step %d (%s)", step, out / CKPT_DIR / str(step))
        return step


def _agreed(read, mgr, out: pathlib.Path, step: int):
    """`read()`, or None after moving an unreadable step aside (on every process, when it
    failed on any)."""
    result, error = None, None
    try:
        result = read()
    except checkpoints.UnreadableCheckpoint as e:
        error = e
    if hosts.on_all_hosts(error is None):
        return result
    if jax.process_index() == 0:
        dest = checkpoints.set_aside(out / CKPT_DIR, step, out / "checkpoints.corrupt")
        logging.warning("train: %s; moved it to %s and trying the previous checkpoint",
                        error or f"checkpoint step {step} cannot be read on another process",
                        dest)
    hosts.barrier(f"train:set-aside-{step}")
    mgr.reload()
    return None


def _supersede(mgr, out: pathlib.Path, steps: list[int], old: str | None, new: str) -> None:
    """Move the checkpoints (and their metric logs) of other settings to
    train/checkpoints.superseded/<UTC time>/ (process 0), naming them and how to get them back
    (every process says it)."""
    dest = b""
    if jax.process_index() == 0:
        folder = out / "checkpoints.superseded" / checkpoints.utc_stamp()
        folder.mkdir(parents=True, exist_ok=True)
        shutil.move(str(out / CKPT_DIR), str(folder / CKPT_DIR))
        for name in ("metrics.jsonl", "tensorboard", REPORT):
            if (out / name).exists():
                shutil.move(str(out / name), str(folder / name))
        dest = str(folder).encode()
    dest = pathlib.Path(hosts.bytes_from_leader(dest).decode())
    logging.warning(
        "train: the checkpoints in %s (steps %s) were made with other settings (%s, now %s):"
        " moved them, with their metrics, to %s and starting from the base model; to go on "
        "with that run, move %s back to %s and run its config", out / CKPT_DIR, steps, old,
        new, dest, dest / CKPT_DIR, out / CKPT_DIR)
    hosts.barrier("train:superseded")
    mgr.reload()


def _fetch(m: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(m).items()}


def _check_finite(step: int, values: dict) -> None:
    if values.get("finite", 1.0) != 1.0:
        bad = [k for k in ("loss", "grad_norm") if not np.isfinite(values.get(k, 0.0))]
        raise NonFiniteError(f"train: non-finite {' and '.join(bad) or 'values'} at step "
                             f"{step} ({', '.join(f'{k}={values[k]}' for k in bad)}); the "
                             f"update was not applied and nothing after step {step - 1} is "
                             f"saved; lower train.learning_rate or train.beta")


def _stop_for_signal(got: list, sync_step: bool) -> bool:
    """Whether a SIGTERM / SIGINT stops the run after this step; the same answer on every
    process. One process: whenever a signal has arrived (checked after every step). Several:
    the hosts compare only at `sync_step`s (log, eval, checkpoint steps: decided by the step
    number alone, so every process makes the collective at the same steps), where a signal
    that reached any of them stops all; elsewhere the hosts run without exchanging anything."""
    if jax.process_count() == 1:
        return bool(got)
    return bool(sync_step) and hosts.on_any_host(bool(got))


def _loop(config, trainer: Trainer, loader, val, mgr, writer, compat, start, out) -> dict:
    tc = config.train
    num_steps, accum = int(tc.num_steps), int(tc.grad_accum)
    every_ckpt = int(tc.checkpoint_every)
    leader = jax.process_index() == 0
    n_dev = trainer.mesh.size
    pairs_per_step = int(tc.batch_size) * accum
    bar = tqdm(total=num_steps, initial=start, desc="train", unit="step",
               disable=not (leader and tc.progress), dynamic_ncols=True)
    last, pending, final_eval = {}, None, {}
    t_window, n_window, rate = time.perf_counter(), 0, None

    def save(step, force=False):
        meta = {"compat": compat, "loader": loader.get_state(),
                "metrics": {k: last.get(k) for k in ("loss", "implicit_acc")}}
        with _writing(mgr, step, trainer):
            checkpoints.save(mgr, trainer.state, meta, force=force)

    def evaluate(step):
        if val is None:
            return {}
        batches = batches_lib.eval_batches(val, int(tc.eval_pairs))
        res = trainer.evaluate(batches, key_seed=int(config.seed) + 1)
        writer.write(step, res, kind="eval")
        return res

    def on_device(fn, batch):
        try:
            return fn(batch)
        except Exception as e:  # noqa: BLE001 (re-raised unless it is device memory)
            if _memory_error(e):
                raise _too_large(tc, trainer.mesh, e) from e
            raise

    step, batch = start, None
    with _signals() as got, contextlib.closing(bar):   # errors print below the bar
        if step < num_steps and jax.process_count() > 1:
            # every host compiles the step (long, and unevenly), then they meet: the step's
            # collectives connect the hosts on first use, and on CPU (gloo) a host that
            # comes 30 s after the others fails the run
            batch = batches_lib.host_batch([next(loader) for _ in range(accum)])
            on_device(trainer.compiled_step, batch)
            hosts.barrier("train:step-compiled")
        if start == 0 and val is not None:
            final_eval = evaluate(0)
        while step < num_steps:
            if batch is None:
                batch = batches_lib.host_batch([next(loader) for _ in range(accum)])
            metrics = on_device(trainer.step, batch)
            batch = None
            step += 1
            # fetch the previous step's metrics while this one runs (one step of lag)
            if pending is not None:
                last = _fetch(pending[1])
                _check_finite(pending[0], last)
            pending = (step, metrics)
            n_window += 1
            want_log = step % int(tc.log_every) == 0 or step == num_steps
            want_ckpt = bool(every_ckpt and step % every_ckpt == 0) or step == num_steps
            want_eval = bool(int(tc.eval_every) and step % int(tc.eval_every) == 0) \
                or step == num_steps
            # several hosts: the step number alone says where they exchange anything
            stop = step < num_steps and _stop_for_signal(got, want_log or want_ckpt or
                                                         want_eval)
            want_ckpt = want_ckpt or stop
            if want_log or want_ckpt or want_eval:
                last = _fetch(metrics)
                _check_finite(step, last)
                pending = None
                now = time.perf_counter()
                rate = n_window * pairs_per_step / max(now - t_window, 1e-9)
                mfu = metrics_lib.mfu(trainer.step_flops, (now - t_window) / n_window, n_dev)
                t_window, n_window = now, 0
                if want_log:
                    writer.write(step, {**{k: v for k, v in last.items() if k != "finite"},
                                        "pairs_per_s": rate, "mfu": mfu})
                    bar.set_postfix(loss=f"{last['loss']:.4f}",
                                    acc=f"{last['implicit_acc']:.3f}",
                                    pairs_s=f"{rate:.1f}")
            if want_eval:
                final_eval = evaluate(step)
            if want_ckpt:
                save(step, force=True)
            bar.update(1)
            if stop:
                with _writing(mgr, step, trainer):
                    mgr.wait_until_finished()
                bar.close()
                raise Interrupted(got[0] if got else signal.SIGTERM, step)
    if step == start and start > 0:
        logging.info("train: already at train.num_steps=%d", num_steps)
    return {"final_step": step, "num_steps": num_steps, "final": last, "eval": final_eval,
            "pairs_per_s": rate, "flops_per_step": trainer.step_flops,
            "checkpoints": sorted(mgr.all_steps())}
