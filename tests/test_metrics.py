"""Integration metrics: LISI against R lisi 1.0, published medians, silhouette, subsampling."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from harmony_step._step import metrics
from harmony_step._step.metrics import (
    SAMPLE_SIZE,
    lisi,
    metrics_before_after,
    sample_cells,
    silhouette,
    simpson_index,
)


@pytest.fixture(scope="module")
def lisi_toy(data_dir):
    folder = data_dir / "lisi_toy"
    x = pd.read_csv(folder / "x.tsv.gz", sep="\t").to_numpy()
    meta = pd.read_csv(folder / "meta.tsv.gz", sep="\t")
    reference = pd.read_csv(folder / "lisi_R_lisi_1.0.tsv.gz", sep="\t")
    return x, meta, reference


@pytest.mark.parametrize("column", ["label1", "label2"])
def test_lisi_matches_r_lisi_per_cell(lisi_toy, column):
    x, meta, reference = lisi_toy
    ours = lisi(x, meta[column])
    expected = reference[column].to_numpy()
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


def test_lisi_of_query_cells_equals_full_run(lisi_toy):
    x, meta, _ = lisi_toy
    query = np.array([0, 5, 17, 250, 399])
    np.testing.assert_array_equal(
        lisi(x, meta["label1"], query=query), lisi(x, meta["label1"])[query]
    )


def test_lisi_is_one_for_a_single_label(lisi_toy):
    x, _, _ = lisi_toy
    np.testing.assert_allclose(lisi(x, np.zeros(len(x), dtype=int)), 1.0)


def test_lisi_is_near_the_number_of_labels_when_mixed_and_one_when_apart():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 5))
    mixed = rng.integers(0, 3, size=3000)
    assert 2.5 < np.median(lisi(x, mixed)) <= 3.0
    apart = x + 20.0 * mixed[:, None]  # the same labels in three distant clouds
    np.testing.assert_allclose(lisi(apart, mixed), 1.0)


def test_simpson_index_is_nan_when_every_kernel_weight_underflows():
    distances = np.full((2, 10), 1e300)
    labels = np.zeros((2, 10), dtype=np.int64)
    assert np.isnan(simpson_index(distances, labels, 1)).all()


def test_lisi_rejects_missing_labels():
    with pytest.raises(ValueError, match="missing"):
        lisi(np.zeros((5, 2)), ["a", None, "b", "a", "b"])


def test_ilisi_medians_match_published_values(data_dir):
    """README of tests/data: median iLISI 1.40 uncorrected and 2.32 after R harmony 2.0.4 (pbmc_3500)."""
    adata = ad.read_h5ad(data_dir / "pbmc_3500" / "pbmc_3500.h5ad")
    donor = adata.obs["donor"]
    assert np.median(lisi(adata.obsm["X_pca"], donor)) == pytest.approx(1.40, abs=0.005)
    corrected = adata.obsm["X_pca_harmony_R_2.0.4_seed1"]
    assert np.median(lisi(corrected, donor)) == pytest.approx(2.32, abs=0.005)


def test_clisi_and_ilisi_on_cell_lines_match_published_values(data_dir):
    adata = ad.read_h5ad(data_dir / "cell_lines" / "cell_lines.h5ad")
    corrected = adata.obsm["X_pca_harmony_R_2.0.4_seed1"]
    metrics = metrics_before_after(
        adata.obsm["X_pca"],
        corrected,
        adata.obs["dataset"],
        adata.obs["cell_type"],
        batch_key="dataset",
        label_key="cell_type",
        seed=0,
        sample_size=3000,
    )
    assert metrics["before"]["ilisi_median"] == pytest.approx(1.00, abs=0.01)
    assert metrics["after"]["ilisi_median"] == pytest.approx(1.73, abs=0.03)
    assert metrics["after"]["clisi_median"] == pytest.approx(1.00, abs=0.01)
    # correction mixes batches: batch silhouette falls; cell types stay apart
    assert metrics["after"]["batch_silhouette"] < metrics["before"]["batch_silhouette"]
    assert metrics["after"]["label_silhouette"] > 0.3
    assert metrics["settings"]["n_cells_evaluated"] == 3000


def test_silhouette_separated_and_mixed_groups():
    rng = np.random.default_rng(1)
    points = np.concatenate([rng.normal(0, 0.1, (100, 2)), rng.normal(10, 0.1, (100, 2))])
    separated = np.repeat(["a", "b"], 100)
    assert silhouette(points, separated) > 0.9
    mixed = rng.permutation(separated)
    assert abs(silhouette(points, mixed)) < 0.1
    assert silhouette(points, np.full(200, "a")) is None


def test_silhouette_on_a_sample_uses_only_those_cells():
    rng = np.random.default_rng(2)
    points = rng.normal(size=(300, 3))
    labels = rng.integers(0, 2, size=300)
    sample = np.arange(0, 300, 3)
    assert silhouette(points, labels, sample) == pytest.approx(
        silhouette(points[sample], labels[sample])
    )


def test_sample_cells_is_seeded_sorted_and_without_replacement():
    assert sample_cells(SAMPLE_SIZE, seed=0) is None
    first = sample_cells(50_000, seed=3)
    assert first is not None
    assert len(first) == SAMPLE_SIZE == len(np.unique(first))
    assert np.all(np.diff(first) > 0)
    np.testing.assert_array_equal(first, sample_cells(50_000, seed=3))
    assert not np.array_equal(first, sample_cells(50_000, seed=4))


def test_metrics_before_after_layout_without_labels():
    rng = np.random.default_rng(5)
    before = rng.normal(size=(400, 4))
    batches = rng.integers(0, 2, size=400)
    metrics = metrics_before_after(
        before, before + 1.0, batches, None, batch_key="b", label_key=None, seed=0, sample_size=100
    )
    assert set(metrics) == {"before", "after", "settings"}
    assert set(metrics["before"]) == {"ilisi_median", "batch_silhouette"}
    # a shift changes no distance, so the metrics on the same sample are identical
    assert metrics["before"] == pytest.approx(metrics["after"])
    assert metrics["settings"]["n_cells_evaluated"] == 100
    assert metrics["settings"]["n_neighbors"] == 89


# --- one code path for the CPU and the GPU ----------------------------------------------------


def _clustered(n, seed=0, dims=6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, size=(5, dims))
    kind = rng.integers(0, 5, size=n)
    return centres[kind] + rng.normal(size=(n, dims)), kind


@pytest.mark.parametrize(
    ("tile_elements", "max_group"), [(1 << 24, 1024), (40_000, 1024), (1 << 24, 1)]
)
def test_bruteforce_candidates_are_the_nearest_cells(monkeypatch, tile_elements, max_group):
    """The GPU's search, run with NumPy: the same nearest cells as an exhaustive sort, in one query
    block or in many, with column groups or without."""
    monkeypatch.setattr(metrics, "_CPU_TILE_ELEMENTS", tile_elements)
    monkeypatch.setattr(metrics, "_MAX_GROUP", max_group)
    points, _ = _clustered(9001)  # not a whole number of groups: the last one is padded
    query = np.sort(np.random.default_rng(1).choice(9001, 300, replace=False))
    found = metrics.candidates_bruteforce(points, query, 106)
    squared = ((points[query][:, None, :] - points[None, :, :]) ** 2).sum(axis=2)
    expected = np.argsort(squared, axis=1, kind="stable")[:, :106]
    assert found.shape == (300, 106)
    np.testing.assert_array_equal(np.sort(found, axis=1), np.sort(expected, axis=1))
    found_squared = np.take_along_axis(squared, found, axis=1)
    assert np.all(np.diff(found_squared, axis=1) >= -1e-9)  # nearest first


def test_bruteforce_candidates_with_many_duplicates():
    """Ties at the edge of the candidate set: any of the tied cells may be chosen, but always the
    right number, each once, and never a farther cell."""
    rng = np.random.default_rng(3)
    points = np.repeat(rng.normal(size=(50, 4)), 40, axis=0)  # 50 places, 40 cells each
    query = np.arange(0, 2000, 37)
    found = metrics.candidates_bruteforce(points, query, 106)
    squared = ((points[query][:, None, :] - points[None, :, :]) ** 2).sum(axis=2)
    edge = np.sort(squared, axis=1)[:, 105]
    assert all(len(set(row)) == 106 for row in found)
    assert np.all(np.take_along_axis(squared, found, axis=1) <= edge[:, None] + 1e-12)


def _sklearn_candidates(points, query, n_candidates):
    from sklearn.neighbors import NearestNeighbors

    knn = NearestNeighbors(n_neighbors=n_candidates, algorithm="brute").fit(points)
    return knn.kneighbors(points[query], return_distance=False)


def _exact_neighbourhoods(points, query, k=89):
    """Distances and indices of the k nearest cells of each query cell by a full stable sort of
    exact distances, the cell itself left out."""
    everyone = np.tile(np.arange(len(points)), (len(query), 1))
    exact = metrics.exact_distances(points, query, everyone)
    exact[np.arange(len(query)), query] = np.inf
    order = np.argsort(exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(exact, order, axis=1), order


@pytest.fixture
def searched_again(monkeypatch):
    """The query cells the CPU's search takes again in double precision, in order of the calls."""
    from harmony_step._step import cpu_neighbours

    seen = []
    original = cpu_neighbours._searched

    def recording(search, n_candidates, n_neighbors):
        if search.dtype == np.float64:
            seen.extend(search.query_idx.tolist())
        return original(search, n_candidates, n_neighbors)

    monkeypatch.setattr(cpu_neighbours, "_searched", recording)
    return seen


