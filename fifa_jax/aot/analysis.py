"""Compile one lowered program for the compile-only devices and read what XLA says about it.

    result = check(program, hbm_bytes)   # a dict: compiled, fits, per-chip bytes, FLOPs, ...

Per chip (XLA's memory analysis of the compiled SPMD program, i.e. one device's share):
arguments, temporaries, outputs, aliased (outputs that reuse a donated argument's buffer) and
generated code; total = arguments + outputs - aliased + temporaries + code, compared with the
HBM the compiler allows. Cost: XLA's cost analysis, `flops` and `bytes accessed` for one
chip and `optimal_seconds`, XLA's own estimate of the run time (a compiler estimate, not a
measurement); XLA counts a loop body once, so where `loop_factor` (the trip count over the
matmuls and convolutions, e.g. the sampler's steps) is above 1 they are one pass's.
Collectives: the all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute
ops of the compiled HLO, counted as executed (an op inside a loop counts its trip count
times), with the bytes of their results.
A program the compiler finds too big fails with RESOURCE_EXHAUSTED; the result then carries
the temporaries the compiler asked for and `fits` False. A lowered program that still holds
a CPU-only custom call (a model layer that took its CPU form) is reported as not compiled,
naming the call.
"""
from __future__ import annotations

import collections
import math
import re
import time

import numpy as np

from fifa_jax.aot.topology import GIB, quiet_libtpu

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
               "collective-permute")
# custom-call targets that exist only in XLA's CPU backend
_CPU_TARGET = re.compile(r"^(fifa_|lapack_|ducc_|xla_python_cpu|cpu_|xla_ffi_python_cpu)|_cpu$|"
                         r"cpu_kernel")
_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                  r"\(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}


def custom_call_targets(lowered_text: str) -> list[str]:
    """The custom-call target names in a lowered (StableHLO) or compiled (HLO) module."""
    names = re.findall(r"stablehlo\.custom_call\s+@([\w.$-]+)", lowered_text)
    names += re.findall(r'call_target_name\s*=\s*"([^"]+)"', lowered_text)
    names += re.findall(r'custom_call_target="([^"]+)"', lowered_text)
    return sorted(set(names))


def cpu_only_targets(targets) -> list[str]:
    return [t for t in targets if _CPU_TARGET.search(t)]


