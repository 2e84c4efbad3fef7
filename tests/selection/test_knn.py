"""Exact k-NN against a slow float64 numpy reference; sharded == single device."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from fifa_jax.selection import knn


def knn_reference(x, k):
    """float64 brute force: self excluded by index, ties by index."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    d2[np.arange(n), np.arange(n)] = np.inf
    order = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), d2), axis=1)[:, :k]
    return np.sqrt(np.take_along_axis(d2, order, 1)), order, np.sqrt(d2)


def assert_same_up_to_ties(dist, idx, x, k):
    ref_d, ref_i, full = knn_reference(x, k)
    dist, idx = np.asarray(dist), np.asarray(idx)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-5, atol=1e-5)
    n = x.shape[0]
    assert (idx != np.arange(n)[:, None]).all(), "a point is its own neighbour"
    # each returned index really is at the returned distance, no index twice
    np.testing.assert_allclose(full[np.arange(n)[:, None], idx], dist, rtol=1e-5, atol=1e-5)
    assert all(len(set(r)) == k for r in idx.tolist())
    # indices equal the reference wherever the distance is not tied with another candidate
    kth = ref_d[:, -1:]
    strict = ref_d < kth - 1e-4
    np.testing.assert_array_equal(np.where(strict, idx, -1), np.where(strict, ref_i, -1))


def data_with_duplicates(n, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[5] = x[7]                    # a duplicate pair
    x[40:52] = x[3]                # a block of 13 identical points (more than k + margin)
    x[60] = x[61] + 1e-3           # a near duplicate
    return x


@pytest.mark.parametrize("d,exact", [(3, True), (40, True), (40, False)])
def test_knn_matches_reference(d, exact):
    x = data_with_duplicates(301, d, d)     # 301 is not a multiple of any tile or device count
    dist, idx = knn(x, 4, tile=64, exact_f32=exact)
    assert dist.shape == (301, 4) and idx.shape == (301, 4)
    assert_same_up_to_ties(dist, idx, x, 4)
    # duplicates are neighbours at distance 0
    assert float(dist[5, 0]) == 0.0 and int(idx[5, 0]) == 7
    assert np.all(np.asarray(dist[40:52]) == 0.0)


def test_knn_identical_distances_all_equal():
    """All points on a lattice line: many exact ties."""
    x = np.repeat(np.arange(20, dtype=np.float32), 3)[:, None] * np.ones((1, 16), np.float32)
    dist, idx = knn(x, 5, tile=16)
    assert_same_up_to_ties(dist, idx, x, 5)


@pytest.mark.parametrize("shape,exact", [((8,), True), ((4, 2), True), ((8,), False)])
def test_sharded_equals_single_device(shape, exact):
    x = data_with_duplicates(517, 24, 1)
    d1, i1 = knn(x, 5, tile=32, exact_f32=exact)
    mesh = Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape),
                ("data", "fsdp")[:len(shape)])
    d8, i8 = knn(x, 5, tile=32, mesh=mesh, exact_f32=exact)
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d8))
    np.testing.assert_array_equal(np.asarray(i1), np.asarray(i8))
    assert_same_up_to_ties(d8, i8, x, 5)


def test_fast_mode_high_dim_unit_vectors():
    """bf16 candidates + float32 re-rank on normalised embeddings, d = 768."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 768)).astype(np.float32)
    x[100:110] = x[:10] + 0.05 * rng.normal(size=(10, 768)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dist, idx = knn(x, 10, tile=128, exact_f32=False)
    assert_same_up_to_ties(dist, idx, x, 10)


def test_bad_input():
    with pytest.raises(ValueError, match="1 <= k < N"):
        knn(np.zeros((3, 2)), 3)
    with pytest.raises(ValueError, match="shape"):
        knn(np.zeros(5), 1)


@pytest.mark.parametrize("exact", [True, False])
def test_far_from_origin(exact):
    """A common offset must not change the neighbours (the matmul form cancels: 2ab-|a|^2-|b|^2
    at |a|^2 ~ 6e7 loses every digit of a distance ~ 10)."""
    x = data_with_duplicates(300, 64, 4) + np.float32(1000.0)
    dist, idx = knn(x, 5, tile=128, exact_f32=exact)
    assert_same_up_to_ties(dist, idx, x, 5)


def test_knn_tile_smaller_than_k_is_raised_not_an_error():
    """The tile is a speed knob: one too small for k + 1 + margin candidates is enlarged."""
    x = data_with_duplicates(150, 12, 3)
    dist, idx = knn(x, 10, tile=2)
    assert_same_up_to_ties(dist, idx, x, 10)


def test_non_finite_or_overflowing_input_is_refused():
    x = data_with_duplicates(80, 4, 1)
    x[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in rows \[7\]"):
        knn(x, 3)
    with pytest.raises(ValueError, match="overflow"):
        knn(data_with_duplicates(80, 4, 1) * 1e20, 3)


def near_duplicate_cluster(n=300, d=768, seed=1):
    """Unit vectors with 12 points within 3e-5..4e-4 of point 0 (punctuation variants of one
    prompt): their distances are below the float32 matmul's rounding of |x|^2 + |y|^2 - 2xy."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for j in range(1, 13):
        x[j] = x[0] + rng.normal(size=d) * (j * 3e-5 / np.sqrt(d))
    x[20] = x[0]                                   # and an exact duplicate
    return x.astype(np.float32)


