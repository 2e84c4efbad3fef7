"""The train step's inputs from the encoded pairs, and the one held-out evaluation loop.

    step_consts(encode_dir, spec)   the empty prompt's states (caption dropout; SDXL: pooled and
                                    time ids), float32
    host_batch(loader batches)      A loader batches -> (A, B_local, ...) float32 + `weights`
    eval_batches(loader, limit)     the held-out pairs as (1, B_local, ...) weighted batches
    heldout_means(eval_fn, batches, key_seed)   weighted means of `eval_step`'s sums
"""
from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from fifa_jax.training import pair_dataset

MODEL_KEYS = ("moments_w", "moments_l", "prompt_embeds", "pooled", "proxy_prob")


def step_consts(encode_dir, spec: dict) -> dict:
    """The step's constants: `empty_embeds` (L, D); SDXL: `empty_pooled` (P,), `time_ids` (6,)."""
    empty = pair_dataset.load_empty_prompt(encode_dir)
    out = {"empty_embeds": empty["prompt_embeds"].astype(np.float32)}
    if spec.get("is_sdxl"):
        res = float(spec["resolution"])
        out["empty_pooled"] = empty["pooled"].astype(np.float32)
        out["time_ids"] = np.array([res, res, 0.0, 0.0, res, res], np.float32)
    return out


def host_batch(batches: list[dict], weights_key: str | None = None) -> dict:
    """Stack A loader batches into the step's (A, B_local, ...) layout (float32); `weights`
    (A, B_local) from `weights_key` (else ones)."""
    out = {k: np.stack([b[k] for b in batches]).astype(np.float32)
           for k in MODEL_KEYS if k in batches[0]}
    if weights_key:
        out["weights"] = np.stack([b[weights_key] for b in batches]).astype(np.float32)
    else:
        out["weights"] = np.ones(out["moments_w"].shape[:2], np.float32)
    return out


def eval_batches(val, limit: int):
    """The held-out pairs of the PairLoader `val` in (1, B_local, ...) batches with weights;
    the first `limit` pairs (0: all)."""
    g, local = val.global_batch, val.local_batch
    for i, b in enumerate(val.epoch_batches()):
        if limit and i * g >= limit:
            break
        mask = b["mask"].astype(np.float32)
        if limit:
            mask = mask * (i * g + val.process_index * local + np.arange(local) < limit)
        yield host_batch([dict(b, mask=mask)], weights_key="mask")


def heldout_means(eval_fn: Callable, batches: Iterable[dict], key_seed: int,
                  num_train_timesteps: int = 1000) -> dict:
    """Weighted held-out means: `eval_fn(batch, key_data (2,) uint32, i uint32)` returns the
    weighted sums of `train_step.eval_step` (with their weight `n`) for batch i; -> each sum
    over the batches / the total weight, plus `pairs` (the total weight), and the timestep
    bands' means (`band_means`). {} without batches."""
    key_data = jax.random.key_data(jax.random.key(key_seed)).astype(jnp.uint32)
    sums = None
    for i, b in enumerate(batches):
        out = eval_fn(b, key_data, jnp.uint32(i))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    if sums is None:
        return {}
    sums = jax.device_get(sums)
    n = max(float(sums.pop("n")), 1.0)
    out = {k: float(v) / n for k, v in sums.items() if k != "bands"} | {"pairs": n}
    if "bands" in sums:
        out.update(band_means(sums["bands"], num_train_timesteps))
    return out


def band_means(bands: dict, num_train_timesteps: int) -> dict:
    """{"<metric>@t<lo>-<hi>": mean, "pairs@t<lo>-<hi>": n} from `eval_step`'s band sums (a
    band without pairs gets no mean)."""
    from fifa_jax.training.train_step import band_edges
    out = {}
    for j, (lo, hi) in enumerate(band_edges(num_train_timesteps, len(bands["n"]))):
        nb = float(bands["n"][j])
        out[f"pairs@t{lo}-{hi}"] = nb
        if nb > 0:
            out.update({f"{k}@t{lo}-{hi}": float(v[j]) / nb for k, v in bands.items()
                        if k != "n"})
    return out