@pytest.fixture
def measured_exactly(monkeypatch):
    """The query cells the CPU's search measures exactly against every nearby cell."""
    from harmony_step._step import cpu_neighbours

    seen = []
    original = cpu_neighbours.TiledSearch.within

    def recording(self, rows, edge, k):
        seen.extend(self.query_idx[rows].tolist())
        return original(self, rows, edge, k)

    monkeypatch.setattr(cpu_neighbours.TiledSearch, "within", recording)
    return seen


def test_neighbours_from_each_search_are_identical(searched_again):
    """The CPU's search, scikit-learn's candidates and the GPU's brute force (run with NumPy)
    give the same neighbourhoods, to the bit, on clustered data, where the CPU's single-precision
    candidates need no second search."""
    points, _ = _clustered(5000, seed=3)
    query = np.arange(0, 5000, 7)
    from_cpu = metrics.neighbours(points, query=query, threads=2)
    assert searched_again == []
    for search in (_sklearn_candidates, metrics.candidates_bruteforce):
        candidates = search(points, query, 90 + metrics.CANDIDATE_MARGIN)
        distances, indices = metrics._nearest_candidates(points, query, candidates, 90, np, 1)
        np.testing.assert_array_equal(from_cpu[1], indices)
        np.testing.assert_array_equal(from_cpu[0], distances)


