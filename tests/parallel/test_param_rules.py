"""Sharding rules as config data: `mesh.param_tactic` and `mesh.rules` -> NamedSharding per param."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from fifa_jax import config_check, pipeline
from fifa_jax.parallel import default_config, param_shardings_from_config, rules_from_config
from fifa_jax.parallel.param_sharding import (DEFAULT_RULES, REPLICATE_ALL, ShardingRulesError,
                                              check_rules, describe)

STATE = {"conv_in": {"kernel": jax.ShapeDtypeStruct((3, 3, 4, 16), jnp.float32),
                     "bias": jax.ShapeDtypeStruct((16,), jnp.float32)},
         "proj": {"kernel": jax.ShapeDtypeStruct((32, 32), jnp.float32)},
         "norm": {"weight": jax.ShapeDtypeStruct((32,), jnp.float32)}}


def _mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))


def _specs(cfg):
    return describe(param_shardings_from_config(STATE, _mesh(), cfg))


def test_default_section_carries_the_rules():
    cfg = default_config()
    assert cfg.param_tactic == "fsdp" and tuple(cfg.rules) == DEFAULT_RULES
    assert rules_from_config(cfg) == DEFAULT_RULES
    assert _specs(cfg) == {"conv_in.bias": str(P()),
                           "conv_in.kernel": str(P(None, None, None, "fsdp")),
                           "norm.weight": str(P()),               # 1-d: always whole
                           "proj.kernel": str(P(None, "fsdp"))}   # square: the later dim


def test_replicate_tactic_and_custom_rules():
    cfg = default_config()
    cfg.param_tactic = "replicate"
    assert rules_from_config(cfg) == REPLICATE_ALL
    assert set(_specs(cfg).values()) == {str(P())}
    cfg = default_config()
    cfg.rules = ((r"^conv_in\.", "replicate"), (r"kernel$", "fsdp"))
    specs = _specs(cfg)
    assert specs["conv_in.kernel"] == str(P()) and specs["proj.kernel"] == str(P(None, "fsdp"))
    # a frozen copy (lists become tuples) and a plain dict give the same
    frozen = ml_collections.FrozenConfigDict(cfg)
    assert _specs(frozen) == specs == _specs(dict(cfg))
    as_lists = ml_collections.ConfigDict({"rules": [[r"^conv_in\.", "replicate"],
                                                    [r"kernel$", "fsdp"]]})
    assert _specs(as_lists) == specs
    assert rules_from_config({}) == DEFAULT_RULES


def test_zero_tactic_replicates_parameters_and_splits_the_optimiser_state():
    from fifa_jax.parallel import state_rules_from_config
    cfg = default_config()
    cfg.param_tactic = "zero"
    cfg.rules = ((r"^conv_in\.", "replicate"), (r"kernel$", "fsdp"))
    assert rules_from_config(cfg) == REPLICATE_ALL
    assert state_rules_from_config(cfg) == tuple(cfg.rules)
    for tactic, want in (("fsdp", tuple(cfg.rules)), ("replicate", REPLICATE_ALL)):
        cfg.param_tactic = tactic
        assert state_rules_from_config(cfg) == rules_from_config(cfg) == want


def test_fsdp_axis_of_one_replicates():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    shardings = param_shardings_from_config(STATE, mesh, default_config())
    assert set(describe(shardings).values()) == {str(P())}


@pytest.mark.parametrize("rules,message", [
    ((("kernel",),), r"mesh\.rules\[0\] must be a \(regex, tactic\) pair"),
    ((("(", "fsdp"),), r"mesh\.rules\[0\]: bad regex"),
    (((".*", "fsdp"), ("bias", "zero3")), r"mesh\.rules\[1\] \('bias'\): tactic must be one of"),
    ("bias=replicate", r"mesh\.rules must be a sequence"),
])
def test_bad_rules_name_the_key(rules, message):
    cfg = ml_collections.ConfigDict({"param_tactic": "fsdp", "rules": rules})
    with pytest.raises(ShardingRulesError, match=message):
        rules_from_config(cfg)
    with pytest.raises(ValueError, match="tactic"):
        check_rules(((".*", "shard"),))


def test_bad_tactic_is_refused_before_any_stage():
    cfg = ml_collections.ConfigDict({"seed": 0, "stages": "score", "mesh": default_config()})
    pipeline.validate(cfg)
    cfg.mesh.param_tactic = "zero3"
    with pytest.raises(config_check.ConfigError, match="'mesh.param_tactic' must be one of"):
        pipeline.validate(cfg)
    with pytest.raises(ShardingRulesError, match="mesh.param_tactic"):
        rules_from_config(cfg.mesh)
