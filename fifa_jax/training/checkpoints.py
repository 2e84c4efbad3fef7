"""Checkpoints of the DPO trainer: Orbax `CheckpointManager`, asynchronous, last M kept.

Layout (`WORKDIR/train/checkpoints/<step>/`), one item each:
    params     the float32 policy parameters (what `export` reads, alone)
    opt_state  the optimiser state
    meta       JSON: step, the raw RNG key, the loader's position record (host-count free),
               `compat` (the hash of every train setting that changes the trajectory) and
               the finite-checked metrics of the step
The reference parameters are not saved (they are the base model's, reloaded on resume).
Beside it, never deleted by the trainer: `checkpoints.corrupt/<step>-<time>/` (a step that could
not be read back, `set_aside`) and `checkpoints.superseded/<time>/` (another settings' run).
Each item is restored on its own, so a broken one is named (`UnreadableCheckpoint`); a failed
write becomes one line (`write_error`: path, free space, a checkpoint's size); a folder left by
a save cut short is removed when a writing manager opens (`cleanup_tmp_directories`).

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

import errno
import pathlib
import shutil
import time
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
    # cleanup_tmp_directories: a save cut short (a kill, a full disk) left a temporary
    # folder; a writing manager removes it when it opens
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None, create=not read_only,
                                           enable_async_checkpointing=async_save,
                                           read_only=read_only,
                                           cleanup_tmp_directories=not read_only)
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


class UnreadableCheckpoint(InputError):
    """A saved step that cannot be read back (truncated or missing files); names the step and
    the item folder."""

    def __init__(self, directory, step: int, item: str, error: Exception):
        self.step, self.item = int(step), item
        self.path = pathlib.Path(directory) / str(step) / item
        super().__init__(f"checkpoint step {step} cannot be read: {self.path}: "
                         f"{error_line(error)}")


def error_line(error: Exception, limit: int = 240) -> str:
    """`error` as one short line (TensorStore's messages carry a multi-line spec)."""
    text = str(error).split(" See full TensorStore details")[0].split("[tensorstore_spec")[0]
    line = (text.strip().splitlines() or [""])[0].strip()
    return f"{type(error).__name__}: {line[:limit]}"


def _restore_item(mgr, step: int, item: str, arg):
    try:
        return mgr.restore(step, args=ocp.args.Composite(**{item: arg}))[item]
    except Exception as e:  # noqa: BLE001 (any failure to read back is a broken checkpoint)
        raise UnreadableCheckpoint(mgr.directory, step, item, e) from e


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
    """The meta item of `step`; UnreadableCheckpoint when it cannot be read."""
    return _restore_item(mgr, step, "meta", ocp.args.JsonRestore())


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def restore(mgr: ocp.CheckpointManager, step: int, abstract: TrainState,
            shardings: TrainState) -> tuple[TrainState, dict]:
    """The state saved at `step`, placed by `shardings`, and its meta. Each item is read on
    its own, so a broken one is named (UnreadableCheckpoint)."""
    meta = read_meta(mgr, step)
    params = _restore_item(mgr, step, "params", ocp.args.StandardRestore(
        _abstract(abstract.params, shardings.params)))
    opt_state = _restore_item(mgr, step, "opt_state", ocp.args.StandardRestore(
        _abstract(abstract.opt_state, shardings.opt_state)))
    key = put_global(np.asarray(meta["key"], np.uint32), shardings.key)
    state = TrainState(step=put_global(np.asarray(meta["step"], np.int32), shardings.step),
                       params=params, opt_state=opt_state, key=key)
    return state, meta


def restore_params(directory, step: int | None, abstract_params, shardings=None
                   ) -> tuple[Any, int]:
    """Only the policy parameters of `step` (None: the latest), e.g. for export.
    UnreadableCheckpoint (an InputError naming the step and folder) when they cannot be
    read."""
    mgr = manager(directory, max_to_keep=0, async_save=False, read_only=True)
    try:
        steps = mgr.all_steps()
        if not steps:
            raise InputError(f"no checkpoint in {directory} (run the train stage first)")
        step = max(steps) if step is None else int(step)
        if step not in steps:
            raise InputError(f"no checkpoint of step {step} in {directory}; saved steps: "
                             f"{sorted(steps)}")
        target = (abstract_params if shardings is None
                  else _abstract(abstract_params, shardings))
        params = _restore_item(mgr, step, "params", ocp.args.StandardRestore(target))
    finally:
        mgr.close()
    return params, step


def utc_stamp() -> str:
    """The current UTC time as a folder-name stamp, e.g. 20261206T091500Z."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def set_aside(directory, step: int, dest_root) -> pathlib.Path:
    """Move `directory/<step>` to `dest_root/<step>-<UTC time>` (never deleted; process 0
    alone calls it, then every process reloads its manager). Returns the new path."""
    dest = pathlib.Path(dest_root) / f"{step}-{utc_stamp()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(pathlib.Path(directory) / str(step)), str(dest))
    return dest


def bytes_of(tree) -> int:
    """Bytes of every array leaf of `tree` (what a save writes, before compression)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
                   if hasattr(x, "dtype")))


def is_out_of_space(error: BaseException) -> bool:
    """A write that failed for lack of disk space (Python's ENOSPC or TensorStore's text)."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left" in text or "ENOSPC" in text or "Disk quota exceeded" in text:
            return True
        if "RESOURCE_EXHAUSTED" in text and ("write" in text.lower() or "file" in text.lower()):
            return True
    return False


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def from_writer(error: BaseException) -> bool:
    """Whether `error` (or one it came from) is a write failure: an OSError, a full disk, or
    an error raised inside Orbax / TensorStore (not a bug in the caller's code)."""
    for e in _chain(error):
        if isinstance(e, OSError) or is_out_of_space(e):
            return True
        tb = e.__traceback__
        while tb is not None:
            name = tb.tb_frame.f_code.co_filename
            if "/orbax/" in name or "/tensorstore/" in name:
                return True
            tb = tb.tb_next
    return False


def write_error(directory, step: int | None, error: BaseException, needed: int) -> InputError:
    """One line for a checkpoint that could not be written: the path, and for a full disk the
    free space and what a checkpoint needs."""
    directory = pathlib.Path(directory)
    where = directory / str(step) if step is not None else directory
    try:
        free = shutil.disk_usage(directory if directory.exists() else directory.parent).free
    except OSError:
        free = None
    # a full disk can surface as a follow-on error of another write: judge by the space too
    if is_out_of_space(error) or (free is not None and free < needed):
        have = f"{free / 2**30:.2f} GiB free" if free is not None else "free space unknown"
        return InputError(
            f"train: no space left on the device to write checkpoint {where} ({have}; a "
            f"checkpoint needs about {needed / 2**30:.2f} GiB, and "
            f"train.keep_checkpoints of them are kept): free space or lower "
            f"train.keep_checkpoints, then rerun the same command; the last finished "
            f"checkpoint is kept and the unfinished one is removed on the next start")
    return InputError(f"train: could not write checkpoint {where}: {error_line(error)}; the last "
                      f"finished checkpoint is kept; rerun the same command once this is fixed")
