"""Orbax checkpoints of the train state: an asynchronous save does not change the steps after
it, a restore continues exactly, non-finite parameters are never written."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fifa_jax.errors import InputError
from fifa_jax.training import checkpoints
from tests.training import _tiny


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _same(a, b):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_save_then_restore_continues_exactly(tmp_path):
    flat = _tiny.pairs(8, seed=5)
    batches = [_tiny.as_steps({k: np.roll(v, i, 0) for k, v in flat.items()}, 2)
               for i in range(3)]
    saved_run, plain_run = _tiny.trainer(), _tiny.trainer()
    mgr = checkpoints.manager(tmp_path / "ckpt", max_to_keep=2)
    saved_run.step(batches[0])
    checkpoints.save(mgr, saved_run.state, {"compat": "x", "loader": {"step": 2}})
    for b in batches[1:]:                  # the donated steps run while Orbax writes
        saved_run.step(b)
    plain_run.step(batches[0])
    at_save = jax.tree.map(np.array, jax.device_get(plain_run.state))
    for b in batches[1:]:
        plain_run.step(b)
    _same(saved_run.state.params, plain_run.state.params)
    _same(saved_run.state.opt_state, plain_run.state.opt_state)
    mgr.wait_until_finished()

    state, meta = checkpoints.restore(mgr, 1, saved_run.abstract_state,
                                      saved_run.state_shardings)
    assert meta["loader"] == {"step": 2} and meta["step"] == 1 and meta["compat"] == "x"
    _same(state, at_save)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(at_save.opt_state)
    resumed = _tiny.trainer()
    resumed.restore(state)
    for b in batches[1:]:
        resumed.step(b)
    _same(resumed.state.params, plain_run.state.params)

    params, step = checkpoints.restore_params(tmp_path / "ckpt", None,
                                              saved_run.abstract_state.params)
    assert step == 1
    _same(params, at_save.params)
    with pytest.raises(InputError, match=r"no checkpoint of step 7 .*saved steps: \[1\]"):
        checkpoints.restore_params(tmp_path / "ckpt", 7, saved_run.abstract_state.params)
    with pytest.raises(InputError, match="no checkpoint in"):
        checkpoints.restore_params(tmp_path / "none", None, saved_run.abstract_state.params)


def test_non_finite_parameters_are_never_saved(tmp_path):
    tr = _tiny.trainer()
    bad = tr.state.replace(params=jax.tree.map(lambda x: x * jnp.nan, tr.state.params))
    mgr = checkpoints.manager(tmp_path, max_to_keep=1)
    with pytest.raises(FloatingPointError, match="refusing to save step 0"):
        checkpoints.save(mgr, bad, {})
    mgr.wait_until_finished()
    assert mgr.all_steps() == []


def test_fsdp_sharded_state_is_saved_shard_by_shard_and_restored_in_place(tmp_path,
                                                                         monkeypatch):
    """Parameters split over 8 devices (mesh data 1 x fsdp 8): `save` never makes a host copy
    of a sharded array (Orbax writes each device's shard; the finiteness check is reduced on
    the devices; step and key come from this process's copy), and `restore` places every
    array by the given shardings with the saved values."""
    from jax._src.array import ArrayImpl

    tr = _tiny.trainer(mesh_shape=(1, 8))
    leaves = jax.tree.leaves(tr.state.params)
    assert sum(not x.sharding.is_fully_replicated for x in leaves) > len(leaves) // 4
    want = jax.tree.map(np.array, jax.device_get(tr.state))

    whole = ArrayImpl.__array__
    copied = []

    def no_whole_copy(self, *args, **kwargs):   # np.asarray / jax.device_get of an array
        if len(self.sharding.device_set) > 1 and not self.is_fully_replicated:
            copied.append(self.shape)
            raise AssertionError(f"a sharded array {self.shape} was copied to the host whole")
        return whole(self, *args, **kwargs)

    monkeypatch.setattr(ArrayImpl, "__array__", no_whole_copy)
    mgr = checkpoints.manager(tmp_path, max_to_keep=1)
    checkpoints.save(mgr, tr.state, {"compat": "x", "loader": {"position": 3}})
    mgr.wait_until_finished()
    with pytest.raises(AssertionError, match="copied to the host whole"):   # the guard works
        jax.device_get(tr.state.params)
    monkeypatch.undo()
    assert len(copied) == 1

    state, meta = checkpoints.restore(mgr, 0, tr.abstract_state, tr.state_shardings)
    assert meta["loader"] == {"position": 3} and meta["step"] == 0
    assert meta["key"] == want.key.tolist()
    _same(state, want)
    for got, shard in zip(jax.tree.leaves(state), jax.tree.leaves(tr.state_shardings),
                          strict=True):
        assert got.sharding == shard, (got.shape, got.sharding, shard)
    with pytest.raises(ValueError, match="expected a replicated array"):
        checkpoints.replicated_value(next(x for x in jax.tree.leaves(state.params)
                                          if not x.sharding.is_fully_replicated))
