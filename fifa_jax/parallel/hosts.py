"""What the processes of a multi-host run tell each other: barriers and process 0's decisions.

Hosts can see shared files differently (stale NFS attribute caches, local copies), so every
decision that must be the same everywhere is taken on process 0 and broadcast. Each helper is a
no-op on a single process (no collective is started); on several, each is a collective: every
process must call it at the same point of the program, so whether to call it may depend only
on what every process knows alike (e.g. the step number, never a signal that reached one).
"""
from __future__ import annotations

import jax
import numpy as np


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name`."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def from_leader(values) -> np.ndarray:
    """Process 0's int32 `values` (the same shape on every process) on every process."""
    values = np.asarray(values, np.int32)
    if jax.process_count() == 1 or values.size == 0:
        return values
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.broadcast_one_to_all(values), np.int32)


def bytes_from_leader(data: bytes) -> bytes:
    """Process 0's `data` on every process (what the others pass is ignored)."""
    if jax.process_count() == 1:
        return data
    from jax.experimental import multihost_utils
    mine = np.frombuffer(data, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(mine.size)))
    buf = mine if mine.size == size else np.zeros(size, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8))


def on_all_hosts(flag: bool) -> bool:
    """True when `flag` is True on every process."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).min() == 1)


def on_any_host(flag: bool) -> bool:
    """True when `flag` is True on at least one process (e.g. a signal that reached one)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).max() == 1)
