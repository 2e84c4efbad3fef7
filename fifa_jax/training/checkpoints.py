"""Checkpoints of the DPO trainer: Orbax `CheckpointManager`, asynchronous, last M kept.

Layout (`WORKDIR/train/checkpoints/<step>/`), one item each:
    params     the float32 policy parameters (what `export` reads, alone)
    opt_state  the optimiser state
    meta       JSON: step, the raw RNG key, the loader's position record (host-count free),
               `compat` (the hash of every train setting that changes the trajectory) and
               the finite-checked metrics of the step
The reference parameters are not saved (they are the base model's, reloaded on resume).

Sharded state, several hosts: `save` hands Orbax the state's jax.Arrays as they lie on the
devices; each process writes the shards it holds (a replicated array once), so no process
ever holds the whole model and nothing is gathered, also when FSDP splits the parameters
over hosts. The finiteness guard is a jitted reduction on the devices (one replicated
boolean comes back), and the step and RNG key are read from this process's copy (they are
replicated). `restore` places every array by the given shardings (each process reads its
shards). Every call here that reaches Orbax (`save`, `restore`, `read_meta`, and the
manager's `delete`, `wait_until_finished`, `close`) is collective: every process must make
it, in the same order (Orbax synchronises the processes inside them).

Saves are asynchronous: the step after a save may start while Orbax writes; the arrays it
writes are the state's at save time (Orbax copies device buffers to the host before
returning from `save`, so the donated step cannot change what is written).
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fifa_jax.errors import InputError
from fifa_jax.parallel.mesh import put_global
from fifa_jax.training.train_state import TrainState

ITEMS = ("params", "opt_state", "meta")


def manager(directory, *, max_to_keep: int, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None, create=not read_only,
                                           enable_async_checkpointing=async_save,
                                           read_only=read_only)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                                 item_names=ITEMS)


@jax.jit
def _finite(tree) -> jax.Array:
    """() bool: every float leaf of `tree` is finite (reduced where the leaves lie)."""
    flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(flags).all() if flags else jnp.bool_(True)


def replicated_value(x) -> np.ndarray:
    """The value of a replicated array from this process's first shard (no gather: works
    when the array spans several hosts); a host value is returned as numpy."""
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    if not x.is_fully_replicated:
        raise ValueError(f"expected a replicated array, got sharding {x.sharding} of shape "
                         f"{x.shape}")
    return np.asarray(x.addressable_data(0))


def all_finite(tree) -> bool:
    """Every float leaf of `tree` is finite; computed on the devices holding the leaves (a
    sharded model is never copied to the host). Every process must call it (collective when
    the leaves span several hosts)."""
    return bool(replicated_value(_finite(tree)))


def save(mgr: ocp.CheckpointManager, state: TrainState, meta: dict, *, force: bool = False,
         check_finite: bool = True) -> bool:
    """Save `state` at its step (asynchronously; every process calls it). Refuses non-finite
    parameters (the loop stops before such a state is kept; this is the last guard)."""
    step = int(replicated_value(state.step))
    if check_finite and not all_finite(state.params):
        raise FloatingPointError(f"refusing to save step {step}: non-finite parameters")
    meta = dict(meta, step=step, key=replicated_value(state.key).tolist())
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
    key = put_global(np.asarray(meta["key"], np.uint32), shardings.key)
    state = TrainState(step=put_global(np.asarray(meta["step"], np.int32), shardings.step),
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
