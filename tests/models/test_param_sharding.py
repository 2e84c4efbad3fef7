"""Parameter sharding rules, and a sharded UNet forward on 8 CPU devices equal to one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fifa_jax.models.unet import UNet2DConditionModel
from fifa_jax.parallel.param_sharding import (describe, fsdp_spec, param_shardings,
                                              partition_spec, shard_state)

# One level keeps the two compiles cheap; channel widths divisible by the fsdp axis (4).
TINY = dict(block_out_channels=[16], layers_per_block=1, cross_attention_dim=12,
            down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"],
            attention_head_dim=2, norm_num_groups=4, sample_size=4)


def _mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))


def test_fsdp_spec_picks_largest_divisible_dim():
    assert fsdp_spec((3, 3, 320, 640), 4) == P(None, None, None, "fsdp")
    assert fsdp_spec((768, 320), 4) == P("fsdp", None)
    assert fsdp_spec((3, 3, 4, 6), 4) == P(None, None, "fsdp", None)
    assert fsdp_spec((3, 5), 4) == P()
    assert fsdp_spec((64, 64), 1) == P()
    assert fsdp_spec((64, 64), 4, min_size=10_000) == P()


def test_rules_and_tactics():
    kw = dict(fsdp_size=4, min_size=0)
    assert partition_spec("a.conv1.kernel", (3, 3, 8, 16), tactic="fsdp", **kw) == \
        P(None, None, None, "fsdp")
    assert partition_spec("a.conv1.bias", (16,), tactic="fsdp", **kw) == P()
    assert partition_spec("a.norm1.scale", (16,), tactic="fsdp", **kw) == P()
    assert partition_spec("a.conv1.kernel", (3, 3, 8, 16), tactic="replicate", **kw) == P()
    rules = ((r"conv_in", "replicate"), (r".*", "fsdp"))
    assert partition_spec("conv_in.kernel", (3, 3, 4, 8), tactic="fsdp", rules=rules,
                          **kw) == P()
    with pytest.raises(ValueError, match="tactic"):
        partition_spec("x", (4,), tactic="zero3", **kw)


def test_sharded_forward_equals_single_device():
    mesh = _mesh()
    model = UNet2DConditionModel(TINY, rngs=nnx.Rngs(0), attention_impl="xla")
    graphdef, state = nnx.split(model)
    shardings = param_shardings(state, mesh, tactic="fsdp", min_size=0)
    specs = describe(shardings)
    assert specs["down_blocks.0.resnets.0.conv1.kernel"] == str(P(None, None, None, "fsdp"))
    assert specs["conv_norm_out.scale"] == str(P())
    assert sum(s != str(P()) for s in specs.values()) > len(specs) // 3
    assert describe(param_shardings(state, mesh, tactic="replicate")).keys() == specs.keys()
    assert set(describe(param_shardings(state, mesh, tactic="replicate")).values()) == {"P()"}

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4, 4, 4)).astype(np.float32)
    t = rng.uniform(0, 1000, (8,)).astype(np.float32)
    ctx = rng.standard_normal((8, 5, 12)).astype(np.float32)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    sharded_state = shard_state(state, mesh, tactic="fsdp", min_size=0)
    leaf = sharded_state["down_blocks"][0]["resnets"][0]["conv1"]["kernel"][...]
    assert leaf.addressable_shards[0].data.shape == (3, 3, 16, 16 // 4)
    fwd = jax.jit(lambda st, x, t, c: nnx.merge(graphdef, st)(x, t, c))
    with jax.default_matmul_precision("highest"):
        out = fwd(sharded_state, *(jax.device_put(a, batch) for a in (x, t, ctx)))
        ref = fwd(jax.device_put(state, jax.devices()[0]), x, t, ctx)  # one device
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-5)


def test_shardings_for_abstract_state_match_concrete():
    mesh = _mesh()
    abstract = nnx.state(nnx.eval_shape(lambda: UNet2DConditionModel(TINY, rngs=nnx.Rngs(0))))
    concrete = nnx.state(UNet2DConditionModel(TINY, rngs=nnx.Rngs(0)))
    a, c = param_shardings(abstract, mesh), param_shardings(concrete, mesh)
    assert jax.tree.structure(a) == jax.tree.structure(abstract)
    assert describe(a) == describe(c)
    assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(a))


def test_mesh_without_fsdp_axis_raises():
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    with pytest.raises(ValueError, match="fsdp"):
        param_shardings({"w": jnp.zeros((4, 4))}, mesh)
