"""Device mesh from the config, multi-host start-up, and the one way stages shard arrays.

Config (`config.mesh`):
    data:  devices on the data-parallel axis; -1 = all devices not used by the other axes.
    fsdp:  devices on the parameter-sharding axis (1 = replicate parameters).
    distributed: "auto" | "on" | "off": call `jax.distributed.initialize()` when the process is
        one of several hosts ("auto" detects a TPU pod slice / SLURM_NTASKS > 1 / the
        JAX_COORDINATOR env). Under SLURM, JAX reads the coordinator, count and id from SLURM's
        variables and, unless JAX_LOCAL_DEVICE_IDS is set, keeps GPU SLURM_LOCALID only (one
        task per GPU); launch/slurm.sh runs one task per node and exports all the node's ids.
    param_tactic: "fsdp" | "replicate" | "zero": how model parameters are laid out
        (param_sharding.py); "zero": replicated, with the trainer's optimiser state and
        gradient accumulator split by the rules (ZeRO-2).
    rules: (regex, tactic) pairs over dotted parameter paths, first match wins (used when
        param_tactic is "fsdp", and for the optimiser state under "zero").

Explicit multi-process start-up (any platform, e.g. several CPU processes on one machine, where
JAX cannot detect the process count or id): set FIFA_JAX_COORDINATOR (host:port of process 0;
JAX_COORDINATOR_ADDRESS also works), FIFA_JAX_NUM_PROCESSES and FIFA_JAX_PROCESS_ID in every
process; "auto" then initialises. Unset ones are left to JAX's cluster detection.

Axes are always ("data", "fsdp") so every stage can name them; batches are split over both.
"""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fifa_jax.errors import InputError
from fifa_jax.parallel.param_sharding import DEFAULT_RULES, PARAM_TACTICS


class MeshConfigError(InputError):
    """The mesh section or the multi-host environment does not fit the devices (one line)."""

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # a batch dimension is split over every device

ENV_COORDINATOR = "FIFA_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "FIFA_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "FIFA_JAX_PROCESS_ID"
_initialized = False


def default_config() -> ml_collections.ConfigDict:
    """The `mesh` section of an experiment config."""
    return ml_collections.ConfigDict({
        "data": -1,            # data-parallel devices; -1: all the other axes leave
        "fsdp": 1,             # parameter-sharding devices; 1: every device holds whole params
        "distributed": "auto",  # "auto" | "on" | "off": jax.distributed.initialize()
        # "fsdp": each parameter that a rule marks "fsdp" is split over the fsdp axis (when its
        # size > 1) along its largest divisible dimension; "replicate": whole on every device;
        # "zero": parameters whole, the optimiser state and (train.accumulate "host") the
        # gradient accumulator split by the rules (ZeRO-2: no weight gathers in the step)
        "param_tactic": "fsdp",
        # (regex, tactic) over dotted parameter paths (e.g. "down_blocks.0.resnets.1.conv1.kernel"),
        # first match wins, no match: replicate. Default: biases and norm scales replicated,
        # everything else "fsdp". Override e.g. --config.mesh.rules='(("conv_in","replicate"),
        # (".*","fsdp"))'.
        "rules": DEFAULT_RULES,
    })


# Value rules of the mesh section (pipeline.validate's format), checked before any stage that uses
# devices runs; ("size", None): -1 (the rest of the devices) or >= 1.
RULES = {"distributed": ("choice", ("auto", "on", "off")), "data": ("size", None),
         "fsdp": ("size", None), "param_tactic": ("choice", PARAM_TACTICS)}


def check_config(mesh) -> None:
    """The mesh checks beyond RULES."""
    from fifa_jax.errors import ConfigError
    if mesh.get("data") == -1 and mesh.get("fsdp") == -1:
        raise ConfigError("config keys 'mesh.data' and 'mesh.fsdp' cannot both be -1")
    if "rules" in mesh:
        from fifa_jax.parallel.param_sharding import check_rules
        check_rules(mesh.rules, "mesh.rules")


def _wants_distributed(mode: str) -> bool:
    if mode == "on":
        return True
    if mode == "off":
        return False
    if mode != "auto":
        raise MeshConfigError(f"mesh.distributed must be 'auto', 'on' or 'off', got {mode!r}")
    if os.environ.get("SLURM_NTASKS", "1") not in ("", "1"):
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return True
    return any(os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS",
                                           "MEGASCALE_COORDINATOR_ADDRESS", ENV_COORDINATOR))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise MeshConfigError(f"environment variable {name} must be an integer, got {value!r}") \
            from None


