"""The numba CPU kernels against their NumPy references, both dtypes, edge shapes; thread counts.

The references are the array code the GPU runs, executed on NumPy through ``XP``: a stand-in for
the NumPy module that is not ``numpy`` itself, so the dispatch to the numba kernels is bypassed.
"""

from __future__ import annotations

import os
import types

import numba
import numpy as np
import pytest
from test_kernels import SHAPES, block_inputs, expected_observed

from harmony_step._core import correction, cpu_kernels, init, kernels, permutation, setup, sums
from harmony_step._core.objective import entropy_sum
from harmony_step._core.raw import RawRows
from harmony_step._core.sums import counts, level_sums
from harmony_step._threads import available_cpus, cpu_threads


def _batched_matmul(a, b, out=None):
    """As CuPy's matmul: the operands of a batched product are first made contiguous (copies)."""
    if max(a.ndim, b.ndim) > 2:
        a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return np.matmul(a, b, out=out)


XP = types.SimpleNamespace(**{name: getattr(np, name) for name in dir(np) if name[:2] != "__"})
"""NumPy under another name: the generic (GPU) code path, run on the host. Its argsort is stable
and its batched matmul copies its operands, as CuPy's do."""
XP.argsort = lambda a, axis=-1: np.argsort(a, axis=axis, kind="stable")
XP.matmul = _batched_matmul


def test_reference_namespace_is_not_numpy():
    assert XP is not np
    assert XP.zeros(2).sum() == 0


def tolerance(dtype):
    return 5e-7 if dtype == np.float32 else 1e-14


# --- clustering step -------------------------------------------------------------------------------


def run_both(inputs, n, other_sign=-1):
    out = []
    for update in (cpu_kernels.block_update, kernels._block_update_reference):
        sim, pen, codes, cells, r, observed = (np.array(a, copy=True) for a in inputs)
        entropy = np.full(r.shape[0], np.nan)
        update(sim, pen, codes, cells, n, r, entropy, observed, 20.0, other_sign)
        out.append((r, entropy, observed))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "k", "levels"), SHAPES)
def test_block_update_matches_reference(n, k, levels, dtype):
    inputs = block_inputs(n, k, levels, dtype)
    (r, entropy, observed), (r_ref, entropy_ref, observed_ref) = run_both(inputs, n)
    tol = tolerance(dtype)
    np.testing.assert_allclose(r, r_ref, rtol=tol, atol=tol)
    # As on the GPU: the kernel takes sum R log R from the softmax's own terms (no eps) and, for
    # float32, in float math; the reference takes sum R log(R + eps) in float64.
    rtol, atol = (1e-5, 1e-6) if dtype == np.float32 else (1e-6, 1e-9)
    np.testing.assert_allclose(entropy, entropy_ref, rtol=rtol, atol=atol)
    # O is exact for the R the kernel stored, and within rounding of the reference's.
    np.testing.assert_array_equal(observed, expected_observed(inputs, r, n))
    np.testing.assert_allclose(counts(np, observed), counts(np, observed_ref), rtol=tol, atol=tol)
    untouched = np.setdiff1d(np.arange(r.shape[0]), inputs[3][:n])
    np.testing.assert_array_equal(r[untouched], inputs[4][untouched])
    assert np.isnan(entropy[untouched]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_update_of_the_same_r_gives_exactly_the_reference_o(dtype):
    """Mass added or removed for a given R (the other rows) is bit-for-bit the reference's."""
    inputs = block_inputs(300, 130, (3, 2), dtype)
    for sign in (-1, 1):
        (_, _, observed), (_, _, observed_ref) = run_both(inputs, 0, other_sign=sign)
        np.testing.assert_array_equal(observed, observed_ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "levels"), [(1, (1,)), (20_000, (8,)), (777, (3, 4, 2))])
def test_level_sums_equal_reference_exactly(n, levels, dtype):
    rng = np.random.default_rng(2)
    offsets = np.concatenate([[0], np.cumsum(levels)[:-1]])
    codes = np.stack(
        [rng.integers(0, L, n) + o for L, o in zip(levels, offsets, strict=True)], 1
    ).astype(np.int32)
    r = rng.dirichlet(np.ones(30), n).astype(dtype)
    expected = np.zeros((sum(levels), 30), dtype=np.int64)
    kernels._block_update_reference(None, None, codes, None, 0, r, None, expected, 0.0, 1)
    np.testing.assert_array_equal(level_sums(np, codes, r, sum(levels)), expected)


