"""One Diffusion-DPO optimiser step: accumulated micro-batches, one update (method.md §3).

Batch layout (global arrays; axis 1 split over the mesh's batch axes):
    moments_w, moments_l    (A, B, 2C, h, w)  VAE posterior [mean; logvar] of winner / loser
    prompt_embeds           (A, B, L, D)      text states of each pair's prompt
    pooled                  (A, B, P)         SDXL: pooled text embedding (optional)
    weights                 (A, B)            1 = a pair, 0 = padding (validation)
    proxy_prob              (A, B)            the proxy's preference probability p of each
                                              pair (only with margin_weighting "smpo")
A micro-batches of B pairs make one update; gradients are averaged over them, so A x B is
one batch of A*B pairs (up to float rounding). `train.accumulate` picks where the A-loop runs:
"scan" (`train_step`: one compiled program, a loop over the micro-batches inside) or "host"
(`micro_step` called A times, adding into a donated gradient buffer, then `update_step`): the
same values; the second compiles loop-free programs (what that saves in TPU compile time and
host memory: benchmarks/RESULTS.md). Constants: `empty_embeds` (L, D) and, for SDXL,
`empty_pooled` (P,) and `time_ids` (6,).

Per pair (its key: fold_in(fold_in(state.key, step), index in the step), so a draw never
depends on the micro-batch split, the sharding or an interruption):
  draw latents z = mean + exp(logvar / 2) * n (a fresh posterior sample, never the mean;
  random flips are the loader's choice of the stored mirrored posterior), shifted and scaled
  by the VAE's factors; one timestep t ~ U{0..T-1} and one noise draw, shared by winner and
  loser (training: t ~ U{min_timestep..max_timestep}, `train.min_timestep` /
  `max_timestep`, all of them by default);
  replace the prompt by the empty prompt with probability `caption_dropout`.
The policy predicts with gradients, the reference without; `dpo_loss` compares them with
`cfg.loss` (dpo | ipo | hinge) and, with `cfg.margin_weighting` "smpo", each pair's beta
scaled by smpo_gain * (2p - 1) (pref_loss.py).
A non-finite loss or gradient leaves the state unchanged and reports `finite = 0`; the loop
stops on it (no non-finite parameters are ever kept or saved).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fifa_jax.training import noise_schedule as ns
from fifa_jax.training import timestep_weighting as tw
from fifa_jax.training.dpo import dpo_loss
from fifa_jax.training.pref_loss import smpo_scale
from fifa_jax.training.train_state import TrainState

MOMENT_KEYS = ("moments_w", "moments_l")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    beta: float
    caption_dropout: float
    scaling_factor: float
    shift_factor: float = 0.0                           # SD3-style VAEs; 0 for SD 1/2/XL
    logvar_clip: tuple[float, float] = (-30.0, 20.0)   # diffusers DiagonalGaussianDistribution
    loss: str = "dpo"                                   # dpo | ipo | hinge (pref_loss.py)
    margin_weighting: str = "none"                      # none | smpo (batch["proxy_prob"])
    smpo_gain: float = 10.0                             # SmPO's factor 10
    timestep_weighting: str = "none"                    # none | min_snr | inverse_snr
    snr_gamma: float = 5.0                              # min_snr's gamma
    min_timestep: int = 0              # training draws t ~ U{min..max} (held-out: all of
    max_timestep: int = -1             # 0..T-1); -1: T - 1
    sft_weight: float = 0.0            # lambda of the winners' anchor (training only)


def pair_keys(key_data, step, n: int, start=0):
    """(n,) typed keys of pairs start..start+n-1 of one step: fold_in(fold_in(key, step), j)."""
    base = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
    idx = jnp.asarray(start, jnp.uint32) + jnp.arange(n, dtype=jnp.uint32)
    return jax.vmap(lambda j: jax.random.fold_in(base, j))(idx)


def _sample(moments, noise, cfg: StepConfig):
    """z (C, h, w) = (mean + std * noise - shift) * scaling factor, moments (2C, h, w)."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=0)
    logvar = jnp.clip(logvar, *cfg.logvar_clip)
    return (mean + jnp.exp(0.5 * logvar) * noise - cfg.shift_factor) * cfg.scaling_factor