def _explicit_args() -> dict:
    """initialize() arguments given by the FIFA_JAX_* environment variables (unset: omitted)."""
    kwargs = {}
    if os.environ.get(ENV_COORDINATOR):
        kwargs["coordinator_address"] = os.environ[ENV_COORDINATOR]
    n, i = _env_int(ENV_NUM_PROCESSES), _env_int(ENV_PROCESS_ID)
    if n is not None:
        kwargs["num_processes"] = n
    if i is not None:
        kwargs["process_id"] = i
    if n is not None and i is not None and not 0 <= i < n:
        raise MeshConfigError(f"{ENV_PROCESS_ID}={i} must be in [0, {ENV_NUM_PROCESSES}={n})")
    return kwargs


def initialize_distributed(mode: str = "auto") -> None:
    """Call `jax.distributed.initialize()` once when this process is one of several hosts.

    Must run before anything touches a JAX backend (device lists, arrays, jit), which is why the
    stage runner calls it first.
    """
    global _initialized
    if _initialized or not _wants_distributed(mode) or jax.distributed.is_initialized():
        return
    jax.distributed.initialize(**_explicit_args())
    _initialized = True
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())


def mesh_shape(n_devices: int, data: int, fsdp: int) -> tuple[int, int]:
    """Resolve -1 entries; raise naming the key when the sizes do not multiply to n_devices."""
    if fsdp == -1 and data == -1:
        raise MeshConfigError("mesh.data and mesh.fsdp cannot both be -1")
    if fsdp == -1:
        if n_devices % data:
            raise MeshConfigError(f"mesh.data={data} does not divide the {n_devices} devices")
        fsdp = n_devices // data
    if data == -1:
        if n_devices % fsdp:
            raise MeshConfigError(f"mesh.fsdp={fsdp} does not divide the {n_devices} devices")
        data = n_devices // fsdp
    if data * fsdp != n_devices:
        raise MeshConfigError(f"mesh.data * mesh.fsdp = {data} * {fsdp} = {data * fsdp}, "
                         f"but there are {n_devices} devices")
    return data, fsdp


def make_mesh(mesh_config=None, devices=None) -> Mesh:
    """A Mesh with axes ("data", "fsdp") over all devices of all hosts.

    Args:
      mesh_config: the `config.mesh` section (None = default: all devices on "data").
      devices: optional explicit device list (tests); default `jax.devices()`.
    """
    cfg = mesh_config if mesh_config is not None else default_config()
    if devices is None:
        initialize_distributed(cfg.get("distributed", "auto"))
        devices = jax.devices()
    data, fsdp = mesh_shape(len(devices), int(cfg.data), int(cfg.fsdp))
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh((data, fsdp), devices=devices)
    except Exception:  # CPU / odd topologies: plain order is fine
        grid = np.asarray(devices).reshape(data, fsdp)
    return Mesh(grid, AXES)


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) placed as one global array with `sharding`.

    Each device receives only its own slice (`device_put` of a numpy array slices on the host;
    on several hosts every process builds its addressable shards from `x`), so a parameter is
    never whole on any one device unless its sharding replicates it.
    """
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(np.shape(x), sharding, lambda idx: x[idx])


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh, other axes whole."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def constrain_batch(x: jax.Array) -> jax.Array:
    """`x` with its leading (batch) axis split over the batch axes of the mesh in context.

    The models call it on the outputs of their convolutions and linear layers, so under
    `jax.set_mesh(mesh)` (the trainer's step, the sampler) XLA's partitioner keeps activations
    split by batch and gathers the FSDP-sharded weights instead: without it, it split output
    channels over the "fsdp" axis and gathered activations (tensor parallelism: on a tiny
    UNet, mesh (2, 4), 396 all-gathers, every one of activations). A no-op with no mesh in
    context, a mesh without our axes, inside `shard_map` over them, or a batch that does not
    split evenly.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names) or x.ndim == 0:
        return x
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if any(types[a] == jax.sharding.AxisType.Manual for a in BATCH_AXES):
        return x
    n = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if n == 1 or x.shape[0] % n:
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES, *([None] * (x.ndim - 1))))


def batch_multiple(mesh: Mesh) -> int:
    """Batch sizes must be a multiple of this to shard evenly."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def pad_batch(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    """Pad the leading axis with copies of row 0 up to a multiple; returns (padded, n_real)."""
    n = x.shape[0]
    extra = (-n) % multiple
    if extra == 0:
        return x, n
    if n == 0:
        raise ValueError("cannot pad an empty batch")
    pad = np.repeat(x[:1], extra, axis=0)
    return np.concatenate([x, pad], axis=0), n


def shard_batch(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """Place a host batch (global, same on every host) on the mesh split along axis 0.

    The leading dimension must be a multiple of `batch_multiple(mesh)` (use `pad_batch`).
    """
    return put_global(x, batch_sharding(mesh, np.ndim(x)))


def to_host(x) -> np.ndarray:
    """The whole value of an array as numpy on this host, also when it spans several hosts.

    A batch-sharded result of a multi-host jit is not addressable as a whole on any one host;
    it is all-gathered (a collective: every host must call this for the same array).
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
