"""FSDP compiles as FSDP: the train step (8 CPU devices, accelerator forms, 2 micro-batches)
gathers weights, never activations; the gathers stay inside the accumulation loop (not
hoisted before it, which would hold the whole unsharded policy and reference); the per-device
temporary memory falls as mesh.fsdp rises (XLA's compiled memory analysis)."""
import re

import jax
import numpy as np
import pytest

from fifa_jax.models import platform
from fifa_jax.training.trainer import to_global
from tests.training import _tiny

# two levels, 32/64 channels: weights big enough to shard (min_size 64); 8x8 latents, 16 pairs
# a micro-batch (2 a device). (At 4x4 latents and 1 pair a device XLA computes the weight
# gradients of the 2x2 level from gathered activations, which are smaller there than the
# gradient it would otherwise reduce-scatter: a cost choice, not tensor parallelism.)
SMALL = dict(_tiny.TINY, block_out_channels=[32, 64],
             down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=4,
             sample_size=8)
A, B, SIZE = 2, 16, 8
_AG = re.compile(r"= \w+\[([\d,]*)\][^\n]*? all-gather(?:-start)?\(")


def _compiled(mesh_shape):
    with platform.forms("accelerator"):
        tr = _tiny.trainer(mesh_shape, unet_cfg=SMALL)
        batch = to_global(_tiny.as_steps(_tiny.pairs(A * B, size=SIZE), A), tr.mesh)
        return tr, tr.lower_step(batch).compile()


@pytest.fixture(scope="module")
def steps():
    return {shape: _compiled(shape) for shape in [(8, 1), (2, 4), (1, 8)]}


def _gathers(text):
    """[(computation, result shape)] of every all-gather in the compiled HLO."""
    comp, out = None, []
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            comp = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
        m = _AG.search(line)
        if m:
            out.append((comp, tuple(int(d) for d in m.group(1).split(",") if d)))
    return out


def test_fsdp_gathers_weights_inside_the_loop_and_never_activations(steps):
    tr, compiled = steps[(2, 4)]
    weight_shapes = {tuple(x.shape) for x in jax.tree.leaves(tr.state.params)}
    gathers = _gathers(compiled.as_text())
    weights = [g for g in gathers if g[1] in weight_shapes]
    others = [g for g in gathers if g[1] not in weight_shapes and np.prod(g[1]) > 64]
    assert len(weights) > 20, len(weights)
    assert not others, others[:5]                 # no activation or input is gathered
    # every weight gather is in the loop body, none hoisted into the entry computation
    assert not [g for g in weights if g[0] == "ENTRY"]


def test_data_parallel_gathers_no_weight(steps):
    tr, compiled = steps[(8, 1)]
    weight_shapes = {tuple(x.shape) for x in jax.tree.leaves(tr.state.params)}
    assert not [g for g in _gathers(compiled.as_text()) if g[1] in weight_shapes]


def test_temporaries_and_arguments_fall_as_fsdp_rises(steps):
    mem = {s: steps[s][1].memory_analysis() for s in steps}
    temps = [mem[s].temp_size_in_bytes for s in [(8, 1), (2, 4), (1, 8)]]
    args = [mem[s].argument_size_in_bytes for s in [(8, 1), (2, 4), (1, 8)]]
    assert temps[0] > temps[1] > temps[2], temps
    assert args[0] > 3 * args[1] and args[1] > 1.5 * args[2], args