@pytest.mark.parametrize("flavor", ["harmony1", "harmony2"])
@pytest.mark.parametrize(
    ("levels", "clusters", "first"),
    # the last two are filled in parallel (at least cpu_kernels.PARALLEL_PENALTY_ENTRIES entries)
    [((1,), 1, 1), ((8,), 100, 8), ((3, 2), 300, 3), ((41,), 100, 41), ((60, 4), 100, 60)],
)
def test_penalty_matches_reference(flavor, levels, clusters, first):
    rng = np.random.default_rng(1)
    b = sum(levels)
    observed = kernels.fixed_point(rng.uniform(0, 100, (b, clusters)))
    observed[0, 0] = 0
    share, theta = rng.uniform(0, 1, b), rng.uniform(0, 3, b)
    table = kernels.log_penalty_table(np, observed, share, theta, first, flavor)
    reference = kernels._log_penalty_reference(observed, share, theta, first, flavor)
    np.testing.assert_allclose(table, reference, rtol=1e-14, atol=1e-14)


@numba.njit(fastmath=cpu_kernels.FUSED)  # as in the kernels
def apply_exp(values):
    """``exp_of`` on every value: ``exp`` for float64, ``exp32`` for float32."""
    out = np.empty_like(values)
    for i in range(values.size):
        out[i] = cpu_kernels.exp_of(values[i])
    return out


@numba.njit
def apply_log(values):
    out = np.empty_like(values)
    for i in range(values.size):
        out[i] = cpu_kernels.log(values[i])
    return out


def test_exp_and_log_within_two_ulp_of_numpy():
    rng = np.random.default_rng(0)
    x = np.concatenate([-rng.exponential(20, 100_000), [0.0, -1e-300, -700.0, -740.0, -746.0]])
    y = np.concatenate([rng.uniform(0, 1, 100_000) + 1e-12, [1e-12, 1.0, 0.5, 2.0, 1e300]])
    exp_out, log_out = apply_exp(x), apply_log(y)
    normal = np.exp(x) > 1e-300
    np.testing.assert_allclose(exp_out[normal], np.exp(x[normal]), rtol=4.5e-16, atol=0)
    np.testing.assert_allclose(exp_out[~normal], np.exp(x[~normal]), rtol=0, atol=1e-300)
    np.testing.assert_allclose(log_out, np.log(y), rtol=4.5e-16, atol=2.3e-16)


def test_float32_exp_within_two_ulp():
    """float32 arguments take ``exp32`` in float math: within 2 ulp of float32, down to the
    subnormals, and 0 below them."""
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [-rng.exponential(10, 100_000), np.linspace(-104, 88, 10_001), [0.0, -1e-30, -200.0]]
    ).astype(np.float32)
    got = apply_exp(x)
    assert got.dtype == np.float32
    exact = np.exp(x.astype(np.float64))
    normal = exact >= np.finfo(np.float32).tiny
    np.testing.assert_allclose(got[normal], exact[normal], rtol=2 * 2.0**-24, atol=0)
    np.testing.assert_allclose(got[~normal], exact[~normal], rtol=0, atol=2 * 2.0**-149)
    assert not apply_exp(np.array([-104.0, -200.0, -np.inf], dtype=np.float32)).any()
    assert not apply_exp(np.array([-746.0, -1e4, -np.inf])).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (5000, 100)])