def prepare_pair(key, pair: dict, consts: dict, schedule: ns.NoiseSchedule, cfg: StepConfig,
                 train: bool):
    """One pair's model inputs: (x_t of winner and loser (2, C, h, w), t (), context pytree,
    target (2, C, h, w)). `pair` holds one pair's slices of the batch arrays."""
    k = jax.random.split(key, 7)       # k[5:] unused: 7 keeps every draw as it was
    moments = [pair[name] for name in MOMENT_KEYS]     # flips: the loader's (loader.py)
    c = moments[0].shape[0] // 2
    shape = (c,) + moments[0].shape[1:]
    x0 = jnp.stack([_sample(moments[0], jax.random.normal(k[0], shape), cfg),
                    _sample(moments[1], jax.random.normal(k[1], shape), cfg)])
    noise = jax.random.normal(k[2], shape)
    lo, hi = (cfg.min_timestep, cfg.max_timestep) if train else (0, -1)
    hi = schedule.num_train_timesteps - 1 if hi < 0 else hi
    t = jax.random.randint(k[3], (), lo, hi + 1)
    noise2 = jnp.stack([noise, noise])
    tt = jnp.stack([t, t])
    xt = ns.add_noise(schedule, x0, noise2, tt)
    tgt = ns.target(schedule, x0, noise2, tt)
    drop = jax.random.uniform(k[4]) < (cfg.caption_dropout if train else 0.0)
    ctx = {"encoder_hidden_states": jnp.where(drop, consts["empty_embeds"],
                                              pair["prompt_embeds"])}
    if "pooled" in pair:
        ctx["text_embeds"] = jnp.where(drop, consts["empty_pooled"], pair["pooled"])
        ctx["time_ids"] = consts["time_ids"]
    return xt, t, ctx, tgt


def micro_batch_inputs(keys, micro: dict, consts, schedule, cfg, train: bool):
    """(2B, ...) model inputs from B pairs and their (B,) keys, interleaved: rows 2j and
    2j + 1 are pair j's winner and loser. (Winners first would make every device that holds
    pair j send its rows to others: with the pairs split over the devices, concatenating the
    winners and the losers moves half the batch across devices, and splitting the predictions
    again moves it back.)"""
    pairs = {k: v for k, v in micro.items() if k not in ("weights", "proxy_prob")}
    xt, t, ctx, tgt = jax.vmap(
        lambda kk, p: prepare_pair(kk, p, consts, schedule, cfg, train))(keys, pairs)

    def pairs_adjacent(a):                # (B, 2, ...) -> (2B, ...): w0, l0, w1, l1, ...
        return a.reshape((-1,) + a.shape[2:])

    ctx2 = jax.tree.map(lambda a: jnp.repeat(a, 2, axis=0), ctx)
    return (pairs_adjacent(xt), jnp.repeat(t, 2).astype(jnp.float32), ctx2,
            pairs_adjacent(tgt))


def call_unet(unet_fn: Callable, params, xt, t, ctx):
    added = ({"text_embeds": ctx["text_embeds"], "time_ids": ctx["time_ids"]}
             if "text_embeds" in ctx else None)
    return unet_fn(params, xt, t, ctx["encoder_hidden_states"], added)


def micro_loss(params, ref_params, keys, micro, consts, unet_fn, schedule, cfg, train=True,
               policy_fn=None):
    """DPO loss of one micro-batch (B pairs) and its aux. `policy_fn(params, ref_params)`:
    the policy's UNet parameters from the trained ones (LoRA: base + adapters, lora.py);
    None: `params` are the UNet's."""
    xt, t, ctx, tgt = micro_batch_inputs(keys, micro, consts, schedule, cfg, train)
    full = params if policy_fn is None else policy_fn(params, ref_params)
    pol = call_unet(unet_fn, full, xt, t, ctx)
    ref = jax.lax.stop_gradient(call_unet(unet_fn, ref_params, xt, t, ctx))
    scale = None
    if cfg.margin_weighting == "smpo" and "proxy_prob" in micro:
        scale = smpo_scale(micro["proxy_prob"], cfg.smpo_gain)
    w_t = tw.weights(cfg.timestep_weighting if train else "none", schedule.alphas_cumprod,
                     t[0::2].astype(jnp.int32), cfg.snr_gamma, schedule.prediction_type)
    if w_t is not None:       # the pair's timestep weight scales its beta (training only:
        #                       held-out metrics stay the plain DPO loss, comparable)
        scale = w_t if scale is None else scale * w_t
    loss, aux = dpo_loss(pol, ref, tgt, cfg.beta, weights=micro.get("weights"),
                         interleaved=True, loss=cfg.loss, beta_scale=scale,
                         sft_weight=cfg.sft_weight if train else 0.0, sft_scale=w_t)
    return loss, dict(aux, t=t[0::2].astype(jnp.int32))          # each pair's timestep


