"""Checkpoints of the DPO trainer: Orbax `CheckpointManager`, asynchronous, last M kept.

Layout (`WORKDIR/train/checkpoints/<step>/`), one item each:
    params     the float32 policy parameters (what `export` reads, alone)
    opt_state  the optimiser state
    meta       JSON: step, the raw RNG key, the loader's position record (host-count free),
               `compat` (the hash of every train setting that changes the trajectory) and
               the finite-checked metrics of the step
The reference parameters are not saved (they are the base model's, reloaded on resume).

Saves are asynchronous: the step after a save may start while Orbax writes; the arrays it
writes are the state's at save time (Orbax copies device buffers to the host before
returning from `save`, so the donated step cannot change what is written).
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fifa_jax.errors import InputError
from fifa_jax.training.train_state import TrainState

ITEMS = ("params", "opt_state", "meta")


def manager(directory, *, max_to_keep: int, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None, create=not read_only,
                                           enable_async_checkpointing=async_save,
                                           read_only=read_only)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                                 item_names=ITEMS)


def all_finite(tree) -> bool:
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.floating))


def save(mgr: ocp.CheckpointManager, state: TrainState, meta: dict, *, force: bool = False,
         check_finite: bool = True) -> bool:
    """Save `state` at its step (asynchronously). Refuses non-finite parameters (the loop
    stops before such a state is kept; this is the last guard)."""
    step = int(jax.device_get(state.step))
    if check_finite and not all_finite(jax.device_get(state.params)):
        raise FloatingPointError(f"refusing to save step {step}: non-finite parameters")
    meta = dict(meta, step=step, key=np.asarray(jax.device_get(state.key)).tolist())
    return mgr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.JsonSave(meta)), force=force)


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
    return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def restore(mgr: ocp.CheckpointManager, step: int, abstract: TrainState,
            shardings: TrainState) -> tuple[TrainState, dict]:
    """The state saved at `step`, placed by `shardings`, and its meta."""
    got = mgr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(abstract.params, shardings.params)),
        opt_state=ocp.args.StandardRestore(_abstract(abstract.opt_state, shardings.opt_state)),
        meta=ocp.args.JsonRestore()))
    meta = got["meta"]
    key = jax.device_put(np.asarray(meta["key"], np.uint32), shardings.key)
    state = TrainState(step=jax.device_put(np.int32(meta["step"]), shardings.step),
                       params=got["params"], opt_state=got["opt_state"], key=key)
    return state, meta


def restore_params(directory, step: int | None, abstract_params, shardings=None
                   ) -> tuple[Any, int]:
    """Only the policy parameters of `step` (None: the latest), e.g. for export."""
    mgr = manager(directory, max_to_keep=0, async_save=False, read_only=True)
    steps = mgr.all_steps()
    if not steps:
        raise InputError(f"no checkpoint in {directory} (run the train stage first)")
    step = max(steps) if step is None else int(step)
    if step not in steps:
        raise InputError(f"no checkpoint of step {step} in {directory}; saved steps: "
                         f"{sorted(steps)}")
    target = (abstract_params if shardings is None
              else _abstract(abstract_params, shardings))
    got = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    mgr.close()
    return got["params"], step