def test_softmax_and_entropy_match_reference(shape, dtype):
    rng = np.random.default_rng(3)
    similarity = rng.uniform(-1, 1, shape).astype(dtype)
    got = init.softmax_rows(np, similarity.copy(), 20.0)
    expected = init.softmax_rows(XP, similarity.copy(), 20.0)
    tol = 2e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)
    np.testing.assert_allclose(entropy_sum(np, got), entropy_sum(XP, got), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_soft_assignments_in_place_match_reference(dtype, monkeypatch):
    """R is written chunk by chunk into its own rows (several chunks here), on the CPU and by the
    generic code the GPU runs."""
    monkeypatch.setattr(init, "chunk_rows", lambda n_cells: 700)
    rng = np.random.default_rng(4)
    z_hat = sums.row_normalize(np, rng.normal(size=(2500, 9)).astype(dtype))
    centroids = sums.row_normalize(np, rng.normal(size=(6, 9)).astype(dtype))
    got, expected = np.empty((2500, 6), dtype), np.empty((2500, 6), dtype)
    init.soft_assignments(np, z_hat, centroids, 0.1, out=got)
    init.soft_assignments(XP, z_hat, centroids, 0.1, out=expected)
    unchunked = init.softmax_rows(XP, z_hat @ centroids.T, 20.0)
    tol = 2e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(expected, unchunked, rtol=tol, atol=tol)
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_normalize_matches_reference(dtype):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(5000, 50)) * rng.uniform(0.01, 100, (5000, 1))).astype(dtype)
    x[7] = 0.0  # a zero row stays zero
    got = sums.row_normalize(np, x)
    expected = sums.row_normalize(XP, x)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)
    assert not got[7].any()
    out = np.empty_like(x)
    assert sums.row_normalize(np, x, out=out) is out
    np.testing.assert_array_equal(out, got)


@pytest.mark.parametrize("stored", [np.float32, np.float64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("keep", [True, False])
def test_fused_load_equals_a_cast_then_row_normalize(stored, dtype, keep):
    """The CPU's one-pass load gives the bits of the cast followed by the row kernel, on any
    thread count, and the same largest magnitude as the sliced load."""
    rng = np.random.default_rng(2)
    host = (rng.normal(size=(3001, 13)) * rng.uniform(0.01, 100, (3001, 1))).astype(stored)
    host[5] = 0.0
    cast = host.astype(dtype)
    for threads in (1, 2):
        with cpu_threads(threads):
            x, z_hat = setup.load_embedding(np, host, np.dtype(dtype), "X_pca", keep=keep)
        np.testing.assert_array_equal(z_hat, sums.row_normalize(np, cast))
        assert z_hat.dtype == dtype
        assert not z_hat[5].any()
        if keep:
            np.testing.assert_array_equal(x, cast)
        else:
            assert x is None
    largest = cpu_kernels.load_rows(host, kernels.NORM_FLOOR, np.empty_like(cast))
    assert largest == float(setup._load_in_slices(np, host, None, np.empty_like(cast)))
    assert largest == float(np.abs(cast).max())


@pytest.mark.parametrize(
    ("value", "stored", "message"),
    [
        (np.nan, np.float32, "non-finite"),
        (-np.inf, np.float64, "non-finite"),
        (1e300, np.float64, "beyond the range of float32"),
    ],
)
def test_fused_load_reports_values_that_are_not_finite_once_cast(value, stored, message):
    host = np.ones((700, 4), dtype=stored)
    host[456, 2] = value
    with pytest.raises(ValueError, match=message):
        setup.load_embedding(np, host, np.dtype(np.float32), "X_pca")


def test_screen_rows_narrow_and_measure_each_row():
    points = np.random.default_rng(3).normal(size=(1001, 9))
    screen = init.Screen.of(points)
    np.testing.assert_array_equal(screen.points32, points.astype(np.float32))
    np.testing.assert_allclose(screen.norms, np.linalg.norm(points, axis=1), rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_largest_magnitude_finds_the_largest_and_any_nan(dtype):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3001, 7)).astype(dtype)
    x[1234, 3] = -50.0
    assert sums.largest_magnitude(np, x) == 50.0
    assert sums.largest_magnitude(np, x).dtype == dtype
    assert sums.largest_magnitude(np, np.zeros((0, 7), dtype)) == 0.0
    for bad, expected in ((np.inf, np.inf), (-np.inf, np.inf), (np.nan, np.nan)):
        y = x.copy()
        y[-1, -1] = bad
        np.testing.assert_equal(sums.largest_magnitude(np, y), expected)
    y = x.copy()
    y[0, 0], y[-1, -1] = np.inf, np.nan  # NaN wins over Inf, wherever it is
    assert np.isnan(sums.largest_magnitude(np, y))


@pytest.mark.parametrize(
    ("n", "block", "levels"),
    [(0, 1, 1), (1, 1, 1), (63, 10, 3), (1000, 50, 7), (12_345, 617, 64), (200_003, 10_001, 64)],
)
def test_cell_order_and_grouping_match_reference(n, block, levels):
    for seed in (0, 2**32 - 1):
        order = permutation.cell_order(np, n, seed)
        keys = permutation.pcg_keys(np, n, seed)
        np.testing.assert_array_equal(order, np.argsort(keys, kind="stable"))
        rng = np.random.default_rng(seed)
        codes = np.stack([rng.integers(0, levels, n), rng.integers(levels, levels + 2, n)], 1)
        codes = codes.astype(np.int32)
        np.testing.assert_array_equal(
            permutation.group_blocks_by_level(np, order, codes, levels, block),
            permutation._group_blocks_reference(order, codes, levels, block),
        )


# --- initialisation ---------------------------------------------------------------------------------


def kmeans_points(n=3000, d=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, d)) * 4
    return centres[rng.integers(0, 12, n)] + rng.normal(size=(n, d))