def _shell(n_shell=300, n_far=2000, seed=8):
    """Cells on a sphere around the origin whose radii differ by 1e-9 (float32 cannot order them),
    with farther cells around; the first five cells sit near the origin."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(n_shell, 8))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    shell = direction * (10.0 + 1e-9 * rng.permutation(n_shell))[:, None]
    far = rng.normal(size=(n_far, 8)) * 3 + 40.0
    centre = rng.normal(size=(5, 8)) * 1e-12
    return np.concatenate([centre, shell, far])


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_cells_single_precision_cannot_order_are_searched_again_exactly(searched_again, offset):
    """On the shell, single precision cannot tell the neighbourhood's edge; those query cells (given
    in no particular order, with other cells) are measured again and come out as a full sort
    gives them, also far from the origin."""
    points = _shell() + offset
    query = np.array([3, 0, 4, 1, 2, 900, 2100])
    distances, indices = metrics.neighbours(points, query=query)
    assert set(searched_again) >= {0, 1, 2, 3, 4}  # the five cells in the middle
    expected_distances, expected = _exact_neighbourhoods(points, query)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(distances, expected_distances)


def test_single_precision_candidates_alone_would_miss_neighbours_on_the_shell():
    """Why the check exists: without the second search, the shell loses true neighbours."""
    from harmony_step._step.cpu_neighbours import TiledSearch

    points = _shell()
    query = np.arange(5)
    candidates, _ = TiledSearch(points, query, 1).candidates(90 + metrics.CANDIDATE_MARGIN)
    _, indices = metrics._nearest_candidates(points, query, candidates, 90, np, 1)
    assert not np.array_equal(indices, _exact_neighbourhoods(points, query)[1])


def _lattice(seed=31):
    """Cells on a small integer lattice: hundreds of exact ties at every neighbourhood's edge."""
    return np.random.default_rng(seed).integers(0, 4, size=(3000, 3)).astype(float)