AUX_METRICS = ("implicit_acc", "implicit_acc_strict", "se_pol_w", "se_pol_l", "se_ref_w",
               "se_ref_l", "error_gap")


def _grad_fn(policy_fn):
    return jax.value_and_grad(
        functools.partial(micro_loss, policy_fn=policy_fn) if policy_fn else micro_loss,
        has_aux=True)


def _named(loss, aux) -> dict:
    """One micro-batch's loss and aux metrics, by name."""
    return {"loss": loss, **{m: aux[m] for m in AUX_METRICS}}


def _add(grads, sums: dict, g, loss, aux) -> tuple[Any, dict]:
    """The accumulator after one more micro-batch: its gradients and named metrics added."""
    return (jax.tree.map(jnp.add, grads, g),
            {n: sums[n] + v for n, v in _named(loss, aux).items()})


def update_step(state: TrainState, grads, sums: dict, *, a: int,
                optimizer: optax.GradientTransformation, lr_fn: Callable
                ) -> tuple[TrainState, dict[str, Any]]:
    """One optimiser update from gradients and metrics summed over `a` micro-batches: their
    means, AdamW (or the configured optimiser), and a state left unchanged when the loss or
    the gradient is not finite. The end of `train_step`, and (`train.accumulate` "host") its
    own program after A `micro_step`s (the state donated; the gradient buffer is freed when
    the caller drops it)."""
    if a > 1:
        grads = jax.tree.map(lambda g: g / a, grads)
        sums = {n: v / a for n, v in sums.items()}
    metrics = dict(sums)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, key=state.key)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics.update(grad_norm=grad_norm, learning_rate=lr_fn(state.step),
                   param_norm=optax.tree.norm(new.params),
                   finite=finite.astype(jnp.float32))
    return new, metrics


def train_step(state: TrainState, ref_params, batch: dict, consts: dict, *,
               unet_fn: Callable, optimizer: optax.GradientTransformation,
               schedule: ns.NoiseSchedule, cfg: StepConfig, lr_fn: Callable,
               policy_fn: Callable | None = None) -> tuple[TrainState, dict[str, Any]]:
    """Accumulate gradients over the A micro-batches of `batch` in a loop of the compiled
    program (`train.accumulate` "scan"), apply one update (to `state.params`: the UNet's, or
    with `policy_fn` the LoRA adapters only)."""
    a, b = batch["moments_w"].shape[:2]
    keys = pair_keys(state.key, state.step, a * b).reshape(a, b)
    grad_fn = _grad_fn(policy_fn)

    def body(carry, xs):
        grads, sums, params, ref = carry
        # The parameters ride in the carry through an optimisation barrier, so XLA cannot see
        # that they are loop-invariant: otherwise it hoists the FSDP all-gathers of every
        # weight out of the loop and holds the whole unsharded policy and reference for it
        # (seen on 8 CPU devices: all 185 gathers of a small UNet moved before the loop).
        params, ref = jax.lax.optimization_barrier((params, ref))
        k, micro = xs
        (loss, aux), g = grad_fn(params, ref, k, micro, consts, unet_fn, schedule, cfg)
        grads, sums = _add(grads, sums, g, loss, aux)
        return (grads, sums, params, ref), None

    if a == 1:     # no accumulation: the same values without a loop, zeros and a division
        (loss, aux), grads = grad_fn(state.params, ref_params, keys[0],
                                     jax.tree.map(lambda x: x[0], batch), consts, unet_fn,
                                     schedule, cfg)
        sums = _named(loss, aux)
    else:
        (grads, sums, _, _), _ = jax.lax.scan(
            body, (zero_grads(state.params), zero_sums(), state.params, ref_params),
            (keys, batch))
    return update_step(state, grads, sums, a=a, optimizer=optimizer, lr_fn=lr_fn)


