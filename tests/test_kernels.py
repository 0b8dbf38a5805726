"""Hot-path kernels against their NumPy references, both dtypes, edge shapes."""

from __future__ import annotations

import numpy as np
import pytest

from harmony_step._core import kernels
from harmony_step._core.objective import log_penalty as plain_log_penalty
from harmony_step._core.sums import counts, cross_sums, level_sums

SHAPES = [  # (rows in block, clusters, levels per key, keys)
    pytest.param(1, 1, (1,), id="one-row-one-cluster"),
    pytest.param(1, 100, (3,), id="one-row"),
    pytest.param(257, 7, (4,), id="odd-shapes"),
    pytest.param(1000, 100, (8,), id="typical"),
    pytest.param(300, 130, (3, 2), id="two-keys-more-clusters-than-threads"),
    pytest.param(40, 600, (2,), id="more-clusters-than-the-warp-path-holds"),
    pytest.param(500, 100, (400,), id="many-levels"),
    pytest.param(2000, 256, (3,), id="most-clusters-kept-in-registers"),
]


def block_inputs(n, k, levels, dtype, seed=0):
    """A block of n cells among n + 50, the next block's 30 cells, and O without the block's mass."""
    rng = np.random.default_rng(seed)
    n_total = n + 50
    similarity = rng.uniform(-1, 1, (n, k)).astype(dtype)
    similarity[0] = 0  # an all-zero row (all-zero cell)
    offsets = np.concatenate([[0], np.cumsum(levels)[:-1]])
    codes = np.stack(
        [rng.integers(0, L, n_total) + o for L, o in zip(levels, offsets, strict=True)], 1
    ).astype(np.int32)
    penalty = rng.normal(size=(sum(levels), k))
    cells = rng.permutation(n_total)[: n + 30].astype(np.int64)  # block, then the next block
    assignments = rng.dirichlet(np.ones(k), n_total).astype(dtype)
    block = cells[:n]
    observed = level_sums(np, codes, assignments, sum(levels)) - level_sums(
        np, codes[block], assignments[block], sum(levels)
    )
    return similarity, penalty, codes, cells, assignments, observed


def run(xp, inputs, n):
    sim, pen, codes, cells, r, observed = (xp.array(a, copy=True) for a in inputs)
    entropy = xp.full(r.shape[0], np.nan)
    kernels.block_update(xp, sim, pen, codes, cells, n, r, entropy, observed, 20.0)
    return r, entropy, observed


def expected_observed(inputs, assignments_after, n):
    """O after the update: level sums of the new R, less the next block's (removed) mass."""
    _, _, codes, cells, _, observed = inputs
    levels = observed.shape[0]
    removed = level_sums(np, codes[cells[n:]], assignments_after[cells[n:]], levels)
    return level_sums(np, codes, assignments_after, levels) - removed


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "k", "levels"), SHAPES)
def test_reference_block_update(n, k, levels, dtype):
    inputs = block_inputs(n, k, levels, dtype)
    cells, before = inputs[3], inputs[4].copy()
    r, entropy, observed = run(np, inputs, n)
    untouched = np.setdiff1d(np.arange(r.shape[0]), cells[:n])
    np.testing.assert_allclose(
        r[cells[:n]].sum(1), 1.0, rtol=1e-5 if dtype == np.float32 else 1e-12
    )
    np.testing.assert_array_equal(r[untouched], before[untouched])
    assert np.all(entropy[cells[:n]] <= k * 1.01e-12)  # r log(r + eps) <= eps per entry (r = 1)
    assert np.isnan(entropy[untouched]).all()
    np.testing.assert_array_equal(observed, expected_observed(inputs, r, n))