def test_exact_mode_resolves_near_duplicate_clusters():
    x = near_duplicate_cluster()
    ref_d, _, _ = knn_reference(x, 5)
    dist, idx = knn(x, 5, exact_f32=True)
    np.testing.assert_allclose(np.asarray(dist), ref_d, rtol=1e-5, atol=1e-7)
    assert_same_up_to_ties(dist, idx, x, 5)
    assert int(np.asarray(idx)[0, 0]) == 20 and float(np.asarray(dist)[0, 0]) == 0.0


def test_exact_mode_fallback_sharded_equals_single_device():
    x = near_duplicate_cluster(n=211, seed=2)
    mesh = Mesh(np.array(jax.devices()), ("d",))
    d1, i1 = knn(x, 4, tile=64, exact_f32=True)
    d8, i8 = knn(x, 4, tile=64, exact_f32=True, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d8))
    np.testing.assert_array_equal(np.asarray(i1), np.asarray(i8))


def test_exact_rows_f64_equals_reference_with_ties():
    from fifa_jax.selection.knn import exact_rows_f64
    x = data_with_duplicates(120, 16, 4)
    rows = np.array([0, 5, 7, 40, 45, 119])
    d, i = exact_rows_f64(x, rows, 4)
    ref_d, ref_i, _ = knn_reference(x, 4)
    np.testing.assert_allclose(d, ref_d[rows], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(i, ref_i[rows])        # ties by index, exactly


def test_memory_is_linear_in_n_not_n_squared_over_tile():
    """The candidate lists are merged as tiles are scored: per device O(N * kc) plus one tile,
    never the (N, N / tile, kc) slots of every tile (17 GB at N = 2^20). Compiled, not run."""
    import jax.numpy as jnp
    from fifa_jax.selection.knn import _build, _pair_table
    n, d, k, kc, tile = 65536, 16, 4, 7, 256
    fn = _build(n, d, k, kc, tile, True, False, 16, None)
    table = _pair_table(n // tile, 1)
    mem = fn.lower(jax.ShapeDtypeStruct((n, d), jnp.float32),
                   jax.ShapeDtypeStruct((d,), jnp.float32),
                   jax.ShapeDtypeStruct(table.shape, jnp.int32),
                   jax.ShapeDtypeStruct((), jnp.int32)).compile().memory_analysis()
    slots = n * (n // tile) * kc * 8                  # what one slot per tile would take
    lists = n * kc * 8
    operands = 2 * n * 32 * 4                         # [x, |x|^2, 1] and [2x, -1, -|x|^2]
    bound = operands + 4 * lists + 16 * tile * tile * 4
    assert mem.temp_size_in_bytes < bound < slots / 8, (mem.temp_size_in_bytes, bound)


@pytest.mark.parametrize("d,exact,group", [(2, True, 16), (2, False, 16), (16, True, 8),
                                           (16, True, 1)])
def test_exact_ties_go_to_the_smaller_index(d, exact, group):
    """Points 2 and 17 tie at distance 1 from point 24 as its 2nd neighbour: the smaller index
    wins (the hierarchical top-k once kept 17: it gathered groups by maximum). No candidate
    margin, so the tie sits at the candidate-list boundary; d = 2 is the direct path (exact
    in both modes); bf16 candidates without a margin are not exact, so d = 16 runs float32."""
    n = 32
    x = np.zeros((n, d), np.float32)
    x[:, :2] = [(10 * (i % 6) - 25, 10 * (i // 6) + 20) for i in range(n)]
    x[24, :2], x[16, :2], x[2, :2], x[17, :2] = (0, 0), (0.5, 0), (0, 1), (0, -1)
    ref_d, ref_i, _ = knn_reference(x, 2)
    assert ref_i[24].tolist() == [16, 2]
    for mesh in (None, Mesh(np.array(jax.devices()), ("d",))):
        dist, idx = knn(x, 2, margin=0, exact_f32=exact, group=group, mesh=mesh)
        np.testing.assert_array_equal(np.asarray(idx), ref_i)
        np.testing.assert_allclose(np.asarray(dist), ref_d, rtol=1e-6)


@pytest.mark.parametrize("exact", [True, False])
def test_points_a_few_ulps_apart_far_from_the_mean_stay_apart(exact):
    """Centring rounds: 100 + j ulp(100) minus a mean of about -40 lands on a grid twice as
    coarse and merges neighbours. Distances come from the points as given, so they stay exact."""
    u = np.spacing(np.float32(100.0))
    x = np.zeros((6, 2), np.float32)
    x[:5, 0] = np.float32(100.0) + np.arange(5, dtype=np.float32) * u
    x[5] = [-740.0, 7.0]
    ref_d, ref_i, _ = knn_reference(x, 2)
    dist, idx = knn(x, 2, exact_f32=exact)
    np.testing.assert_array_equal(np.asarray(dist), ref_d.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(idx)[:5], ref_i[:5])


def test_exact_rows_f64_far_from_the_origin():
    """The host fallback centres in float64 for its filter and measures from the points as
    given: clusters 1e4 from the origin with neighbours a few ulps apart come out exact."""
    from fifa_jax.selection.knn import exact_rows_f64
    rng = np.random.default_rng(5)
    x = (1e4 + rng.normal(size=(200, 24))).astype(np.float32)
    u = np.spacing(np.float32(1e4))
    x[10:14] = x[9] + (np.arange(1, 5, dtype=np.float32) * u)[:, None]
    rows = np.arange(8, 16)
    d, i = exact_rows_f64(x, rows, 3)
    ref_d, ref_i, _ = knn_reference(x, 3)
    np.testing.assert_array_equal(d, ref_d[rows].astype(np.float32))
    np.testing.assert_array_equal(i, ref_i[rows])
