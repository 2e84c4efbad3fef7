"""Compile-only TPU devices of any slice, their HBM, and libtpu's start-up noise kept quiet.

    devices = tpu_devices("v5e:4x4")            # 16 compile-only devices; no TPU needed
    mesh = mesh_over(devices, config.mesh)      # ("data", "fsdp") as parallel.make_mesh
    hbm_bytes(devices[0])                       # what the compiler allows a program a chip

Topology names are jax's `get_topology_desc` names: `v5e:2x2`, `v5e:4x4`, `v5p:2x2x1`,
`v6e:2x2`, `v4:2x2x1`, ... (chips per axis). `slice_name("v5e-16")` turns the rental names
(`v5e-16`, `v5p-8`, `v6e-8`, `v4-8`) into them. libtpu prints warnings about
TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES on a host without a TPU; they are harmless for
compiling and `quiet_libtpu()` drops them from what the user sees (other lines pass through).
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

GIB = 2 ** 30
# HBM a device may use, as the compiler states it in its out-of-memory errors ("exceeds
# available HBM (Y G)"), seen on this jax/libtpu (0.10.2 / 0.0.42.1). v4 is compiled as a
# v4 VM runs it: megacore, one device a chip of two TensorCores (4 devices for v4:2x2x1;
# without `chip_config_name="megacore"` the topology has a device a TensorCore, 15.25 G).
HBM_GIB = {"TPU v5 lite": 15.75, "TPU v6 lite": 31.25, "TPU v5": 95.74, "TPU v4": 30.75}
# datasheet peaks a device, a chip (bf16 FLOP/s, HBM bytes/s), for a roofline time from
# XLA's FLOPs and bytes where XLA gives no estimate of its own
PEAKS = {"TPU v5 lite": (197e12, 819e9), "TPU v6 lite": (918e12, 1640e9),
         "TPU v5": (459e12, 2765e9), "TPU v4": (275e12, 1228e9)}
# get_topology_desc options a family needs to look as it does on a TPU VM
_TOPOLOGY_OPTIONS = {"v4": {"chip_config_name": "megacore"}}
# rental name prefix -> (jax topology prefix, chips of the slice name's count): v4 and v5p
# slice names count TensorCores (2 a chip), v5e and v6e count chips.
_FAMILIES = {"v5e": ("v5e", 1), "v5litepod": ("v5e", 1), "v6e": ("v6e", 1),
             "v5p": ("v5p", 2), "v4": ("v4", 2)}
# 2-D slices (v5e, v6e) and 3-D slices (v4, v5p) by chip count, as Cloud TPU lays them out
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8"}
_HARMLESS = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "unexpected worker hostname",
             "Failed to find host bounds", "Source Location Trace", "libtpu_init_utils",
             "Logging before InitGoogle", "could not determine TPU")


class TopologyError(ValueError):
    """The topology name is not one jax knows (one line naming it)."""


def slice_name(name: str) -> str:
    """`v5e-16` -> `v5e:4x4`, `v5p-8` -> `v5p:2x2x1`, `v4-8` -> `v4:2x2x1`; a jax topology
    name (with a colon) is returned as it is."""
    if ":" in name:
        return name
    m = re.fullmatch(r"(v5e|v5litepod|v6e|v5p|v4)-(\d+)", name.strip())
    if not m:
        raise TopologyError(f"--topology {name!r}: give a jax topology name such as v5e:4x4 "
                            f"or v5p:2x2x1, or a slice name such as v5e-16, v5p-8, v6e-8")
    family, per_chip = _FAMILIES[m.group(1)]
    chips = int(m.group(2)) // per_chip
    shapes = _SHAPES_3D if family in ("v4", "v5p") else _SHAPES_2D
    if chips not in shapes:
        raise TopologyError(f"--topology {name!r}: no {family} slice of {chips} chips known; "
                            f"chip counts: {sorted(shapes)}")
    return f"{family}:{shapes[chips]}"


@contextlib.contextmanager
def quiet_libtpu():
    """Hold back what is written to file descriptor 2 (libtpu's C++ logging included) inside
    the block; afterwards write it out without libtpu's harmless start-up warnings."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):       # no real stderr (an embedded interpreter): no filter
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines()
                    if line.strip() and not any(h in line for h in _HARMLESS)
                    and not re.fullmatch(r"=+ ?|learning/\S+\.cc:\d+", line.strip())]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")


NO_MSA_FLAG = "--xla_msa_enable=false"


def msa_enabled() -> bool:
    """False when libtpu runs without memory-space assignment (`--no_msa`)."""
    return NO_MSA_FLAG not in os.environ.get("LIBTPU_INIT_ARGS", "").split()


def disable_msa() -> None:
    """Compile without libtpu's memory-space assignment (the pass that places buffers in the
    chip's on-core VMEM; where SD-size programs spend most of their compile time and host
    memory). Nothing then lives in VMEM; the HBM figures are close to the real program's but
    not a bound on them (SD1.5's v5e-8 train micro-step: 11.48 GiB a chip without, 12.03 with
    it) and XLA's time estimate is that of an unplaced program. libtpu reads its flags
    once, when it loads: call before the first compile-only device is made."""
    args = os.environ.get("LIBTPU_INIT_ARGS", "").split()
    if NO_MSA_FLAG not in args:
        os.environ["LIBTPU_INIT_ARGS"] = " ".join(args + [NO_MSA_FLAG])


def tpu_devices(topology: str, num_slices: int = 1):
    """The compile-only devices of `topology` (a jax name or a slice name), `num_slices`
    slices of it (multi-slice, over DCN)."""
    # several processes may hold libtpu at once when compiling only (no TPU is opened); set
    # before libtpu loads, and only here: a training process keeps libtpu's own guard
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    from jax.experimental import topologies
    name = slice_name(topology)
    kwargs = {"num_slices": int(num_slices)} if int(num_slices) > 1 else {}
    kwargs.update(_TOPOLOGY_OPTIONS.get(name.split(":")[0], {}))
    try:
        with quiet_libtpu():
            topo = topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs)
    except Exception as e:  # noqa: BLE001 (libtpu's errors are plain runtime errors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopologyError(f"--topology {topology!r} ({name}"
                            f"{f', {num_slices} slices' if num_slices > 1 else ''}): "
                            f"{first}") from None
    devices = list(topo.devices)
    if not devices or devices[0].platform != "tpu":
        raise TopologyError(f"--topology {topology!r}: jax gave no TPU devices")
    del jax
    return devices


def hbm_bytes(device, override_gib: float | None = None) -> int:
    """Bytes of HBM a program may use on `device` (override_gib: that many GiB instead)."""
    if override_gib:
        return int(float(override_gib) * GIB)
    kind = device.device_kind
    if kind not in HBM_GIB:
        raise TopologyError(f"no HBM size known for {kind!r}; pass --hbm_gib")
    return int(HBM_GIB[kind] * GIB)


def mesh_over(devices, mesh_config):
    """parallel.make_mesh's ("data", "fsdp") mesh over the compile-only `devices`."""
    from fifa_jax.parallel import mesh as mesh_lib
    return mesh_lib.make_mesh(mesh_config, devices=devices)