@pytest.mark.parametrize("flavor", ["harmony1", "harmony2"])
def test_reference_penalty_matches_the_objective_module(flavor):
    rng = np.random.default_rng(0)
    observed = kernels.fixed_point(rng.uniform(0, 50, (5, 9)))
    share = np.array([0.2, 0.3, 0.5, 0.6, 0.4])  # two keys: 3 + 2 levels
    theta = rng.uniform(0, 3, 5)
    table = kernels.log_penalty_table(np, observed, share, theta, 3, flavor)
    o = counts(np, observed)
    expected = share[:, None] * o[:3].sum(0)[None, :]
    np.testing.assert_allclose(table, plain_log_penalty(np, o, expected, theta, flavor), rtol=1e-13)


def test_fixed_point_removal_undoes_addition_exactly():
    rng = np.random.default_rng(3)
    r = rng.dirichlet(np.ones(20), 1000).astype(np.float32)
    codes = rng.integers(0, 5, (1000, 1)).astype(np.int32)
    observed = level_sums(np, codes, r, 5)
    kernels.block_update(np, None, None, codes, np.arange(1000), 0, r, None, observed, 0.0)
    assert not observed.any()


def test_cross_sums_match_float64_products():
    rng = np.random.default_rng(4)
    left = rng.uniform(size=(40_000, 30)).astype(np.float32)  # two full chunks and a remainder
    right = rng.normal(size=(40_000, 7)).astype(np.float32)
    exact = left.astype(np.float64).T @ right.astype(np.float64)
    np.testing.assert_allclose(cross_sums(np, left, right), exact, rtol=1e-5, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "k", "levels"), SHAPES)
def test_gpu_block_update_matches_reference(n, k, levels, dtype):
    import cupy

    inputs = block_inputs(n, k, levels, dtype)
    r_gpu, ent_gpu, obs_gpu = run(cupy, inputs, n)
    r_ref, ent_ref, obs_ref = run(np, inputs, n)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(r_gpu.get(), r_ref, rtol=tol, atol=tol)
    # float32 runs take the softmax and entropy terms in float math, the reference in float64
    # (float math resolves each r log(r + eps) term to ~1e-7 absolute, hence the wider atol)
    rtol, atol = (1e-5, 1e-6) if dtype == np.float32 else (1e-6, 1e-9)
    np.testing.assert_allclose(ent_gpu.get(), ent_ref, rtol=rtol, atol=atol)
    # O is exact for the R the GPU stored, and within rounding of the reference's.
    np.testing.assert_array_equal(obs_gpu.get(), expected_observed(inputs, r_gpu.get(), n))
    np.testing.assert_allclose(counts(np, obs_gpu.get()), counts(np, obs_ref), rtol=1e-5, atol=1e-5)
    r_again, ent_again, obs_again = run(cupy, inputs, n)
    assert cupy.array_equal(r_again, r_gpu)
    assert cupy.array_equal(ent_again, ent_gpu, equal_nan=True)
    assert cupy.array_equal(obs_again, obs_gpu)


@pytest.mark.gpu
def test_gpu_block_update_empty_block():
    import cupy

    inputs = block_inputs(4, 5, (2,), np.float64)
    observed = cupy.asarray(inputs[5])
    kernels.block_update(
        cupy, cupy.asarray(inputs[0][:0]), cupy.asarray(inputs[1]), cupy.asarray(inputs[2]),
        cupy.asarray(inputs[3][:0]), 0, cupy.asarray(inputs[4]), cupy.zeros(54), observed, 1.0,
    )  # fmt: skip
    np.testing.assert_array_equal(observed.get(), inputs[5])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "levels"), [(1, (1,)), (100_000, (8,)), (777, (3, 4, 2))])
def test_gpu_level_sums_equal_reference_exactly(n, levels, dtype):
    import cupy

    rng = np.random.default_rng(2)
    offsets = np.concatenate([[0], np.cumsum(levels)[:-1]])
    codes = np.stack(
        [rng.integers(0, L, n) + o for L, o in zip(levels, offsets, strict=True)], 1
    ).astype(np.int32)
    r = rng.dirichlet(np.ones(30), n).astype(dtype)
    gpu = level_sums(cupy, cupy.asarray(codes), cupy.asarray(r), sum(levels))
    np.testing.assert_array_equal(gpu.get(), level_sums(np, codes, r, sum(levels)))