def _shape_bytes(text: str) -> int:
    """Bytes of every array shape written in `text` (e.g. a tuple result type)."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", text):
        if dtype in _DTYPE_BYTES:
            n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            total += int(n * _DTYPE_BYTES[dtype])
    return total


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?.*\{\s*$", line)
        if m and not line.startswith(" "):
            name = ("ENTRY:" if line.startswith("ENTRY") else "") + m.group(1)
            comps[name] = []
        elif name is not None and line.strip() == "}":
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps


def _bound(cond_lines) -> int:
    """Trip count of a while loop whose condition is `counter < constant` (how jax's
    fori_loop and scan compile; the counter starts at 0): the constant, else 1. Compiled TPU
    HLO carries no known_trip_count, so it is read from the condition."""
    consts = dict(re.findall(r"%([\w.\-]+) = s32\[\]\S* constant\((\d+)\)", "\n".join(cond_lines)))
    for line in cond_lines:
        m = re.search(r"ROOT .*compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", line)
        if m and m.group(1) in consts:
            return max(1, int(consts[m.group(1)]))
    return 1


def _multipliers(comps: dict[str, list[str]]) -> dict[str, float]:
    """How many times each computation runs per execution of the entry computation."""
    bare = {k.split(":", 1)[-1]: k for k in comps}
    callers = collections.defaultdict(list)          # callee -> [(caller, factor)]
    for comp, lines in comps.items():
        for line in lines:
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            cond = re.search(r"\bcondition=%?([\w.\-]+)", line)
            n = (int(trip.group(1)) if trip else
                 _bound(comps.get(bare.get(cond.group(1), ""), ())) if cond else 1)
            for key, ref in re.findall(r"\b(body|condition|to_apply|calls|true_computation|"
                                       r"false_computation)=%?([\w.\-]+)", line):
                if ref in bare:
                    callers[bare[ref]].append((comp, n if key in ("body", "condition") else 1))
            for group in re.findall(r"(?:branch_computations|calls)=\{([^}]*)\}", line):
                for ref in re.findall(r"%?([\w.\-]+)", group):
                    if ref in bare:
                        callers[bare[ref]].append((comp, 1))
    memo: dict[str, float] = {}

    def mult(c, depth=0):
        if c in memo:
            return memo[c]
        if c.startswith("ENTRY:") or depth > 200:
            return 1.0
        memo[c] = 0.0                                # guards cycles (none in valid HLO)
        memo[c] = sum(mult(p, depth + 1) * f for p, f in callers.get(c, ())) or 0.0
        return memo[c]
    return {c: mult(c) for c in comps}


class _Module:
    """A compiled HLO module's text split into computations, with how many times each runs
    per execution (parsed once, read by `collectives` and `loop_factor`)."""

    def __init__(self, hlo: str):
        self.comps = _computations(hlo)
        self.mult = _multipliers(self.comps)


def collectives(hlo) -> dict[str, dict[str, float]]:
    """{op: {"count": executions, "bytes": result bytes}} of a compiled HLO module (its text,
    or a parsed `_Module`), per chip; async pairs (`-start` / `-done`) count once."""
    module = hlo if isinstance(hlo, _Module) else _Module(hlo)
    comps, mult = module.comps, module.mult
    out = {op: {"count": 0, "bytes": 0.0} for op in COLLECTIVES}
    pattern = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    for comp, lines in comps.items():
        for line in lines:
            m = pattern.search(line)
            if not m:
                continue
            times = mult.get(comp, 1.0)
            shape = m.group(1)
            size = _shape_bytes(shape)
            if m.group(3):           # async start: (operands, results, ...): the results
                parts = [_shape_bytes(p) for p in re.split(r",\s*(?=[a-z]+\d*\[)", shape)]
                size = max(parts) if parts else size
            out[m.group(2)]["count"] += times
            out[m.group(2)]["bytes"] += times * size
    return {k: {"count": int(round(v["count"])), "bytes": float(v["bytes"])}
            for k, v in out.items()}


def loop_factor(hlo) -> int:
    """The most times a computation holding a dot or convolution runs per execution of the
    compiled program (known loop trip counts; 1 for a loop-free program). XLA's cost analysis
    counts a loop body once, so a program's `flops` and time estimate are those of one pass
    through its loops (e.g. one sampler step) where this is above 1. `hlo`: the text or a
    parsed `_Module`."""
    module = hlo if isinstance(hlo, _Module) else _Module(hlo)
    comps, mult = module.comps, module.mult
    heavy = re.compile(r"\s(dot|convolution)\(")
    return int(round(max([mult.get(c, 1.0) for c, lines in comps.items()
                          if any(heavy.search(line) for line in lines)] or [1.0])))


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def argument_bytes(args) -> int:
    """One chip's bytes of abstract arguments (ShapeDtypeStructs with shardings)."""
    import jax
    total = 0
    for leaf in jax.tree.leaves(args):
        shape = leaf.shape
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None and shape:
            shape = sharding.shard_shape(shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def check(program, hbm: int) -> dict:
    """Lower and compile `program` (programs.Program); the result dict (module docstring)."""
    res = {"program": program.name, "stage": program.stage, "settings": dict(program.settings),
           "compiled": False, "fits": False, "hbm_bytes": int(hbm), "bytes_per_chip": None,
           "argument_bytes": None, "temp_bytes": None, "output_bytes": None,
           "alias_bytes": None, "code_bytes": None, "flops": None, "bytes_accessed": None,
           "estimated_seconds": None, "collectives": None, "error": None,
           "advice": program.advice}
    t0 = time.time()
    try:
        with quiet_libtpu():
            lowered = program.lower()
    except Exception as e:  # noqa: BLE001 (reported per program)
        res["error"] = f"lowering failed: {type(e).__name__}: {_first_line(e)}"
        return res
    res["lower_seconds"] = round(time.time() - t0, 2)
    targets = custom_call_targets(lowered.as_text())
    cpu = cpu_only_targets(targets)
    res["custom_calls"] = targets
    if cpu:
        res["error"] = (f"the lowered program holds CPU-only custom call(s) {cpu}: a model "
                        f"layer took its CPU form although the devices are TPUs")
        return res
    t1 = time.time()
    try:
        with quiet_libtpu():
            compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001
        text = str(e)
        m = _OOM.search(text)
        res["compile_seconds"] = round(time.time() - t1, 2)
        if m:
            temp = float(m.group(1)) * _UNITS[m.group(2)]
            avail = float(m.group(3)) * _UNITS[m.group(4)]
            args = argument_bytes(program.args)
            res.update(temp_bytes=int(temp), argument_bytes=args,
                       bytes_per_chip=int(temp + args), compiler_available_bytes=int(avail),
                       error="RESOURCE_EXHAUSTED: " + m.group(0))
        else:
            res["error"] = f"compile failed: {_first_line(e)}"
        return res
    res["compile_seconds"] = round(time.time() - t1, 2)
    mem = compiled.memory_analysis()
    a, t = int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes)
    o, al = int(mem.output_size_in_bytes), int(mem.alias_size_in_bytes)
    code = int(mem.generated_code_size_in_bytes)
    total = a + o - al + t + code
    cost = _cost(compiled)
    hlo = compiled.as_text()
    module = _Module(hlo)
    res.update(compiled=True, fits=total <= hbm, bytes_per_chip=total, argument_bytes=a,
               temp_bytes=t, output_bytes=o, alias_bytes=al, code_bytes=code,
               flops=_num(cost.get("flops")), bytes_accessed=_num(cost.get("bytes accessed")),
               estimated_seconds=_seconds(cost.get("optimal_seconds")),
               xla_optimal_seconds=_num(cost.get("optimal_seconds")),
               collectives=collectives(module), loop_factor=loop_factor(module),
               custom_calls=custom_call_targets(hlo))
    return res


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def _seconds(x):
    """XLA's estimate, or None where it gives none (it reports negative values for some
    programs, e.g. the k-NN's loops)."""
    x = _num(x)
    return x if x is not None and x > 0 else None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:400]
    return type(e).__name__


def gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"
