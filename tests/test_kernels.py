"""CuPy kernels against their NumPy references, both dtypes, edge shapes."""

from __future__ import annotations

import numpy as np
import pytest

from harmony_step import _kernels
from harmony_step._core.objective import log_penalty as plain_log_penalty

SHAPES = [  # (rows in block, clusters, levels per key, keys)
    pytest.param(1, 1, (1,), id="one-row-one-cluster"),
    pytest.param(1, 100, (3,), id="one-row"),
    pytest.param(257, 7, (4,), id="odd-shapes"),
    pytest.param(1000, 100, (8,), id="typical"),
    pytest.param(300, 130, (3, 2), id="two-keys-more-clusters-than-threads"),
    pytest.param(40, 600, (2,), id="more-clusters-than-the-warp-path-holds"),
]


def block_inputs(n, k, levels, dtype, seed=0):
    rng = np.random.default_rng(seed)
    similarity = rng.uniform(-1, 1, (n, k)).astype(dtype)
    similarity[0] = 0  # an all-zero row (all-zero cell)
    offsets = np.concatenate([[0], np.cumsum(levels)[:-1]])
    codes = np.stack(
        [rng.integers(0, L, n) + o for L, o in zip(levels, offsets, strict=True)], 1
    ).astype(np.int32)
    penalty = rng.normal(size=(sum(levels), k))
    n_total = n + 50
    cells = rng.permutation(n_total)[:n].astype(np.int64)
    assignments = rng.uniform(size=(n_total, k)).astype(dtype)
    return similarity, penalty, codes, cells, assignments


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "k", "levels"), SHAPES)
def test_reference_softmax_rows_sum_to_one(n, k, levels, dtype):
    sim, pen, codes, cells, r = block_inputs(n, k, levels, dtype)
    untouched = np.setdiff1d(np.arange(r.shape[0]), cells)
    before = r[untouched].copy()
    new64, entropy = _kernels.penalized_softmax(np, sim, pen, codes, cells, r, 20.0)
    np.testing.assert_allclose(r[cells].sum(1), 1.0, rtol=1e-5 if dtype == np.float32 else 1e-12)
    np.testing.assert_array_equal(new64, r[cells].astype(np.float64))
    np.testing.assert_array_equal(r[untouched], before)
    assert np.all(entropy <= k * 1.01e-12)  # r log(r + eps) is at most eps per entry (r = 1)


@pytest.mark.parametrize("flavor", ["harmony1", "harmony2"])
def test_reference_penalty_matches_the_objective_module(flavor):
    rng = np.random.default_rng(0)
    observed = rng.uniform(0, 50, (5, 9))
    share = np.array([0.2, 0.3, 0.5, 0.6, 0.4])  # two keys: 3 + 2 levels
    theta = rng.uniform(0, 3, 5)
    table = _kernels.log_penalty_table(np, observed, share, theta, 3, flavor)
    expected = share[:, None] * observed[:3].sum(0)[None, :]
    np.testing.assert_allclose(
        table, plain_log_penalty(np, observed, expected, theta, flavor), rtol=1e-13
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "k", "levels"), SHAPES)
def test_gpu_softmax_matches_reference(n, k, levels, dtype):
    import cupy

    sim, pen, codes, cells, r = block_inputs(n, k, levels, dtype)
    r_gpu = cupy.asarray(r)
    new_gpu, ent_gpu = _kernels.penalized_softmax(
        cupy,
        cupy.asarray(sim),
        cupy.asarray(pen),
        cupy.asarray(codes),
        cupy.asarray(cells),
        r_gpu,
        20.0,
    )
    new_ref, ent_ref = _kernels.penalized_softmax(np, sim, pen, codes, cells, r, 20.0)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(new_gpu.get(), new_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(ent_gpu.get(), ent_ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(r_gpu.get(), r, rtol=tol, atol=tol)
    again = cupy.asarray(r)
    new_again, ent_again = _kernels.penalized_softmax(
        cupy,
        cupy.asarray(sim),
        cupy.asarray(pen),
        cupy.asarray(codes),
        cupy.asarray(cells),
        again,
        20.0,
    )
    assert cupy.array_equal(new_again, new_gpu)
    assert cupy.array_equal(ent_again, ent_gpu)


@pytest.mark.gpu
def test_gpu_softmax_empty_block():
    import cupy

    sim, pen, codes, cells, r = block_inputs(4, 5, (2,), np.float64)
    new, ent = _kernels.penalized_softmax(
        cupy,
        cupy.asarray(sim[:0]),
        cupy.asarray(pen),
        cupy.asarray(codes[:0]),
        cupy.asarray(cells[:0]),
        cupy.asarray(r),
        1.0,
    )
    assert new.shape == (0, 5)
    assert ent.shape == (0,)


@pytest.mark.gpu
@pytest.mark.parametrize("flavor", ["harmony1", "harmony2"])
@pytest.mark.parametrize(
    ("levels", "clusters", "first"), [((1,), 1, 1), ((8,), 100, 8), ((3, 2), 200, 3)]
)
def test_gpu_penalty_matches_reference(flavor, levels, clusters, first):
    import cupy

    rng = np.random.default_rng(1)
    b = sum(levels)
    observed = rng.uniform(0, 100, (b, clusters))
    observed[0, 0] = 0.0  # an empty level-cluster pair
    share = rng.uniform(0, 1, b)
    theta = rng.uniform(0, 3, b)
    gpu = _kernels.log_penalty_table(
        cupy, cupy.asarray(observed), cupy.asarray(share), cupy.asarray(theta), first, flavor
    )
    ref = _kernels.log_penalty_table(np, observed, share, theta, first, flavor)
    np.testing.assert_allclose(gpu.get(), ref, rtol=1e-14, atol=1e-14)


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "levels"), [(1, (1,)), (1000, (8,)), (77, (3, 4, 2))])
def test_gpu_one_hot_matches_reference(n, levels):
    import cupy

    rng = np.random.default_rng(2)
    offsets = np.concatenate([[0], np.cumsum(levels)[:-1]])
    codes = np.stack(
        [rng.integers(0, L, n) + o for L, o in zip(levels, offsets, strict=True)], 1
    ).astype(np.int32)
    gpu = _kernels.one_hot(cupy, cupy.asarray(codes), sum(levels))
    ref = _kernels.one_hot(np, codes, sum(levels))
    np.testing.assert_array_equal(gpu.get(), ref)
    assert np.all(ref.sum(1) == len(levels))