@pytest.mark.gpu
@pytest.mark.parametrize("flavor", ["harmony1", "harmony2"])
@pytest.mark.parametrize(
    ("levels", "clusters", "first"), [((1,), 1, 1), ((8,), 100, 8), ((3, 2), 200, 3)]
)
def test_gpu_penalty_matches_reference(flavor, levels, clusters, first):
    import cupy

    rng = np.random.default_rng(1)
    b = sum(levels)
    observed = kernels.fixed_point(rng.uniform(0, 100, (b, clusters)))
    observed[0, 0] = 0  # an empty level-cluster pair
    share = rng.uniform(0, 1, b)
    theta = rng.uniform(0, 3, b)
    gpu = kernels.log_penalty_table(
        cupy, cupy.asarray(observed), cupy.asarray(share), cupy.asarray(theta), first, flavor
    )
    ref = kernels.log_penalty_table(np, observed, share, theta, first, flavor)
    np.testing.assert_allclose(gpu.get(), ref, rtol=1e-14, atol=1e-14)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_cross_sums_match_reference(dtype):
    import cupy

    rng = np.random.default_rng(5)
    left = rng.uniform(size=(50_000, 100)).astype(dtype)
    right = rng.normal(size=(50_000, 50)).astype(dtype)
    gpu = cross_sums(cupy, cupy.asarray(left), cupy.asarray(right)).get()
    tol = 1e-5 if dtype == np.float32 else 1e-12
    reference = cross_sums(np, left, right)
    np.testing.assert_allclose(gpu, reference, rtol=tol, atol=tol * np.abs(reference).max())
    assert np.array_equal(gpu, cross_sums(cupy, cupy.asarray(left), cupy.asarray(right)).get())


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "levels"), [(1, (1,)), (1000, (8,)), (77, (3, 4, 2))])
def test_gpu_one_hot_matches_reference(n, levels):
    import cupy

    rng = np.random.default_rng(2)
    offsets = np.concatenate([[0], np.cumsum(levels)[:-1]])
    codes = np.stack(
        [rng.integers(0, L, n) + o for L, o in zip(levels, offsets, strict=True)], 1
    ).astype(np.int32)
    gpu = kernels.one_hot(cupy, cupy.asarray(codes), sum(levels))
    ref = kernels.one_hot(np, codes, sum(levels))
    np.testing.assert_array_equal(gpu.get(), ref)
    assert np.all(ref.sum(1) == len(levels))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "k", "levels"), [(1, 1, (1,)), (5000, 100, (8,)), (777, 30, (3, 2))])
