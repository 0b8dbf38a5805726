"""Integration metrics: LISI against R lisi 1.0, published medians, silhouette, subsampling."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

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