def zero_grads(params):
    """Float32 zeros shaped like the trained parameters: the gradient accumulator."""
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


def zero_sums() -> dict:
    return {n: jnp.zeros((), jnp.float32) for n in ("loss",) + AUX_METRICS}


def micro_step(state: TrainState, grads, sums: dict, ref_params, micro: dict, consts: dict,
               index, *, unet_fn: Callable, schedule: ns.NoiseSchedule, cfg: StepConfig,
               policy_fn: Callable | None = None) -> tuple[Any, dict]:
    """`train.accumulate` "host": add micro-batch `index`'s gradients and metric sums into
    `grads` / `sums` (donated; the accumulator of one update, zeros before micro-batch 0).
    `micro`: the A=1 layout (1, B, ...). Its pairs draw the keys they have in `train_step`
    (pairs index*B .. index*B + B-1 of the step), so A calls and `update_step` give the values
    of one `train_step` over the A micro-batches. It takes the whole state (optimiser moments
    included, unused) so that its compiled memory counts every buffer resident in the step."""
    b = micro["moments_w"].shape[1]
    keys = pair_keys(state.key, state.step, b, start=index * b)
    (loss, aux), g = _grad_fn(policy_fn)(state.params, ref_params, keys,
                                         jax.tree.map(lambda x: x[0], micro), consts,
                                         unet_fn, schedule, cfg)
    return _add(grads, sums, g, loss, aux)


TIMESTEP_BANDS = 4     # held-out loss and accuracy in 4 equal bands of t (low t: little noise)


def band_edges(num_train_timesteps: int, bands: int = TIMESTEP_BANDS) -> list[tuple[int, int]]:
    """[(lo, hi)] inclusive timestep ranges of `bands` equal bands of 0..T-1."""
    cuts = [round(i * num_train_timesteps / bands) for i in range(bands + 1)]
    return [(cuts[i], cuts[i + 1] - 1) for i in range(bands)]


def eval_step(params, ref_params, batch: dict, consts: dict, key_data, index, *,
              unet_fn: Callable, schedule: ns.NoiseSchedule, cfg: StepConfig,
              policy_fn: Callable | None = None) -> dict:
    """Sums over one validation batch (A=1 layout, weights mark real pairs): `n`, and the
    weighted sums of the per-pair loss and implicit accuracy; `bands`: the same per timestep
    band (`band_edges`), each (TIMESTEP_BANDS,). No dropout, no flips; draws from
    fold_in(key, index) so every evaluation sees the same noise."""
    micro = jax.tree.map(lambda x: x[0], batch)
    b = micro["moments_w"].shape[0]
    keys = pair_keys(key_data, index, b)
    loss, aux = micro_loss(params, ref_params, keys, micro, consts, unet_fn, schedule, cfg,
                           train=False, policy_fn=policy_fn)
    w = micro["weights"].astype(jnp.float32)
    n = jnp.sum(w)
    t = aux["t"]
    lo = jnp.asarray([e[0] for e in band_edges(schedule.num_train_timesteps)])
    band = jnp.sum(t[:, None] >= lo[None, :], axis=1) - 1              # (B,) 0..bands-1
    onehot = (band[:, None] == jnp.arange(TIMESTEP_BANDS)[None, :]) * w[:, None]
    return {"n": n, "loss": loss * n, "implicit_acc": aux["implicit_acc"] * n,
            "implicit_acc_strict": aux["implicit_acc_strict"] * n,
            "error_gap": aux["error_gap"] * n,
            "bands": {"n": jnp.sum(onehot, axis=0),
                      "loss": onehot.T @ aux["pair_loss"].astype(jnp.float32),
                      "implicit_acc": onehot.T @ aux["pair_acc"]}}
