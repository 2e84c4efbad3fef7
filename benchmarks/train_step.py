"""Diffusion-DPO train step: our jitted `Trainer` step against the same step in PyTorch diffusers.

One step = B pairs: winner and loser latents sampled from their VAE moments, one timestep and
one noise draw shared by each pair, caption dropout 0.2, the policy UNet forward + backward on
the 2B images, the frozen reference UNet forward (no grad), the DPO loss (beta 5000,
`fifa_jax/training/dpo.py`), global-norm clipping at 1.0 and an AdamW update (0.9, 0.999,
eps 1e-8, weight decay 1e-2, lr 2.048e-5). No random flips (no flipped moments given).
  ours:  `fifa_jax.training.trainer.Trainer` on one device (FSDP off), the model from
         `load_unet` on the folder the PyTorch model was saved to (the same weights).
  torch: diffusers `UNet2DConditionModel` in train mode and a deep copy as the reference, the
         same sampling and loss written in torch, `torch.optim.AdamW` (fused on CUDA) after
         `clip_grad_norm_`; eager, and on CUDA also with both UNets under `torch.compile`.
Dtypes: on the CPU float32 everywhere; on a GPU bf16 compute with float32 master weights
(ours: `dtype=bfloat16`, params and optimiser state float32; torch: float32 modules under
`torch.autocast(bfloat16)`, SDPA attention). Inputs arrive from numpy every step on both sides.

Allocator: `--allocator jemalloc` re-runs the script with libjemalloc preloaded and its decay
off, so both sides allocate through it (recorded as `environment.allocator`). On the CPU
glibc's malloc returns XLA's large step buffers to the kernel after every step and the next
step page-faults them in again (about 100k faults, 15-20% of our step); PyTorch's step is
unaffected within noise. Both allocators are reported in benchmarks/RESULTS.md.

Timing: `--rounds` rounds of `--iters` back-to-back steps after `--warmup` steps, one device
sync a round; pairs/s = pairs a step / median seconds a step. Compile time is reported apart
(ours: `Trainer.compiled_step`; torch.compile: its first steps). Model FLOPs per pair = 8 UNet
forwards of one image (policy forward + backward on two images, reference forward on two),
counted by torch's FlopCounterMode; MFU divides them by the card's dense bf16 peak
(`fifa_jax.training.metrics`); XLA's cost-analysis FLOPs (remat recompute included; library
GEMMs may be missing on GPU) are reported beside them. Peak memory: torch's
`max_memory_allocated`; ours `peak_bytes_in_use` of the device (set
XLA_PYTHON_CLIENT_PREALLOCATE=false) and XLA's memory analysis of the compiled step.

    python benchmarks/train_step.py --out /tmp/train_cpu.json          # CPU: small UNet, 32x32
    python benchmarks/train_step.py --allocator jemalloc --out /tmp/train_cpu_je.json   # CPU
    python benchmarks/train_step.py --out $OUT/train_step.json         # GPU: SD1.5, B = 8, 64x64
    python benchmarks/train_step.py --sdxl-only --sdxl-max-batch --out $OUT/sdxl.json   # GPU
    python benchmarks/train_step.py --toy --out /tmp/toy.json          # smoke test (seconds)

`--sdxl-max-batch` (or `--sdxl-only`): the largest B of an SDXL-sized UNet (random weights,
built abstractly and filled on the device) whose step runs on one device with remat and FSDP
off: the `--sdxl-batches` (default 1,2) measured, the rest predicted from XLA's memory analysis
(linear in B) and checked by running, stopping at the first that does not fit or after
`--sdxl-budget-s`. An attempt whose XLA memory analysis exceeds the device's limit counts as
not fitting without running; an out-of-memory error at run time does too (then the trainer is
rebuilt, since the donated state may be gone).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# cuBLAS instead of XLA's Triton GEMMs (as in score.py, where it was worth +13% on an H200;
# not measured on this step). `--xla-defaults` keeps XLA's choice. Set before jax starts.
GEMM_FLAG = "--xla_gpu_enable_triton_gemm=false"
if "--xla-defaults" not in sys.argv and "xla_gpu_enable_triton_gemm" not in \
        os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + GEMM_FLAG).strip()

from _common import environment, print_table, use_allocator, write_json  # noqa: E402

if __name__ == "__main__":
    use_allocator(sys.argv)     # `--allocator jemalloc`: re-runs this script with it preloaded

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fifa_jax.models.attention import IMPLEMENTATIONS  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "models", "fixtures")

# CPU comparison (issue 10 (a)): a small SD-like UNet, two levels, cross-attention on 77
# CLIP-L-wide text states.
SMALL = dict(block_out_channels=[64, 128], layers_per_block=2, cross_attention_dim=768,
             down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=8,
             norm_num_groups=32, sample_size=32)
TOY = dict(block_out_channels=[8], layers_per_block=1, cross_attention_dim=16,
           down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"],
           attention_head_dim=2, norm_num_groups=4, sample_size=8)
TOY_SDXL = dict(block_out_channels=[8], layers_per_block=1, cross_attention_dim=16,
                down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"],
                attention_head_dim=[2], transformer_layers_per_block=[2],
                use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4,
                norm_num_groups=4, sample_size=8)
# SD1.5's DDPM schedule (scheduler_config.json of the base model).
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}
HPARAMS = dict(beta=5000.0, caption_dropout=0.2, learning_rate=2.048e-5, adam_b1=0.9,
               adam_b2=0.999, adam_eps=1e-8, weight_decay=1e-2, grad_clip=1.0)
SDXL_TIME_IDS = [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]
GIB = 2.0 ** 30


def fixture_config(name: str) -> dict:
    with open(os.path.join(FIXTURES, name, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def host_batch(cfg: dict, pairs: int, latent: int, text_len: int, seed: int = 0,
               pooled: int = 0) -> dict:
    """One step's numpy inputs, A = 1: moments (1, B, 2C, h, w) with logvar -6, prompt
    states (1, B, L, D), weights (1, B) and, for SDXL, pooled (1, B, P)."""
    rng = np.random.default_rng(seed)
    c = int(cfg.get("in_channels", 4))
    d = cfg["cross_attention_dim"]
    shape = (1, pairs, c, latent, latent)
    out = {}
    for k in ("moments_w", "moments_l"):
        mean = rng.standard_normal(shape, dtype=np.float32)
        out[k] = np.concatenate([mean, np.full(shape, -6.0, np.float32)], axis=2)
    out["prompt_embeds"] = rng.standard_normal((1, pairs, text_len, d), dtype=np.float32)
    out["weights"] = np.ones((1, pairs), np.float32)
    if pooled:
        out["pooled"] = rng.standard_normal((1, pairs, pooled), dtype=np.float32)
    return out


def _rounds(step, sync, iters: int, rounds: int, warmup: int) -> list[float]:
    """Seconds a step in each of `rounds` rounds of `iters` steps (one sync a round)."""
    for _ in range(warmup):
        step()
    sync()
    per_step = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
        per_step.append((time.perf_counter() - t0) / iters)
    return per_step


# ----------------------------------------------------------------------------- ours (JAX)

def optimizer_config(name: str = "adamw"):
    import ml_collections
    return ml_collections.ConfigDict(dict(optimizer=name, warmup_steps=0, **{
        k: HPARAMS[k] for k in ("learning_rate", "adam_b1", "adam_b2", "adam_eps",
                                "weight_decay", "grad_clip")}))


def make_trainer(unet, consts: dict, scaling_factor: float, optimizer: str = "adamw"):
    """Trainer on the first device alone (mesh data = fsdp = 1)."""
    from fifa_jax.parallel import mesh as mesh_lib
    from fifa_jax.training import noise_schedule as ns
    from fifa_jax.training.optimizer import learning_rate_schedule, make_optimizer
    from fifa_jax.training.train_step import StepConfig
    from fifa_jax.training.trainer import Trainer

    mcfg = mesh_lib.default_config()
    mcfg.data, mcfg.fsdp = 1, 1
    mesh = mesh_lib.make_mesh(mcfg, devices=jax.devices()[:1])
    step_cfg = StepConfig(beta=HPARAMS["beta"], caption_dropout=HPARAMS["caption_dropout"],
                          scaling_factor=scaling_factor)
    opt_cfg = optimizer_config(optimizer)
    return Trainer(unet, ns.from_scheduler_config(SCHEDULER), step_cfg, make_optimizer(opt_cfg),
                   mesh, seed=0, lr_fn=learning_rate_schedule(opt_cfg.learning_rate, 0),
                   consts=consts)


def memory_needed(compiled) -> int | None:
    """Bytes the compiled step needs live at once by XLA's memory analysis (None if absent)."""
    try:
        ma = compiled.memory_analysis()
        return int(ma.argument_size_in_bytes + ma.output_size_in_bytes
                   - ma.alias_size_in_bytes + ma.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 (not every backend has one)
        return None


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run_compiled(trainer, compiled, hb: dict):
    """One step through an already compiled executable (the same call as `Trainer.step`,
    without a second trip through the jit cache)."""
    from fifa_jax.training.trainer import to_global
    trainer.state, metrics = compiled(trainer.state, trainer.ref_params,
                                      to_global(hb, trainer.mesh), trainer.consts)
    return metrics


def bench_ours(path: str, hb: dict, args, dtype, consts: dict, model_flops_pair) -> dict:
    from fifa_jax.models.unet_io import load_unet
    from fifa_jax.training import metrics as tm

    unet = load_unet(path, dtype=dtype, attention_impl=args.attn_impl,
                     remat_policy=args.remat)
    trainer = make_trainer(unet, consts, args.scaling_factor)
    del unet
    t0 = time.perf_counter()
    compiled = trainer.compiled_step(hb)
    compile_s = time.perf_counter() - t0
    out = {}      # Trainer.step finds the executable compiled above in the jit's cache
    per_step = _rounds(lambda: out.__setitem__("m", trainer.step(hb)),
                       lambda: jax.block_until_ready(out.get("m")), args.iters, args.rounds,
                       args.warmup)
    m = jax.device_get(out["m"])
    assert float(m["finite"]) == 1.0, f"non-finite step: {m}"
    sec = statistics.median(per_step)
    pairs = hb["weights"].shape[1]
    xla_flops = tm.step_flops(compiled)
    row = {"impl": f"ours (JAX Trainer, {args.dtype_label})", "pairs_per_step": pairs,
           "step_s": sec, "pairs_per_s": pairs / sec, "compile_s": compile_s,
           "round_step_s": per_step, "loss_last": float(m["loss"]),
           "grad_norm_last": float(m["grad_norm"]),
           "xla_flops_per_step": xla_flops,
           "mfu_xla": tm.mfu(xla_flops, sec, 1),
           "mfu": tm.mfu(model_flops_pair * pairs if model_flops_pair else None, sec, 1),
           "xla_memory_needed_gib": (memory_needed(compiled) or 0) / GIB or None}
    peak = device_peak_bytes()
    row["peak_mem_gib"] = peak / GIB if peak else None
    del trainer, compiled
    return row


# ----------------------------------------------------------------------------- PyTorch

def torch_env():
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch, device


def build_torch_unet(cfg: dict, path: str):
    """diffusers UNet2DConditionModel from `cfg` (default init, seed 0), saved to `path`."""
    import torch
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    model = UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    model.save_pretrained(path, safe_serialization=True)
    return model


def count_forward_flops(model, cfg: dict, latent: int, text_len: int, device) -> float | None:
    """FLOPs of one UNet forward of one image (torch's FlopCounterMode; 2 per multiply-add)."""
    import torch
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    c = int(cfg.get("in_channels", 4))
    x = torch.zeros((1, c, latent, latent), device=device)
    ctx = torch.zeros((1, text_len, cfg["cross_attention_dim"]), device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([10], device=device), ctx)
    return float(counter.get_total_flops())


def torch_step_factory(policy, ref, abar, device, autocast: bool, scaling: float,
                       empty_embeds, compiled: bool):
    """A function host_batch -> loss tensor doing one DPO step like ours."""
    import torch
    import torch.nn.functional as F

    beta, p_drop = HPARAMS["beta"], HPARAMS["caption_dropout"]
    kw = dict(lr=HPARAMS["learning_rate"], betas=(HPARAMS["adam_b1"], HPARAMS["adam_b2"]),
              eps=HPARAMS["adam_eps"], weight_decay=HPARAMS["weight_decay"])
    if device == "cuda":
        kw["fused"] = True
    opt = torch.optim.AdamW(policy.parameters(), **kw)
    pol_fn = torch.compile(policy) if compiled else policy
    ref_fn = torch.compile(ref) if compiled else ref
    params = [p for p in policy.parameters() if p.requires_grad]
    n_t = abar.shape[0]

    def sample(m, noise):
        mean, logvar = m.chunk(2, dim=1)
        return (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise) * scaling

    def step(hb):
        mw = torch.from_numpy(hb["moments_w"][0]).to(device, non_blocking=True)
        ml = torch.from_numpy(hb["moments_l"][0]).to(device, non_blocking=True)
        emb = torch.from_numpy(hb["prompt_embeds"][0]).to(device, non_blocking=True)
        b, c2, h, w = mw.shape
        shape = (b, c2 // 2, h, w)
        x0 = torch.cat([sample(mw, torch.randn(shape, device=device)),
                        sample(ml, torch.randn(shape, device=device))])
        noise = torch.randn(shape, device=device).repeat(2, 1, 1, 1)
        t = torch.randint(0, n_t, (b,), device=device).repeat(2)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
        drop = (torch.rand(b, device=device) < p_drop).view(-1, 1, 1)
        ctx = torch.where(drop, empty_embeds, emb).repeat(2, 1, 1)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            pred = pol_fn(xt, t, ctx).sample
            with torch.no_grad():
                ref_pred = ref_fn(xt, t, ctx).sample
        se_pol = (pred.float() - noise).square().mean(dim=(1, 2, 3))
        se_ref = (ref_pred.float() - noise).square().mean(dim=(1, 2, 3))
        inside = -0.5 * beta * ((se_pol[:b] - se_pol[b:]) - (se_ref[:b] - se_ref[b:]))
        loss = -F.logsigmoid(inside).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, HPARAMS["grad_clip"], foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def bench_torch(model, hb: dict, args, compiled: bool, model_flops_pair,
                threads: int | None = None) -> dict:
    import torch
    from fifa_jax.training import metrics as tm
    from fifa_jax.training import noise_schedule as ns

    _, device = torch_env()
    autocast = device == "cuda"
    if threads:
        torch.set_num_threads(threads)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    policy = copy.deepcopy(model).to(device).train()
    ref = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    abar = torch.from_numpy(ns.from_scheduler_config(SCHEDULER).alphas_cumprod).to(device)
    empty = torch.zeros(hb["prompt_embeds"].shape[2:], device=device)
    step = torch_step_factory(policy, ref, abar, device, autocast, args.scaling_factor, empty,
                              compiled)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    compile_s = None
    if compiled:      # the first steps compile (forward and backward graphs, reference graph)
        t0 = time.perf_counter()
        step(hb)
        step(hb)
        sync()
        compile_s = time.perf_counter() - t0
    per_step = _rounds(lambda: out.__setitem__("loss", step(hb)), sync, args.iters,
                       args.rounds, args.warmup)
    loss = float(out["loss"])
    assert math.isfinite(loss), "non-finite torch loss"
    sec = statistics.median(per_step)
    pairs = hb["weights"].shape[1]
    name = "torch.compile" if compiled else "eager"
    dt = "autocast bf16, SDPA" if autocast else \
        f"float32, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}"
    row = {"impl": f"PyTorch diffusers {name} ({dt})", "pairs_per_step": pairs, "step_s": sec,
           "pairs_per_s": pairs / sec, "compile_s": compile_s, "round_step_s": per_step,
           "loss_last": loss,
           "mfu": tm.mfu(model_flops_pair * pairs if model_flops_pair else None, sec, 1),
           "peak_mem_gib": torch.cuda.max_memory_allocated() / GIB if device == "cuda"
           else None}
    del step, policy, ref
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- SDXL max batch

def random_unet(cfg: dict, dtype, attn_impl: str, remat: str | None, seed: int = 0):
    """The UNet built abstractly, parameters drawn on the device: kernels N(0, 1/fan_in),
    biases 0, norm scales 1. Nothing the size of the model passes through host memory."""
    from flax import nnx, traverse_util
    from fifa_jax.models.unet_io import abstract_unet

    model = abstract_unet(cfg, dtype=dtype, attention_impl=attn_impl, remat_policy=remat)
    graphdef, state = nnx.split(model)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    specs = sorted(((path, tuple(leaf.shape)) for path, leaf in flat.items()),
                   key=lambda kv: str(kv[0]))

    @jax.jit
    def draw(key):        # one program: every leaf drawn on the device
        out = []
        for i, (path, shape) in enumerate(specs):
            name = str(path[-1])
            if name == "scale":
                out.append(jnp.ones(shape, jnp.float32))
            elif name == "bias" or len(shape) < 2:
                out.append(jnp.zeros(shape, jnp.float32))
            else:
                std = 1.0 / math.sqrt(int(np.prod(shape[:-1])))
                out.append(std * jax.random.normal(jax.random.fold_in(key, i), shape,
                                                   jnp.float32))
        return out

    out = dict(zip([path for path, _ in specs], draw(jax.random.PRNGKey(seed))))
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(out))
    return nnx.merge(graphdef, state)


def sdxl_max_batch(args, dtype, on_attempt=lambda tried: None) -> dict:
    """Largest B whose SDXL step runs on one device (remat, FSDP off); see the docstring.
    `on_attempt(rows)` is called after every attempt (partial results survive a timeout)."""
    cfg = TOY_SDXL if args.toy else fixture_config("sdxl_unet")
    latent = args.sdxl_latent or (8 if args.toy else 128)
    text_len = 8 if args.toy else 77
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    consts = {"empty_embeds": np.zeros((text_len, cfg["cross_attention_dim"]), np.float32),
              "empty_pooled": np.zeros((pooled,), np.float32),
              "time_ids": np.asarray(SDXL_TIME_IDS, np.float32)}
    limit = int(args.sdxl_limit_gib * GIB) if args.sdxl_limit_gib else \
        (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    t_start = time.perf_counter()
    state = {"trainer": None}

    def trainer():
        if state["trainer"] is None:
            t0 = time.perf_counter()
            state["trainer"] = make_trainer(
                random_unet(cfg, dtype, args.attn_impl, args.sdxl_remat), consts, 0.13025,
                args.sdxl_optimizer)
            print(f"  sdxl trainer built in {time.perf_counter() - t0:.1f} s", flush=True)
        return state["trainer"]

    tried: dict[int, dict] = {}

    def attempt(b: int) -> dict:
        hb = host_batch(cfg, b, latent, text_len, seed=b, pooled=pooled)
        tr = trainer()
        row = {"pairs_per_step": b}
        try:
            t0 = time.perf_counter()
            compiled = tr.compiled_step(hb)
            row["compile_s"] = time.perf_counter() - t0
            need = memory_needed(compiled)
            row["xla_memory_needed_gib"] = need / GIB if need else None
            if limit and need and need > limit:
                row.update(fits=False, why="XLA memory analysis over the device limit")
            else:
                secs = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    jax.block_until_ready(run_compiled(tr, compiled, hb))
                    secs.append(time.perf_counter() - t0)
                row.update(fits=True, step_s=secs[-1], pairs_per_s=b / secs[-1])
        except Exception as e:  # noqa: BLE001 (out of memory at compile or run time)
            msg = str(e)
            if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
                raise
            row.update(fits=False, why=msg.splitlines()[0][:200])
            state["trainer"] = None    # the donated state may be gone: rebuild before reuse
        peak = device_peak_bytes()
        row["device_peak_gib"] = peak / GIB if peak else None
        tried[b] = row
        on_attempt([tried[k] for k in sorted(tried)])
        print(f"  sdxl B={b}: {'fits' if row['fits'] else 'does not fit'}  "
              f"(XLA needs {row.get('xla_memory_needed_gib') or float('nan'):.3g} GiB, "
              f"{row.get('pairs_per_s', float('nan')):.2f} pairs/s)", flush=True)
        return row

    def budget_left() -> bool:
        return time.perf_counter() - t_start < args.sdxl_budget_s

    for b in [int(x) for x in args.sdxl_batches.split(",")]:
        if not budget_left() or not attempt(b)["fits"]:
            break
    predicted = None
    fit = [tried[b] for b in sorted(tried) if tried[b]["fits"]]
    if limit and len(fit) >= 2 and fit[-1].get("xla_memory_needed_gib") and \
            fit[0].get("xla_memory_needed_gib"):
        b0, b1 = fit[0]["pairs_per_step"], fit[-1]["pairs_per_step"]
        n0, n1 = fit[0]["xla_memory_needed_gib"] * GIB, fit[-1]["xla_memory_needed_gib"] * GIB
        per = (n1 - n0) / (b1 - b0)
        if per > 0:
            predicted = int((0.97 * limit - (n0 - per * b0)) // per)
            first = b = max(predicted, b1 + 1)
            while budget_left() and b not in tried and attempt(b)["fits"]:   # climb
                b += 1
            if first in tried and not tried[first]["fits"]:   # overshot: step down
                b = first - 1
                while b > b1 and budget_left() and b not in tried and not attempt(b)["fits"]:
                    b -= 1
    fits = [b for b, r in tried.items() if r["fits"]]
    best = max(fits) if fits else 0
    print(f"  sdxl: largest B that ran {best} (linear prediction {predicted}), "
          f"{time.perf_counter() - t_start:.0f} s", flush=True)
    return {"config": "toy" if args.toy else "tests/models/fixtures/sdxl_unet/config.json",
            "latent": latent, "text_len": text_len, "remat": args.sdxl_remat,
            "optimizer": args.sdxl_optimizer, "device_bytes_limit": limit,
            "largest_batch_that_ran": best, "predicted_max_batch": predicted,
            "tried": [tried[b] for b in sorted(tried)],
            "budget_exhausted": not budget_left()}


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--toy", action="store_true", help="tiny UNet, 8x8 latents: smoke test")
    p.add_argument("--size", choices=("auto", "small", "sd15"), default="auto",
                   help="auto: sd15 on a GPU, small (64, 128) on the CPU")
    p.add_argument("--pairs", type=int, default=0, help="pairs a step (default sd15 8, small 2)")
    p.add_argument("--latent", type=int, default=0, help="latent edge (default sd15 64, small 32)")
    p.add_argument("--text-len", type=int, default=0, help="text tokens (default 77, toy 8)")
    p.add_argument("--iters", type=int, default=0, help="steps a timed round (GPU 5, CPU 1)")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds (GPU 5, CPU 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--attn-impl", default="auto", choices=IMPLEMENTATIONS)
    p.add_argument("--remat", default=None, help="remat policy of ours (default none)")
    p.add_argument("--scaling-factor", type=float, default=0.18215)
    p.add_argument("--skip-jax", action="store_true")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--torch-threads", default="",
                   help="CPU: comma list of torch intra-op thread counts, one eager row each "
                        "(default: torch's default and 1; the fastest is the reference)")
    p.add_argument("--no-torch-compile", action="store_true",
                   help="on CUDA, skip the torch.compile reference")
    p.add_argument("--sdxl-max-batch", action="store_true",
                   help="also search the largest SDXL batch that runs (GPU; toy on the CPU)")
    p.add_argument("--sdxl-only", action="store_true", help="only the SDXL search")
    p.add_argument("--sdxl-batches", default="1,2", help="first batches tried, in order")
    p.add_argument("--sdxl-latent", type=int, default=0, help="default 128 (1024 px), toy 8")
    p.add_argument("--sdxl-remat", default="nothing_saveable")
    p.add_argument("--sdxl-optimizer", default="adafactor", choices=("adamw", "adafactor"),
                   help="default: the SDXL recipe's Adafactor")
    p.add_argument("--sdxl-limit-gib", type=float, default=0.0,
                   help="memory limit for the search (default: the device's bytes_limit)")
    p.add_argument("--sdxl-budget-s", type=float, default=420.0,
                   help="start no SDXL attempt after this many seconds")
    p.add_argument("--xla-defaults", action="store_true",
                   help=f"do not add {GEMM_FLAG} to XLA_FLAGS")
    p.add_argument("--compile-cache", default="",
                   help="JAX persistent compilation cache folder (smoke tests; compile times "
                        "then measure cache loads)")
    p.add_argument("--allocator", default="system", choices=("system", "jemalloc"),
                   help="jemalloc: re-run with libjemalloc preloaded, decay off (both sides; "
                        "glibc malloc page-faults XLA's buffers in again every step)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    import torch
    gpu = jax.default_backend() == "gpu"
    size = "toy" if args.toy else (args.size if args.size != "auto" else
                                   ("sd15" if gpu else "small"))
    cfg = {"toy": TOY, "small": SMALL, "sd15": None}[size] or fixture_config("sd15_unet")
    pairs = args.pairs or {"toy": 2, "small": 2, "sd15": 8}[size]
    latent = args.latent or {"toy": 8, "small": 32, "sd15": 64}[size]
    text_len = args.text_len or (8 if args.toy else 77)
    args.iters = args.iters or (5 if gpu else 1)
    args.rounds = args.rounds or (5 if gpu else (1 if args.toy else 3))
    dtype = jnp.bfloat16 if gpu else jnp.float32
    args.dtype_label = "bf16 compute, float32 params" if gpu else "float32"
    env = environment()
    env["torch"] = torch.__version__
    import diffusers
    env["diffusers"] = diffusers.__version__
    _, tdev = torch_env()
    env["torch_device"] = torch.cuda.get_device_name() if tdev == "cuda" else \
        (platform.processor() or platform.machine())
    env["torch_threads"] = torch.get_num_threads()
    # On a shared CPU, torch's OpenMP threads can stall on each other (spin barriers with a
    # core taken): then 1 thread is much faster than 2, so both run and the best one counts.
    thread_counts = [None] if tdev == "cuda" else sorted(
        {int(x) for x in args.torch_threads.split(",") if x} or {torch.get_num_threads(), 1},
        reverse=True)
    print("environment:", env, flush=True)
    print(f"train step benchmark: {size} UNet, {pairs} pairs a step, {latent}x{latent} latents, "
          f"{text_len} text tokens; ours {args.dtype_label}, torch "
          f"{'autocast bf16 + float32 master weights, SDPA' if tdev == 'cuda' else 'float32'}"
          f"; remat {args.remat}; {args.rounds} rounds of {args.iters} steps", flush=True)
    result = {"environment": env, "size": size, "config": cfg, "pairs": pairs,
              "latent": latent, "text_len": text_len, "hparams": HPARAMS,
              "scheduler": SCHEDULER, "iters": args.iters, "rounds": args.rounds,
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "compile_cache": args.compile_cache or None, "rows": []}
    if not args.sdxl_only:
        hb = host_batch(cfg, pairs, latent, text_len)
        consts = {"empty_embeds": np.zeros((text_len, cfg["cross_attention_dim"]), np.float32)}
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            model = build_torch_unet(cfg, tmp)
            n_params = sum(p.numel() for p in model.parameters())
            fwd = count_forward_flops(model.to(tdev), cfg, latent, text_len, tdev)
            model = model.to("cpu")
            flops_pair = 8 * fwd if fwd else None
            print(f"  model {n_params / 1e6:.1f} M params, {fwd / 1e9 if fwd else 0:.2f} GFLOP a "
                  f"forward, {flops_pair / 1e12 if flops_pair else 0:.3f} TFLOP a pair; built "
                  f"and saved in {time.perf_counter() - t0:.1f} s", flush=True)
            result.update(params=n_params, model_flops_per_pair=flops_pair)
            rows = result["rows"]

            def save():     # after every row: a section cut short by its timeout keeps them
                if args.out:
                    write_json(args.out, result)
            if not args.skip_jax:
                rows.append(bench_ours(tmp, hb, args, dtype, consts, flops_pair))
                print(f"  ours: {rows[-1]['pairs_per_s']:.2f} pairs/s (compile "
                      f"{rows[-1]['compile_s']:.1f} s)", flush=True)
                save()
            if not args.skip_torch:
                for n in thread_counts:
                    rows.append(bench_torch(model, hb, args, False, flops_pair, n))
                    print(f"  {rows[-1]['impl']}: {rows[-1]['pairs_per_s']:.2f} pairs/s",
                          flush=True)
                    save()
                if tdev == "cuda" and not args.no_torch_compile:
                    rows.append(bench_torch(model, hb, args, True, flops_pair))
                    print(f"  torch.compile: {rows[-1]['pairs_per_s']:.2f} pairs/s (compile "
                          f"{rows[-1]['compile_s']:.1f} s)", flush=True)
        ours = next((r for r in rows if r["impl"].startswith("ours")), None)
        for r in rows:
            r["ours_over_this"] = ours["pairs_per_s"] / r["pairs_per_s"] if ours else None
        print()
        print_table(rows, [("impl", "implementation"), ("pairs_per_step", "B"),
                           ("step_s", "step s"), ("pairs_per_s", "pairs/s"),
                           ("compile_s", "compile s"), ("peak_mem_gib", "peak GiB"),
                           ("xla_memory_needed_gib", "XLA GiB"), ("mfu", "MFU"),
                           ("ours_over_this", "ours / this")])
        eager = max((r for r in rows if "eager" in r["impl"]), default=None,
                    key=lambda r: r["pairs_per_s"])
        comp = next((r for r in rows if "torch.compile" in r["impl"]), None)
        if ours and eager:
            result["ratio_vs_eager"] = ours["pairs_per_s"] / eager["pairs_per_s"]
            print(f"\nratio ours / torch eager ({eager['impl']}): "
                  f"{result['ratio_vs_eager']:.2f}")
        if ours and comp:
            result["ratio_vs_compile"] = ours["pairs_per_s"] / comp["pairs_per_s"]
            print(f"ratio ours / torch.compile: {result['ratio_vs_compile']:.2f}")
        if ours and gpu and comp:
            print(f"target (issue 10 (b)): ours / torch.compile >= 1.5: "
                  f"{'met' if result['ratio_vs_compile'] >= 1.5 else 'NOT met'}")
        elif ours and eager and not gpu:
            print(f"target (issue 10 (a)): ours / torch eager >= 1.2: "
                  f"{'met' if result['ratio_vs_eager'] >= 1.2 else 'NOT met'}")
        if ours and gpu and ours.get("peak_mem_gib"):
            print(f"target: SD1.5 step under 40 GiB: ours peak {ours['peak_mem_gib']:.1f} GiB "
                  f"({'met' if ours['peak_mem_gib'] < 40 else 'NOT met'}; the target is for "
                  f"B = 8 with AdamW, this run is B = {pairs})")
        if ours and ours.get("xla_flops_per_step") and flops_pair:
            print(f"XLA cost-analysis FLOPs / model FLOPs: "
                  f"{ours['xla_flops_per_step'] / (flops_pair * pairs):.2f}")
    if args.sdxl_max_batch or args.sdxl_only:
        print("\nSDXL max batch (one device, FSDP off, remat "
              f"{args.sdxl_remat}, {args.sdxl_optimizer}):", flush=True)
        def partial(tried):
            result["sdxl"] = {"tried": tried, "partial": True}
            write_json(args.out, result)
        result["sdxl"] = sdxl_max_batch(args, dtype, partial)
        if args.sdxl_only:
            result["rows"] = result["sdxl"]["tried"]
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