@pytest.mark.parametrize("k", [1, 7, 300])
def test_kmeans_plus_plus_and_lloyd_match_reference(k):
    points = kmeans_points()
    seeds = init.kmeans_plus_plus(np, points, k, np.random.default_rng(1))
    expected = init.kmeans_plus_plus(XP, points, k, np.random.default_rng(1))
    np.testing.assert_array_equal(seeds, expected)
    labels, distance = init._assign(np, points, seeds)
    labels_ref, distance_ref = init._assign(XP, points, seeds)
    np.testing.assert_array_equal(labels, labels_ref)
    np.testing.assert_allclose(distance, distance_ref, rtol=1e-13, atol=1e-13)
    sums = init._cluster_sums(np, points, labels, k)
    expected_sums = np.zeros((k, points.shape[1]))
    np.add.at(expected_sums, labels, points)
    np.testing.assert_allclose(sums, expected_sums, rtol=1e-12, atol=1e-10)


def test_kmeans_plus_plus_on_repeated_points_matches_reference():
    """Five distinct points, each many times over, and more seeds than distinct points: once
    every distance is zero the lowest-index unchosen point is taken, on both paths. 20,000 points
    span several chunks of the CPU's chunked weight sums."""
    rng = np.random.default_rng(3)
    points = rng.normal(size=(5, 8))[rng.integers(0, 5, 20_000)]
    for k in (5, 12):
        seeds = init.kmeans_plus_plus(np, points, k, np.random.default_rng(4))
        expected = init.kmeans_plus_plus(XP, points, k, np.random.default_rng(4))
        np.testing.assert_array_equal(seeds, expected)
        assert len({tuple(row) for row in seeds}) == 5