@pytest.mark.parametrize(
    "points",
    [
        _lattice(),
        np.random.default_rng(32).integers(0, 6, size=(3000, 4)) * 0.1 + 7.3,  # rounded ties
        np.concatenate([np.zeros((300, 4)), np.random.default_rng(33).normal(size=(1700, 4))]),
        np.ones((400, 3)),  # every cell the same
    ],
    ids=["lattice", "decimal-lattice", "duplicates", "all-equal"],
)
def test_ties_at_the_neighbourhood_edge_are_broken_by_index(points):
    query = np.arange(0, len(points), 7)
    distances, indices = metrics.neighbours(points, query=query, threads=2)
    expected_distances, expected = _exact_neighbourhoods(points, query)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(distances, expected_distances)


@pytest.mark.parametrize("scale", [1e-20, 1e19])
def test_tiny_and_huge_coordinates_need_no_second_search(searched_again, scale):
    """The coordinates are scaled by a power of two before single precision, so magnitudes far
    from 1 neither underflow nor overflow it."""
    points, _ = _clustered(600, seed=5)
    points = points * scale
    query = np.arange(0, 600, 5)
    distances, indices = metrics.neighbours(points, query=query)
    assert searched_again == []
    expected_distances, expected = _exact_neighbourhoods(points, query)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(distances, expected_distances)


def test_one_far_outlier_does_not_force_a_second_search(searched_again):
    points, _ = _clustered(2000, seed=6, dims=8)
    points = np.concatenate([points, np.full((1, 8), 1e4)])
    query = np.arange(0, 2000, 20)
    _, indices = metrics.neighbours(points, query=query)
    assert searched_again == []
    np.testing.assert_array_equal(indices, _exact_neighbourhoods(points, query)[1])


def test_duplicated_cells_are_measured_exactly_and_stop_early(measured_exactly):
    """Half the cells identical: their neighbourhoods are the lowest-index copies, found in the
    first tiles (a row whose 89th distance is 0 is complete)."""
    rng = np.random.default_rng(39)
    points = rng.normal(size=(6000, 20))
    points[::2] = points[0]
    query = np.arange(0, 6000, 15)
    distances, indices = metrics.neighbours(points, query=query, threads=2)
    assert measured_exactly  # the copies tie at distance 0
    expected_distances, expected = _exact_neighbourhoods(points, query)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(distances, expected_distances)


def test_clusters_far_from_the_mean_are_resolved_in_double_precision(
    searched_again, measured_exactly
):
    """Two clusters 1000 apart: single precision cannot vouch for any neighbourhood (its error
    grows with the distance from the mean), double precision vouches for all of them."""
    rng = np.random.default_rng(40)
    points = np.concatenate([rng.normal(size=(2000, 10)), rng.normal(size=(2000, 10)) + 1000])
    query = np.arange(0, 4000, 10)
    distances, indices = metrics.neighbours(points, query=query, threads=2)
    assert sorted(searched_again) == query.tolist()
    assert measured_exactly == []
    expected_distances, expected = _exact_neighbourhoods(points, query)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(distances, expected_distances)


def test_huge_coordinates_are_rescaled_and_distances_scale_exactly():
    """Coordinates near 2^603, whose squares would overflow, give the same neighbours as the
    original ones and the distances times 2^600, to the bit."""
    points, _ = _clustered(800, seed=41)
    points[::7] = points[1]  # ties too
    query = np.arange(0, 800, 9)
    distances, indices = metrics.neighbours(points, query=query)
    huge_distances, huge_indices = metrics.neighbours(np.ldexp(points, 600), query=query)
    np.testing.assert_array_equal(huge_indices, indices)
    np.testing.assert_array_equal(huge_distances, np.ldexp(distances, 600))


@pytest.mark.parametrize(
    "points",
    [
        np.ldexp(_clustered(800, seed=42)[0], -600),  # squares subnormal or zero
        np.concatenate(  # differences of 2^-600 beside a spread of 2^-349
            [np.ldexp(np.arange(20.0, 0.0, -1.0), -600), [2.0**-350, -(2.0**-350)]]
        )[:, None],
        np.stack(  # a constant column, and differences of 1e-300 in the other
            [np.ones(22), np.concatenate([[1e-300, 2e-300], np.zeros(20)])], axis=1
        ),
    ],
    ids=["subnormal", "tiny-beside-small", "constant-column"],
)
def test_squared_differences_that_underflow_still_give_the_full_sort(points):
    query = np.arange(len(points))
    perplexity = 1.0 if len(points) < 100 else 30.0
    distances, indices = metrics.neighbours(points, query=query, perplexity=perplexity)
    k = indices.shape[1]
    expected_distances, expected = _exact_neighbourhoods(points, query, k)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(distances, expected_distances)


