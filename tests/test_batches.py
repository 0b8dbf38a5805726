"""Batch keys: each checked for being plausible as a batch variable before any work."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from harmony_step import BatchKeyWarning, HarmonyConvergenceWarning, harmony_integrate
from harmony_step._batches import encode_batches, normalize_keys


def adata_with(columns: dict, n: int = 200, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(columns, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(obs=obs, obsm={"X_pca": rng.normal(size=(n, 5))})


def test_a_key_listed_twice_is_refused_naming_it_and_the_fix():
    with pytest.raises(
        ValueError, match=r"\['dataset'\] are listed more than once.*raise its theta"
    ):
        normalize_keys(["dataset", "donor", "dataset"])


def test_a_key_listed_twice_is_refused_before_any_work():
    adata = adata_with({"b": np.repeat(["x", "y"], 100)})
    with pytest.raises(ValueError, match="listed more than once"):
        harmony_integrate(adata, ["b", "b"], device="cpu")
    assert "X_pca_harmony" not in adata.obsm


def test_a_continuous_float_key_is_refused_with_the_cost_and_the_override():
    rng = np.random.default_rng(1)
    adata = adata_with({"percent_mito": rng.uniform(0, 10, 200)})
    with pytest.raises(
        ValueError,
        match=r"'percent_mito' is a continuous float column \(200 distinct values in 200 cells\).*"
        r"many times the time and memory.*astype\('category'\)",
    ):
        harmony_integrate(adata, "percent_mito", device="cpu")
    assert "X_pca_harmony" not in adata.obsm


def test_batch_numbers_stored_as_floats_are_accepted():
    obs = pd.DataFrame({"batch": np.repeat([1.0, 2.0, 3.0, 4.0], 50)})
    design = encode_batches(obs, ("batch",))
    assert design.n_levels == (4,)


def test_about_one_cell_per_level_warns_with_the_cost():
    obs = pd.DataFrame({"barcode": [f"cell{i // 1}" for i in range(200)]})
    with pytest.warns(
        BatchKeyWarning,
        match=r"'barcode' has 200 levels for 200 cells \(about 1.0 cells per level\).*"
        r"many times longer and more memory",
    ):
        encode_batches(obs, ("barcode",))


def test_a_categorical_float_column_is_the_override_and_still_warns_about_its_levels():
    rng = np.random.default_rng(1)
    adata = adata_with({"score": pd.Categorical(np.round(rng.uniform(0, 10, 200), 6))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HarmonyConvergenceWarning)
        with pytest.warns(BatchKeyWarning, match="'score' has 200 levels for 200 cells"):
            harmony_integrate(adata, "score", device="cpu", max_iter_harmony=1)
    assert adata.obsm["X_pca_harmony"].shape == (200, 5)


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(np.repeat(["a", "b", "c", "d"], 50), id="four-batches"),
        pytest.param(np.repeat([f"s{i}" for i in range(40)], 5), id="forty-small-batches"),
        pytest.param(np.repeat(["a", "b"], [1, 2]), id="tiny-input"),
    ],
)
def test_plausible_keys_do_not_warn(values):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchKeyWarning)
        encode_batches(pd.DataFrame({"b": values}), ("b",))


def test_unused_categories_do_not_count_as_levels_with_cells():
    """A subset keeps all categories of the full data; only the used ones are judged."""
    column = pd.Categorical(
        np.repeat(["a", "b"], 50), categories=[f"c{i}" for i in range(500)] + ["a", "b"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchKeyWarning)
        design = encode_batches(pd.DataFrame({"b": column}), ("b",))
    assert design.n_levels == (502,)