def test_kmeans_ranking_in_float32_keeps_the_float64_labels_near_ties():
    """Points just off the bisector of two centres (float64 gaps 1e-6 to 1e-10), where a float32
    ranking alone picks the wrong centre for many: the checked ranking keeps float64's labels."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 30))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    a, b = rng.integers(0, 50, (2, 20_000))
    a, b = a[a != b], b[a != b]
    step = rng.choice([1e-6, 1e-7, 1e-8, 1e-9, 1e-10], (a.size, 1)) * rng.choice(
        [-1, 1], (a.size, 1)
    )
    points = (centres[a] + centres[b]) / 2 + step * (centres[a] - centres[b])
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    values = (centres**2).sum(axis=1) - 2 * points @ centres.T
    single = (centres**2).sum(axis=1).astype(np.float32) - 2 * (
        points.astype(np.float32) @ centres.T.astype(np.float32)
    )
    assert (single.argmin(axis=1) != values.argmin(axis=1)).sum() > 100  # float32 alone errs
    labels, _ = init._assign(np, points, centres)
    np.testing.assert_array_equal(labels, values.argmin(axis=1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gather_rows_matches_take(dtype):
    rng = np.random.default_rng(0)
    source = rng.normal(size=(5000, 17)).astype(dtype)
    rows = rng.integers(0, 5000, 12_345)
    out = np.empty((rows.size, 17), dtype=dtype)
    assert kernels.gather_rows(np, source, rows, out) is out
    np.testing.assert_array_equal(out, source[rows])


# --- correction -------------------------------------------------------------------------------------


def correction_inputs(n, k, levels, dtype, seed=0):
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(levels)[:-1]])
    codes = np.stack(
        [rng.integers(0, L, n) + o for L, o in zip(levels, offsets, strict=True)], 1
    ).astype(np.int32)
    x = rng.normal(size=(n, 30)).astype(dtype)
    r = rng.dirichlet(np.ones(k), n).astype(dtype)
    weights = rng.normal(size=(k, sum(levels), 30))
    return codes, x, r, weights


def level_index(codes, levels, n_clusters, dtype):
    offsets = np.concatenate([[0], np.cumsum(levels)[:-1]])
    cells = []
    for c, (count, offset) in enumerate(zip(levels, offsets, strict=True)):
        cells.extend(np.flatnonzero(codes[:, c] == offset + j) for j in range(count))
    counts = np.bincount(codes.ravel(), minlength=sum(levels))
    pieces = correction.LevelPieces.build(XP, codes, counts, (n_clusters, 30, dtype))
    return correction.LevelIndex(len(cells), tuple(cells), levels[0], None, None, pieces)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("n", "k", "levels"), [(1, 1, (1,)), (9000, 20, (5,)), (3000, 300, (3, 4)), (600, 7, (400,))]
)
def test_correction_kernels_match_reference(n, k, levels, dtype):
    codes, x, r, weights = correction_inputs(n, k, levels, dtype)
    index = level_index(codes, levels, k, dtype)
    moments = correction.level_moments(np, RawRows(np, x, dtype, x), r, codes, index)
    expected = correction.level_moments(XP, RawRows(XP, x, dtype, x), r, codes, index)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(moments, expected, rtol=tol, atol=tol * 10)
    out, out_ref = np.empty_like(x), np.empty_like(x)
    per_level = np.ascontiguousarray(weights.transpose(1, 0, 2)).astype(dtype)  # (B, K, d)
    kernels.correct_rows(np, x, r, per_level, codes, index.cells, out)
    kernels._correct_rows_reference(x, r, per_level, index.cells, out_ref)
    np.testing.assert_allclose(out, out_ref, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("grouped", [False, True], ids=["piece-by-piece", "one-group"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_device_level_moments_in_pieces_match_the_sums_per_level(monkeypatch, grouped, dtype):
    """Uneven levels (one empty, one of a single cell, one of many pieces), pieces padded."""
    monkeypatch.setattr(correction, "PIECE_SCRATCH_BYTES", 1 << 30 if grouped else 1)
    monkeypatch.setattr(correction, "PIECE_SCRATCH_SHARE", 1e6 if grouped else 1.0)
    rng = np.random.default_rng(3)
    sizes = [0, 1, 700, 31, 2300, 64]
    codes = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(codes)
    codes = codes.astype(np.int32).reshape(-1, 1)
    x = rng.normal(size=(codes.shape[0], 30)).astype(dtype)
    r = rng.dirichlet(np.ones(9), codes.shape[0]).astype(dtype)
    index = level_index(codes, (len(sizes),), 9, dtype)
    assert index.pieces.cells.shape[1] == 128
    n_groups = len(index.pieces.groups)
    assert n_groups == (1 if grouped else index.pieces.cells.shape[0])
    moments = correction.level_moments(XP, RawRows(XP, x, dtype, x), r, codes, index)
    x64, r64 = x.astype(np.float64), r.astype(np.float64)
    expected = np.stack(
        [r64[codes[:, 0] == b].T @ x64[codes[:, 0] == b] for b in range(len(sizes))]
    )
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(moments, expected, rtol=tol, atol=tol * 10)
    assert not moments[0].any()


@pytest.mark.parametrize("levels", [(5,), (3, 4)])
def test_device_index_in_pieces_gives_the_cpu_moments(levels):
    """LevelIndex.build on the device path (the stand-in namespace): pieces instead of lists,
    with the moments of the CPU's per-level lists; without pieces (X streamed) no lists at all."""
    from harmony_step._batches import BatchDesign

    codes, x, r, _ = correction_inputs(4000, 12, levels, np.float64)
    design = BatchDesign(
        keys=tuple(f"k{c}" for c in range(len(levels))), codes=codes, n_levels=levels,
        level_names=tuple(tuple(map(str, range(n))) for n in levels),
    )  # fmt: skip
    device = correction.LevelIndex.build(XP, codes, design, pieces_for=(12, 30, np.float64))
    host = correction.LevelIndex.build(np, codes, design)
    assert device.cells == ()
    assert device.pieces is not None
    assert host.pieces is None
    assert device.n_levels == host.n_levels == sum(levels)
    pieces = device.pieces
    level_of_piece = piece_levels(pieces)
    for b, cells in enumerate(host.cells):  # each level's pieces hold its cells, in order
        own = level_of_piece == b
        np.testing.assert_array_equal(pieces.cells[own][pieces.valid[own, :, 0]], cells)
    np.testing.assert_allclose(
        correction.level_moments(XP, RawRows(XP, x, np.float64, x), r, codes, device),
        correction.level_moments(np, RawRows(np, x, np.float64, x), r, codes, host),
        rtol=1e-12, atol=1e-10,
    )  # fmt: skip
    streamed = correction.LevelIndex.build(XP, codes, design)
    assert streamed.cells == ()
    assert streamed.pieces is None


