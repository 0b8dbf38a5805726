"""Edge cases of spec section 11, on CPU and (where present) GPU."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from harmony_step import HarmonyConvergenceWarning, harmony_integrate

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)]


def blobs(
    n: int = 300, d: int = 6, n_batches: int = 3, seed: int = 0, shift: float = 2.0
) -> ad.AnnData:
    """Two cell types, each shifted per batch: a batch effect Harmony should remove."""
    rng = np.random.default_rng(seed)
    cell_type = rng.integers(0, 2, n)
    batch = rng.integers(0, n_batches, n)
    centres = rng.normal(scale=5, size=(2, d))
    offsets = rng.normal(scale=shift, size=(n_batches, d))
    x = centres[cell_type] + offsets[batch] + rng.normal(size=(n, d))
    obs = pd.DataFrame(
        {"batch": pd.Categorical([f"b{b}" for b in batch]), "cell_type": cell_type.astype(str)},
        index=[f"cell{i}" for i in range(n)],
    )
    return ad.AnnData(obs=obs, obsm={"X_pca": x})


def run(adata: ad.AnnData, key="batch", **kwargs) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HarmonyConvergenceWarning)
        harmony_integrate(adata, key, **kwargs)
    out = adata.obsm["X_pca_harmony"]
    assert np.isfinite(out).all()
    return out


def batch_spread(x: np.ndarray, obs: pd.DataFrame) -> float:
    """Mean distance between per-batch means within each cell type (smaller = better mixed)."""
    spreads = []
    for _, group in obs.groupby("cell_type", observed=True):
        means = np.array(
            [
                x[obs.index.get_indexer(g.index)].mean(0)
                for _, g in group.groupby("batch", observed=True)
            ]
        )
        spreads.append(np.linalg.norm(means - means.mean(0), axis=1).mean())
    return float(np.mean(spreads))


@pytest.mark.parametrize("device", DEVICES)
def test_batch_effect_is_reduced(device):
    adata = blobs()
    out = run(adata, device=device)
    assert batch_spread(out, adata.obs) < 0.5 * batch_spread(adata.obsm["X_pca"], adata.obs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [2, 3, 7])
def test_tiny_inputs_run(n, device):
    adata = blobs(n=n, n_batches=2)
    run(adata, device=device)
    assert adata.uns["harmony"]["resolved"]["block_size"] == 1
    assert adata.uns["harmony"]["resolved"]["n_clusters"] == min(n, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flavor", ["harmony1", "harmony2"])
def test_one_cluster_is_one_global_ridge_regression(flavor, device):
    adata = blobs()
    out = run(adata, n_clusters=1, flavor=flavor, device=device)
    x = adata.obsm["X_pca"]
    phi = pd.get_dummies(adata.obs["batch"]).to_numpy(dtype=float)
    design = np.hstack([np.ones((x.shape[0], 1)), phi])
    counts = phi.sum(0)
    ridge = (
        np.full(counts.size, 1.0) if flavor == "harmony1" else 0.2 * counts
    )  # alpha * E, E = N_b * 1
    gram = design.T @ design + np.diag(np.concatenate([[0.0], ridge]))
    weights = np.linalg.solve(gram, design.T @ x)
    expected = x - phi @ weights[1:]
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_single_batch_leaves_input_unchanged(device):
    adata = blobs(n_batches=1)
    out = run(adata, device=device)
    np.testing.assert_allclose(out, adata.obsm["X_pca"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("flavor", ["harmony1", "harmony2"])
def test_empty_category_is_a_level_without_effect(flavor):
    adata = blobs()
    with_empty = adata.copy()
    with_empty.obs["batch"] = with_empty.obs["batch"].cat.add_categories(["unused"])
    out = run(with_empty, flavor=flavor, device="cpu").copy()
    assert with_empty.uns["harmony"]["resolved"]["n_levels"].tolist() == [4]
    np.testing.assert_allclose(out, run(adata, flavor=flavor, device="cpu"), rtol=1e-9, atol=1e-9)
    # theta per level counts the empty level too
    run(with_empty, theta=[2.0, 2.0, 2.0, 5.0], device="cpu")


def test_all_zero_row_is_corrected_like_others():
    adata = blobs()
    adata.obsm["X_pca"][5] = 0.0
    out = run(adata, device="cpu")
    assert np.isfinite(out[5]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_several_keys(device):
    adata = blobs()
    rng = np.random.default_rng(1)
    adata.obs["donor"] = rng.choice(["d1", "d2"], adata.n_obs)
    out = run(adata, ["batch", "donor"], theta=[2.0, 1.0], device=device).copy()
    record = adata.uns["harmony"]
    assert record["resolved"]["correction_method"] == "general"
    assert record["keys"] == ["batch", "donor"]
    assert batch_spread(out, adata.obs) < 0.5 * batch_spread(adata.obsm["X_pca"], adata.obs)
    with pytest.warns(UserWarning, match="'fast' needs a single batch key"):
        harmony_integrate(
            adata, ["batch", "donor"], correction_method="fast", max_iter_harmony=1, device=device
        )


def test_single_level_key_among_several_contributes_nothing():
    adata = blobs()
    adata.obs["constant"] = "same"
    both = run(adata, ["batch", "constant"], device="cpu").copy()
    alone = run(adata, "batch", device="cpu")
    assert np.linalg.norm(both - alone) / np.linalg.norm(alone) < 1e-6


def test_theta_zero_switches_off_the_penalty_but_still_corrects():
    adata = blobs()
    out = run(adata, theta=0.0, device="cpu")
    assert not np.allclose(out, adata.obsm["X_pca"])


def test_tau_discounts_small_batches():
    adata = blobs()
    plain = run(adata, device="cpu").copy()
    discounted = run(adata, tau=5, device="cpu")
    assert not np.array_equal(plain, discounted)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("sigma", "theta"), [(0.005, 2.0), (0.1, 200.0)])
def test_extreme_sigma_theta_stay_finite_in_float32(sigma, theta, device):
    run(blobs(), sigma=sigma, theta=theta, dtype=np.float32, device=device, max_iter_harmony=3)


def test_pruning_threshold_zero_and_none_run():
    adata = blobs()
    a = run(adata, batch_prune_threshold=0.0, device="cpu").copy()
    b = run(adata, batch_prune_threshold=None, device="cpu")
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


def test_float_and_integer_embeddings_are_accepted():
    adata = blobs()
    adata.obsm["X_int"] = np.rint(adata.obsm["X_pca"]).astype(np.int32)
    out = run(adata, basis="X_int", device="cpu")
    assert out.dtype == np.float64


def test_string_and_numeric_keys():
    adata = blobs()
    adata.obs["numeric_batch"] = adata.obs["batch"].cat.codes.astype(int)
    a = run(adata, "numeric_batch", device="cpu").copy()
    b = run(adata, "batch", device="cpu")
    np.testing.assert_array_equal(a, b)
