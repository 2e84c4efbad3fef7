"""Mesh construction and batch sharding on 8 forced CPU devices."""
import jax
import ml_collections
import numpy as np
import pytest

from fifa_jax import parallel


def _cfg(data, fsdp):
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "distributed": "off"})


def test_default_mesh_uses_every_device():
    mesh = parallel.make_mesh(_cfg(-1, 1))
    assert mesh.axis_names == ("data", "fsdp")
    assert mesh.devices.size == jax.device_count() == 8


@pytest.mark.parametrize("data,fsdp,shape", [(-1, 2, (4, 2)), (2, -1, (2, 4)), (8, 1, (8, 1))])
def test_mesh_shapes(data, fsdp, shape):
    assert dict(parallel.make_mesh(_cfg(data, fsdp)).shape) == {"data": shape[0],
                                                                  "fsdp": shape[1]}


@pytest.mark.parametrize("data,fsdp,match", [(3, -1, "mesh.data=3"), (-1, 3, "mesh.fsdp=3"),
                                             (2, 2, "2 \\* 2"), (-1, -1, "both")])
def test_bad_mesh_names_the_key(data, fsdp, match):
    from fifa_jax.errors import InputError      # the CLI prints it as one line
    with pytest.raises(InputError, match=match):
        parallel.make_mesh(_cfg(data, fsdp))


def test_shard_batch_round_trip_and_padding():
    mesh = parallel.make_mesh(_cfg(-1, 2))
    x = np.arange(13 * 3, dtype=np.float32).reshape(13, 3)
    padded, n = parallel.pad_batch(x, parallel.batch_multiple(mesh))
    assert padded.shape == (16, 3) and n == 13
    arr = parallel.shard_batch(padded, mesh)
    assert len(arr.addressable_shards) == 8
    assert all(s.data.shape == (2, 3) for s in arr.addressable_shards)
    np.testing.assert_array_equal(np.asarray(arr)[:n], x)
    total = jax.jit(lambda a: a.sum(0))(arr)
    np.testing.assert_allclose(np.asarray(total), padded.sum(0))