def piece_levels(pieces):
    """The level of each piece, from the groups."""
    return np.concatenate([g.levels[g.piece_level[0]] for g in pieces.groups])


def test_empty_levels_get_no_pieces_and_do_not_shorten_them():
    """2,000 levels of which 5 hold cells (unused categories): pieces as long as for 5 levels,
    none for an empty level, each group adds only into its own levels."""
    rng = np.random.default_rng(5)
    used = np.array([3, 700, 701, 1500, 1999])
    codes = rng.choice(used, 40_000).astype(np.int32).reshape(-1, 1)
    x = rng.normal(size=(codes.shape[0], 30))
    r = rng.dirichlet(np.ones(9), codes.shape[0])
    index = level_index(codes, (2000,), 9, np.float64)
    pieces = index.pieces
    assert pieces.cells.shape[1] == correction.piece_rows(codes.shape[0], used.size) == 1024
    assert set(piece_levels(pieces)) == set(used)
    assert all(g.levels.size <= g.stop - g.first for g in pieces.groups)
    moments = correction.level_moments(XP, RawRows(XP, x, np.float64, x), r, codes, index)
    expected = np.zeros_like(moments)
    for b in used:
        expected[b] = r[codes[:, 0] == b].T @ x[codes[:, 0] == b]
    np.testing.assert_allclose(moments, expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize(
    ("n_cells", "n_levels", "n_clusters", "n_pcs", "dtype"),
    [(200_000, 5000, 1, 1, np.float64), (100_000, 64, 100, 50, np.float32)],
    ids=["the-0/1-matrix-binds", "the-gathered-rows-bind"],
)
def test_device_level_moments_stay_within_their_scratch_budget(
    n_cells, n_levels, n_clusters, n_pcs, dtype
):
    """The allocations of the level moments (traced on the stand-in), groups of many pieces
    included, stay under min(PIECE_SCRATCH_BYTES, PIECE_SCRATCH_SHARE * N K s)."""
    import tracemalloc

    rng = np.random.default_rng(8)
    codes = rng.integers(0, n_levels, n_cells).astype(np.int32).reshape(-1, 1)
    x = rng.normal(size=(n_cells, n_pcs)).astype(dtype)
    r = rng.dirichlet(np.ones(n_clusters), n_cells).astype(dtype) if n_clusters > 1 else (
        np.ones((n_cells, 1), dtype=dtype))  # fmt: skip
    counts = np.bincount(codes.ravel(), minlength=n_levels)
    pieces = correction.LevelPieces.build(XP, codes, counts, (n_clusters, n_pcs, dtype))
    assert max(g.stop - g.first for g in pieces.groups) > 1
    out = np.zeros((n_levels, n_clusters, n_pcs))
    budget = min(
        correction.PIECE_SCRATCH_BYTES,
        int(correction.PIECE_SCRATCH_SHARE * n_cells * n_clusters * np.dtype(dtype).itemsize),
    )
    tracemalloc.start()
    try:
        correction._piece_level_moments(XP, x, r, pieces, out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= budget
    for b in (0, n_levels - 1):
        own = codes[:, 0] == b
        expected = r[own].astype(np.float64).T @ x[own].astype(np.float64)
        np.testing.assert_allclose(out[b], expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("n_cells", "n_levels", "rows"),
    [(1, 1, 32), (100_000, 64, 256), (1_000_000, 64, 2048), (10_000_000, 64, 4096), (50, 200, 32)],
)
def test_piece_rows_keep_the_padding_under_a_quarter_of_the_cells(n_cells, n_levels, rows):
    assert correction.piece_rows(n_cells, n_levels) == rows


# --- threads ----------------------------------------------------------------------------------------


def synthetic(n=4000, seed=0):
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    batch = rng.integers(0, 3, n)
    kind = rng.integers(0, 4, n)
    x = (
        rng.normal(size=(4, 20))[kind] * 3
        + rng.normal(size=(3, 20))[batch]
        + rng.normal(size=(n, 20))
    )
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(batch.astype(str)),
            "lane": pd.Categorical(np.asarray(["a", "b"])[rng.integers(0, 2, n)]),
        },
        index=[f"c{i}" for i in range(n)],
    )
    return ad.AnnData(obs=obs, obsm={"X_pca": x})