def test_non_finite_coordinates_and_tiny_perplexities_are_refused():
    points, _ = _clustered(200)
    points[5, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        metrics.neighbours(points)
    for empty in (np.zeros((0, 3)), np.zeros((5, 0))):
        with pytest.raises(ValueError, match="cells with coordinates"):
            metrics.neighbours(empty)
    for perplexity in (0.2, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match="perplexity"):
            metrics.neighbours(_clustered(200)[0], perplexity=perplexity)


def test_neighbours_do_not_depend_on_the_thread_count():
    """With ties (the lattice), with second searches and with several query chunks."""
    from harmony_step._step import cpu_neighbours

    points = _lattice(seed=34)
    query = np.arange(0, 3000, 3)  # 1000 query cells: several chunks of QUERY_ROWS
    assert len(query) > 2 * cpu_neighbours.QUERY_ROWS
    one = metrics.neighbours(points, query=query, threads=1)
    three = metrics.neighbours(points, query=query, threads=3)
    np.testing.assert_array_equal(one[0], three[0])
    np.testing.assert_array_equal(one[1], three[1])


@pytest.mark.parametrize(
    "points", [_lattice(seed=35), _shell()], ids=["lattice-ties", "shell-searched-again"]
)
def test_single_precision_cells_give_the_neighbours_of_their_float64_values(points):
    """Float32 cells are searched as they are, without a float64 copy of every cell; the exact
    stages widen the rows they use, so the result is that of the same values in float64, ties and
    second searches included."""
    single = points.astype(np.float32)
    query = np.arange(0, len(points), 4)
    found = metrics.neighbours(single, query=query, threads=2)
    widened = metrics.neighbours(single.astype(np.float64), query=query, threads=2)
    np.testing.assert_array_equal(found[1], widened[1])
    np.testing.assert_array_equal(found[0], widened[0])


def test_column_summary_matches_numpy_and_refuses_infinities_in_float32():
    from harmony_step._step.cpu_neighbours import _SUMMARY_ROWS, ColumnSummary

    points = np.random.default_rng(5).normal(size=(_SUMMARY_ROWS + 7, 3)).astype(np.float32)
    summary = ColumnSummary.of(points, threads=3)
    np.testing.assert_array_equal(summary.minimum, points.min(axis=0))
    np.testing.assert_array_equal(summary.maximum, points.max(axis=0))
    np.testing.assert_allclose(summary.total, points.sum(axis=0, dtype=np.float64), rtol=1e-12)
    one_thread = ColumnSummary.of(points, threads=1)
    assert all(np.array_equal(a, b) for a, b in zip(summary, one_thread, strict=True))
    points[_SUMMARY_ROWS + 3, 1] = np.inf
    with pytest.raises(ValueError, match="finite"):
        metrics.neighbours(points, query=np.arange(10))
    points[_SUMMARY_ROWS + 5, 1] = -np.inf  # +Inf and -Inf in one column: a NaN sum, no warning
    with pytest.raises(ValueError, match="finite"):
        metrics.neighbours(points, query=np.arange(10))


def test_coordinates_whose_sum_overflows_are_rescaled_without_warnings():
    """Coordinates near 1e308: their column sums overflow before the cells are rescaled (the
    suite turns RuntimeWarnings into errors)."""
    points = np.random.default_rng(6).uniform(0.5, 1.0, size=(100, 3))
    distances, indices = metrics.neighbours(points, perplexity=5)
    huge = metrics.neighbours(np.ldexp(points, 1022), perplexity=5)
    np.testing.assert_array_equal(huge[1], indices)
    np.testing.assert_array_equal(huge[0], np.ldexp(distances, 1022))


def test_query_indices_outside_the_cells_are_refused():
    points, _ = _clustered(200)
    with pytest.raises(ValueError, match="Query cell indices"):
        metrics.neighbours(points, query=np.array([0, -1]))
    with pytest.raises(ValueError, match="Query cell indices"):
        metrics.neighbours(points, query=np.array([200]))


def _smallest_reference(rows, c):
    """Columns and values of the c smallest entries of each row in (value, column) order."""
    order = np.argsort(rows, axis=1, kind="stable")[:, :c]
    return order, np.take_along_axis(rows, order, axis=1)


@pytest.mark.parametrize("integer_values", [False, True])
def test_running_smallest_kernel_equals_a_full_sort(integer_values):
    """``keep_smallest`` over tiles of varied widths (the first one narrower than c at times),
    then ``smallest_in_order``, against a stable sort of the whole rows; small integer values make
    many ties, broken by column. Columns are numbered from an offset, as in a search's later tiles."""
    from harmony_step._step import cpu_neighbours as cn

    rng = np.random.default_rng(21)
    c, offset = 10, 1000
    for _ in range(80):
        n_columns, width = int(rng.integers(c, 400)), int(rng.integers(1, 120))
        if integer_values:
            rows = rng.integers(0, 30, size=(6, n_columns)).astype(np.float32)
        else:
            rows = rng.normal(size=(6, n_columns)).astype(np.float32)
        values = np.empty((6, cn.BUFFER_FACTOR * c), dtype=np.float32)
        columns = np.empty((6, cn.BUFFER_FACTOR * c), dtype=np.int64)
        counts = np.zeros(6, dtype=np.int64)
        thresholds = np.full(6, np.inf, dtype=np.float32)
        for first in range(0, n_columns, width):
            tile = np.ascontiguousarray(rows[:, first : first + width])
            cn.keep_smallest(tile, offset + first, values, columns, counts, thresholds, c)
        found = np.empty((6, c), dtype=np.int64)
        found_values = np.empty((6, c), dtype=np.float32)
        cn.smallest_in_order(values, columns, counts, c, found, found_values)
        expected, expected_values = _smallest_reference(rows, c)
        np.testing.assert_array_equal(found, offset + expected)
        np.testing.assert_array_equal(found_values, expected_values)


def test_ties_are_broken_by_index_and_the_cell_itself_is_left_out():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(40, 3))
    points = np.concatenate([base] * 5)  # every cell five times
    distances, indices = metrics.neighbours(points, perplexity=10.0)
    assert distances.shape == (200, 29)
    assert not np.any(indices == np.arange(200)[:, None])
    for row in range(200):
        pairs = list(zip(distances[row], indices[row], strict=True))
        assert pairs == sorted(pairs)
    # the four copies of a cell come first, at distance 0, in index order
    np.testing.assert_array_equal(indices[0, :4], [40, 80, 120, 160])
    np.testing.assert_array_equal(distances[0, :4], 0.0)