def test_gpu_correct_rows_matches_reference(n, k, levels, dtype):
    import cupy

    rng = np.random.default_rng(6)
    offsets = np.concatenate([[0], np.cumsum(levels)[:-1]])
    codes = np.stack(
        [rng.integers(0, L, n) + o for L, o in zip(levels, offsets, strict=True)], 1
    ).astype(np.int32)
    x = rng.normal(size=(n, 20)).astype(dtype)
    r = rng.dirichlet(np.ones(k), n).astype(dtype)
    weights = rng.normal(size=(sum(levels), k, 20)).astype(dtype)
    cells = [np.flatnonzero((codes == b).any(axis=1)) for b in range(sum(levels))]
    ref = np.empty_like(x)
    kernels.correct_rows(np, x, r, weights, codes, cells, ref)
    gpu = cupy.empty_like(cupy.asarray(x))
    kernels.correct_rows(
        cupy, cupy.asarray(x), cupy.asarray(r), cupy.asarray(weights), cupy.asarray(codes),
        None, gpu,
    )  # fmt: skip
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(gpu.get(), ref, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_gpu_cell_order_and_level_grouping_match_reference():
    import cupy

    from harmony_step._core.permutation import cell_order, group_blocks_by_level, pcg_keys

    rng = np.random.default_rng(7)
    codes = np.stack([rng.integers(0, 9, 10_007), rng.integers(9, 12, 10_007)], 1).astype(np.int32)
    assert np.array_equal(pcg_keys(cupy, 10_007, 123).get(), pcg_keys(np, 10_007, 123))
    order = cell_order(np, 10_007, 123)
    grouped = group_blocks_by_level(np, order, codes, 9, 500)
    gpu = group_blocks_by_level(cupy, cupy.asarray(order), cupy.asarray(codes), 9, 500)
    assert np.array_equal(gpu.get(), grouped)
    assert np.array_equal(np.sort(grouped[:500]), np.sort(order[:500]))  # same cells per block
    assert np.all(np.diff(codes[grouped[:500], 0]) >= 0)


@pytest.mark.gpu
@pytest.mark.parametrize("flavor", ["harmony1", "harmony2"])
@pytest.mark.parametrize(
    ("levels", "clusters", "first"), [((1,), 1, 1), ((64,), 100, 64), ((3, 2), 300, 3)]
)
def test_gpu_objective_parts_match_the_formulas(flavor, levels, clusters, first):
    import cupy

    from harmony_step._core.objective import diversity_term, expected_counts, kmeans_term

    rng = np.random.default_rng(8)
    b = sum(levels)
    observed = kernels.fixed_point(rng.uniform(0, 100, (b, clusters)))
    share, theta = rng.uniform(0, 1, b), rng.uniform(0, 3, b)
    centroids = rng.normal(size=(clusters, 20))
    sums = rng.normal(size=(clusters, 20))
    entropy = np.array([-123.5])
    gpu = kernels.objective_parts(
        cupy, cupy.asarray(observed), cupy.asarray(share), cupy.asarray(theta),
        cupy.asarray(centroids), cupy.asarray(sums), cupy.asarray(entropy), first, flavor, 0.1,
    )  # fmt: skip
    o = counts(np, observed)
    expected = expected_counts(np, o, share, first)
    ref = [
        kmeans_term(np, centroids, sums, o[:first].sum()),
        0.1 * entropy[0],
        diversity_term(np, o, expected, theta, 0.1, flavor),
    ]
    np.testing.assert_allclose(gpu.get(), ref, rtol=1e-12, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_unit_centroids_match_numpy(dtype):
    import cupy

    rng = np.random.default_rng(9)
    sums = rng.normal(size=(130, 50))
    sums[3] = 0.0  # a cluster without mass stays zero
    unit, transposed = kernels.unit_centroids(cupy, cupy.asarray(sums), dtype)
    ref_unit, ref_t = kernels.unit_centroids(np, sums, dtype)
    np.testing.assert_allclose(unit.get(), ref_unit, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(transposed.get(), ref_t, rtol=1e-6 if dtype == np.float32 else 1e-14)
    assert transposed.flags.c_contiguous
    assert not np.any(unit.get()[3])


def test_unit_centroids_on_numpy():
    sums = np.array([[3.0, 4.0], [0.0, 0.0]])
    unit, transposed = kernels.unit_centroids(np, sums, np.float32)
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, 0.0]])
    assert transposed.dtype == np.float32
    assert transposed.shape == (2, 2)
    assert transposed.flags.c_contiguous


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("n", "d", "picked"), [(1, 1, 1), (1000, 50, 777), (70, 3, 0), (5000, 33, 5000)]
)
def test_gpu_gather_rows_matches_take(dtype, n, d, picked):
    import cupy

    rng = np.random.default_rng(10)
    src = rng.normal(size=(n, d)).astype(dtype)
    rows = rng.integers(0, n, picked).astype(np.int64)
    out = cupy.full((picked, d), np.nan, dtype=dtype)
    kernels.gather_rows(cupy, cupy.asarray(src), cupy.asarray(rows), out)
    np.testing.assert_array_equal(out.get(), src[rows])