def integrate(dtype, keys, n=4000):
    from harmony_step import harmony_integrate

    adata = synthetic(n)
    harmony_integrate(
        adata, keys, device="cpu", dtype=dtype, max_iter_harmony=3, max_iter_clustering=5,
        n_clusters=300,
    )  # fmt: skip
    return adata.obsm["X_pca_harmony"]


@pytest.mark.parametrize("n", [65_535, 65_536, 300_001])
def test_parallel_order_and_penalty_do_not_depend_on_the_thread_count(n):
    """Sizes on both sides of the serial/parallel switches: 1 and 2 threads give the same bits."""
    rng = np.random.default_rng(0)
    observed = kernels.fixed_point(rng.uniform(0, 100, (64, 100)))
    share, theta = rng.uniform(0, 1, 64), rng.uniform(0, 3, 64)
    results = []
    for threads in (1, 2):
        with cpu_threads(threads):
            results.append(
                (
                    cpu_kernels.cell_order(n, 2**32 - 1),
                    cpu_kernels.cell_order(np.uint32(n), 5),
                    cpu_kernels.log_penalty_table(observed, share, theta, 64, True),
                )
            )
    for one, two in zip(*results, strict=True):
        np.testing.assert_array_equal(one, two)
    keys = permutation.pcg_keys(np, n, 5)
    np.testing.assert_array_equal(results[0][1], np.argsort(keys, kind="stable"))