def test_exact_distances_match_the_definition():
    points, _ = _clustered(500, seed=5)
    candidates = np.tile(np.arange(500), (10, 1))
    query = np.arange(10)
    expected = np.sqrt(((points[query][:, None, :] - points[None, :, :]) ** 2).sum(axis=2))
    found = metrics.exact_distances(points, query, candidates)
    np.testing.assert_allclose(found, expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("with_singleton", [False, True])
def test_silhouette_equals_scikit_learn(with_singleton):
    from sklearn.metrics import silhouette_score

    points, kind = _clustered(2500, seed=6)
    labels = kind.astype(object)
    if with_singleton:
        labels[17] = "alone"
    sample = np.arange(0, 2500, 2)
    if with_singleton:
        sample = np.union1d(sample, [17])
    codes = pd.factorize(labels[sample])[0]
    expected = silhouette_score(points[sample], codes)
    assert silhouette(points, labels, sample) == pytest.approx(expected, rel=0, abs=1e-12)


@pytest.mark.gpu
def test_gpu_metrics_equal_cpu_metrics():
    """GPU and CPU metrics on the same sample agree within 1e-6, neighbours exactly."""
    import cupy

    points, kind = _clustered(60_000, seed=7, dims=20)
    batches = np.random.default_rng(8).integers(0, 4, size=60_000)
    after = points + 0.01 * np.random.default_rng(9).normal(size=points.shape)
    points[100:110] = points[200]  # duplicate cells: ties must be broken the same way
    sample = sample_cells(60_000, seed=0, size=5000)
    cpu_d, cpu_i = metrics.neighbours(points, query=sample)
    gpu_d, gpu_i = metrics.neighbours(points, query=sample, xp=cupy)
    np.testing.assert_array_equal(cpu_i, gpu_i.get())
    np.testing.assert_array_equal(cpu_d, gpu_d.get())
    common = {"batch_key": "b", "label_key": "t", "seed": 0, "sample_size": 5000}
    cpu = metrics_before_after(points, after, batches, kind, **common)
    gpu = metrics_before_after(points, after, batches, kind, **common, xp=cupy)
    for when in ("before", "after"):
        assert set(cpu[when]) == set(gpu[when])
        for name, value in cpu[when].items():
            assert gpu[when][name] == pytest.approx(value, rel=0, abs=1e-6), (when, name)
    assert cpu["settings"] == gpu["settings"]


def test_metrics_do_not_depend_on_the_thread_count(monkeypatch):
    """The CPU's chunks are fixed, so 1 and 3 threads give the same bits; chunks smaller than the
    sample exercise the pool."""
    monkeypatch.setattr(metrics, "_CPU_CHUNK_ROWS", 64)
    from harmony_step._step import cpu_neighbours

    monkeypatch.setattr(cpu_neighbours, "QUERY_ROWS", 64)
    points, kind = _clustered(3000, seed=11)
    batches = np.random.default_rng(12).integers(0, 3, size=3000)
    common = {"batch_key": "b", "label_key": "t", "seed": 0, "sample_size": 1000}
    one = metrics_before_after(points, points * 1.1, batches, kind, **common, threads=1)
    three = metrics_before_after(points, points * 1.1, batches, kind, **common, threads=3)
    assert one == three


def test_both_silhouettes_from_one_pass_equal_each_alone():
    points, kind = _clustered(1500, seed=13)
    batches = np.random.default_rng(14).integers(0, 4, size=1500)
    together = metrics.silhouettes(points, [batches, kind, np.zeros(1500, dtype=int)])
    assert together[0] == pytest.approx(silhouette(points, batches), rel=0, abs=1e-12)
    assert together[1] == pytest.approx(silhouette(points, kind), rel=0, abs=1e-12)
    assert together[2] is None  # one label


@pytest.mark.parametrize(
    "points",
    [
        np.random.default_rng(30).integers(0, 6, size=(3000, 4)) * 0.1 + 7.3,
        np.concatenate([np.random.default_rng(35).normal(size=(3000, 4)), np.full((1, 4), 300.0)]),
    ],
    ids=["decimal-lattice", "outlier"],
)
def test_single_precision_bound_holds_for_every_cell_left_out(points):
    """Every cell the single-precision search leaves out lies at a squared distance of at least the
    bound it returns: on data full of near-ties that float32 rounds, and with one far outlier
    (where the bound that does not use the largest norm is the one that counts)."""
    from harmony_step._step.cpu_neighbours import TiledSearch

    query = np.arange(0, len(points), 10)
    candidates, outside = TiledSearch(points, query, 2).candidates(40)
    everyone = np.tile(np.arange(len(points)), (len(query), 1))
    squared = metrics.exact_distances(points, query, everyone) ** 2
    left_out = np.ones_like(squared, dtype=bool)
    np.put_along_axis(left_out, candidates, False, axis=1)
    assert np.all(squared[left_out] >= np.repeat(outside, left_out.sum(axis=1)))


@pytest.mark.parametrize(
    "points",
    [
        np.random.default_rng(36).integers(0, 6, size=(3000, 4)) * 0.1 + 7.3,
        np.random.default_rng(37).normal(size=(3000, 4)),  # values round up past the edge's
        np.concatenate([np.random.default_rng(38).normal(size=(3000, 4)), np.full((1, 4), 300.0)]),
    ],
    ids=["decimal-lattice", "gaussian", "outlier"],
)
def test_second_search_limit_admits_every_cell_within_the_edge(points):
    """The second search measures every cell whose single-precision value is at most
    ``value_limit``; every cell within the edge distance must pass it, ties at the edge included."""
    from harmony_step._step.cpu_neighbours import TiledSearch

    query = np.arange(0, len(points), 10)
    search = TiledSearch(points, query, 1)
    edge, _ = _exact_neighbourhoods(points, query)
    rows = np.arange(len(query))
    limit = search.value_limit(rows, edge[:, -1])
    values = np.concatenate([tile.copy() for _, tile in search._tiles(rows)], axis=1)
    everyone = np.tile(np.arange(len(points)), (len(query), 1))
    within = metrics.exact_distances(points, query, everyone) <= edge[:, -1:]
    assert within.sum(axis=1).min() >= 89
    assert np.all(values[within] <= np.repeat(limit, within.sum(axis=1)))