# 13,000 cells: every batch holds more than one chunk of SUM_CHUNK_ROWS cells. Two keys take the
# correction's per-row kernel, one key its per-level products.
@pytest.mark.parametrize("keys", [["batch"], ["batch", "lane"]], ids=["one-key", "two-keys"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_results_do_not_depend_on_the_thread_count(dtype, keys):
    outputs = []
    for threads in (1, 2, 1):
        with cpu_threads(threads):
            outputs.append(integrate(dtype, keys, n=13_000))
    assert np.array_equal(outputs[0], outputs[1])
    assert np.array_equal(outputs[0], outputs[2])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_similarities_of_several_blocks_at_once_give_the_same_result(dtype, monkeypatch):
    """The GPU forms the similarities of several blocks with one product, the CPU one block's at a
    time. With spans of three blocks on the CPU (which runs the GPU's span bookkeeping here: 20
    blocks, so spans start past the first block and the last one is shorter), the result is the
    same to rounding."""
    from harmony_step._core import clustering

    spans = []
    update_blocks = clustering._update_blocks

    def recorded(xp, state, consts, offsets, first, last):
        spans.append((first, last))
        update_blocks(xp, state, consts, offsets, first, last)

    monkeypatch.setattr(clustering, "_update_blocks", recorded)
    one_block = integrate(dtype, ["batch"])
    assert {last - first for first, last in spans} == {1}
    spans.clear()
    block_bytes = 200 * 300 * np.dtype(dtype).itemsize  # 4000 cells x 5 %, K = 300
    monkeypatch.setattr(clustering, "CPU_SIMILARITY_SPAN_BYTES", 3 * block_bytes)
    three_blocks = integrate(dtype, ["batch"])
    assert {(0, 3), (3, 6), (18, 20)} <= set(spans)
    tol = 1e-4 if dtype == "float32" else 1e-10
    np.testing.assert_allclose(three_blocks, one_block, rtol=tol, atol=tol)


def test_runs_in_several_threads_at_once_give_the_results_of_one_at_a_time():
    """BLAS's thread limit is process-wide: a run that ends first must not lift it under another."""
    import threading

    dtypes = ["float32", "float64", "float32", "float64"]
    with cpu_threads(2):
        alone = {dtype: integrate(dtype, ["batch"]) for dtype in set(dtypes)}
    together: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        with cpu_threads(2):
            together[i] = integrate(dtypes[i], ["batch"])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(dtypes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, dtype in enumerate(dtypes):
        assert np.array_equal(together[i], alone[dtype]), (i, dtype)


def test_cpu_threads_limits_numba_and_blas():
    from threadpoolctl import threadpool_info

    with cpu_threads(1) as count:
        assert count == 1
        assert numba.get_num_threads() == 1
        blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
        assert blas
        assert all(pool["num_threads"] == 1 for pool in blas)
        with cpu_threads() as inner:  # None keeps the enclosing count
            assert inner == 1


def test_cpu_threads_works_with_threadpoolctl_before_its_controlling_thread(monkeypatch):
    """threadpoolctl < 3.8 (as preinstalled on some GPU images) has no controlling thread."""
    from threadpoolctl import OpenBLASController, threadpool_info

    monkeypatch.delattr(OpenBLASController, "clear_controlling_thread", raising=False)
    with cpu_threads(1):
        blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
        assert blas
        assert all(pool["num_threads"] == 1 for pool in blas)


def test_available_cpus_follows_slurm_and_affinity(monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert available_cpus() == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "100000")  # never more than the affinity
    assert available_cpus() == affinity
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert available_cpus() == affinity


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_cpu_threads_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="thread count"), cpu_threads(bad):
        pass


@pytest.mark.parametrize("levels", [(5,), (3, 4)])
def test_streamed_input_gives_the_resident_sums(monkeypatch, levels):
    """X streamed in row chunks: the same level moments and correction as X kept whole."""
    from harmony_step._core import raw as raw_module

    monkeypatch.setattr(raw_module, "CHUNK_ROWS", 700)
    codes, x, r, weights = correction_inputs(3000, 20, levels, np.float64)
    index = level_index(codes, levels, 20, np.float64)
    resident = RawRows(XP, x, np.float64, x)
    streamed = RawRows(XP, x, np.float64)
    np.testing.assert_allclose(
        correction.level_moments(XP, streamed, r, codes, index),
        correction.level_moments(XP, resident, r, codes, index),
        rtol=1e-12, atol=1e-10,
    )  # fmt: skip
    np.testing.assert_array_equal(
        correction.level_moments(np, RawRows(np, x, np.float64), r, codes, index),
        correction.level_moments(np, RawRows(np, x, np.float64, x), r, codes, index),
    )
    out_streamed, out_resident = np.empty_like(x), np.empty_like(x)
    correction.apply_correction(
        np, RawRows(np, x, np.float64), r, weights, codes, index, out_streamed
    )
    correction.apply_correction(
        np, RawRows(np, x, np.float64, x), r, weights, codes, index, out_resident
    )
    np.testing.assert_allclose(out_streamed, out_resident, rtol=1e-12, atol=1e-12)
    # rows stored in another dtype are cast chunk by chunk
    rows, chunk = next(RawRows(XP, x.astype(np.float32), np.float64).chunks())
    assert (rows, chunk.dtype, chunk.shape) == (slice(0, 700), np.float64, (700, x.shape[1]))
