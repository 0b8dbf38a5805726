"""Every embedding container anndata or its users hand over works, and comes back in its kind."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse

from harmony_step import (
    HarmonyConvergenceWarning,
    MissingBasisError,
    MissingColumnError,
    WrongTypeError,
    harmony_integrate,
)

N, D = 120, 5


def make_adata(seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {"batch": pd.Categorical(rng.choice(["a", "b", "c"], N))},
        index=[f"c{i}" for i in range(N)],
    )
    return ad.AnnData(obs=obs, obsm={"X_pca": rng.normal(size=(N, D))})


def integrate(adata: ad.AnnData, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HarmonyConvergenceWarning)
        harmony_integrate(adata, "batch", device="cpu", max_iter_harmony=2, **kwargs)


def reference(adata: ad.AnnData, **kwargs) -> np.ndarray:
    plain = ad.AnnData(obs=adata.obs.copy(), obsm={"X_pca": np.asarray(adata.obsm["X_pca"])})
    integrate(plain, **kwargs)
    return plain.obsm["X_pca_harmony"]


def test_a_view_is_integrated_like_its_copy_and_the_parent_is_untouched():
    parent = make_adata()
    parent_pca = parent.obsm["X_pca"].copy()
    mask = parent.obs["batch"] != "c"
    view = parent[mask]
    assert view.is_view
    expected = reference(view.copy())
    with pytest.warns(ad.ImplicitModificationWarning, match="initializing view as actual"):
        integrate(view)
    np.testing.assert_array_equal(view.obsm["X_pca_harmony"], expected)
    assert "X_pca_harmony" not in parent.obsm
    np.testing.assert_array_equal(parent.obsm["X_pca"], parent_pca)


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(np.asfortranarray, id="fortran-order"),
        pytest.param(lambda x: np.repeat(x, 2, axis=1)[:, ::2], id="strided"),
        pytest.param(lambda x: x.astype(np.float32), id="float32"),
        pytest.param(lambda x: x.astype(np.float16), id="float16"),
        pytest.param(lambda x: x.astype(">f8"), id="big-endian"),
    ],
)
def test_numpy_of_any_order_and_float_dtype(convert):
    adata = make_adata()
    adata.obsm["X_pca"] = convert(adata.obsm["X_pca"])
    expected = reference(adata)
    integrate(adata)
    out = adata.obsm["X_pca_harmony"]
    assert type(out) is np.ndarray
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, expected)


def test_integer_embedding_is_accepted():
    adata = make_adata()
    adata.obsm["X_pca"] = np.round(adata.obsm["X_pca"] * 100).astype(np.int32)
    integrate(adata)
    assert adata.obsm["X_pca_harmony"].dtype == np.float64


def test_a_dataframe_comes_back_as_a_dataframe_with_its_index_and_columns():
    adata = make_adata()
    columns = [f"PC{i + 1}" for i in range(D)]
    adata.obsm["X_pca"] = pd.DataFrame(adata.obsm["X_pca"], index=adata.obs_names, columns=columns)
    expected = reference(adata)
    integrate(adata)
    out = adata.obsm["X_pca_harmony"]
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == columns
    assert out.index.equals(adata.obs_names)
    np.testing.assert_array_equal(out.to_numpy(), expected)


def test_a_dataframe_in_a_view():
    adata = make_adata()
    adata.obsm["X_pca"] = pd.DataFrame(adata.obsm["X_pca"], index=adata.obs_names)
    view = adata[:80]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ad.ImplicitModificationWarning)
        integrate(view)
    assert isinstance(view.obsm["X_pca_harmony"], pd.DataFrame)
    assert view.obsm["X_pca_harmony"].shape == (80, D)


def test_a_backed_anndata_works(tmp_path):
    path = tmp_path / "in.h5ad"
    make_adata().write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    expected = reference(ad.read_h5ad(path))
    integrate(backed)
    np.testing.assert_array_equal(np.asarray(backed.obsm["X_pca_harmony"]), expected)
    backed.file.close()


@pytest.mark.parametrize(
    "sparse", [scipy.sparse.csr_matrix, scipy.sparse.csr_array], ids=["matrix", "array"]
)
def test_sparse_is_refused_as_a_type_error_and_a_value_error(sparse):
    adata = make_adata()
    adata.obsm["X_pca"] = sparse(adata.obsm["X_pca"])
    with pytest.raises(
        WrongTypeError, match=r"adata.obsm\['X_pca'\] is a sparse matrix.*\.toarray\(\)"
    ) as caught:
        integrate(adata)
    assert isinstance(caught.value, TypeError)
    assert isinstance(caught.value, ValueError)
    assert "X_pca_harmony" not in adata.obsm


def test_object_embedding_is_refused():
    adata = make_adata()
    adata.obsm["X_pca"] = adata.obsm["X_pca"].astype(object)
    with pytest.raises(WrongTypeError, match=r"must be numeric. Got dtype object"):
        integrate(adata)


def test_dask_array_comes_back_as_dask():
    dask_array = pytest.importorskip("dask.array")
    adata = make_adata()
    expected = reference(adata)
    adata.obsm["X_pca"] = dask_array.from_array(adata.obsm["X_pca"], chunks=(50, D))
    integrate(adata)
    out = adata.obsm["X_pca_harmony"]
    assert isinstance(out, dask_array.Array)
    np.testing.assert_array_equal(out.compute(), expected)


@pytest.mark.gpu
def test_cupy_comes_back_as_cupy():
    import cupy

    adata = make_adata()
    expected = reference(adata)
    adata.obsm["X_pca"] = cupy.asarray(adata.obsm["X_pca"])
    integrate(adata)
    out = adata.obsm["X_pca_harmony"]
    assert isinstance(out, cupy.ndarray)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out.get(), expected)


@pytest.mark.gpu
def test_cupy_on_the_gpu_device_comes_back_as_cupy():
    import cupy

    adata = make_adata()
    adata.obsm["X_pca"] = cupy.asarray(adata.obsm["X_pca"], dtype=cupy.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HarmonyConvergenceWarning)
        harmony_integrate(adata, "batch", device="gpu", dtype=np.float32, max_iter_harmony=2)
    out = adata.obsm["X_pca_harmony"]
    assert isinstance(out, cupy.ndarray)
    assert out.dtype == np.float32
    assert out.shape == (N, D)


# --- exceptions catchable as scanpy's and rapids-singlecell's -----------------------------------


@pytest.mark.parametrize("caught_as", [KeyError, ValueError, MissingBasisError])
def test_a_missing_basis_is_a_key_error_and_a_value_error(caught_as):
    with pytest.raises(caught_as, match=r"^Basis 'X_umap' is not in adata.obsm"):
        integrate(make_adata(), basis="X_umap")


@pytest.mark.parametrize("caught_as", [KeyError, ValueError, MissingColumnError])
def test_a_missing_column_is_a_key_error_and_a_value_error(caught_as):
    with pytest.raises(caught_as, match=r"'sample' is not a column of adata\.obs"):
        harmony_integrate(make_adata(), "sample", device="cpu")


@pytest.mark.parametrize("caught_as", [TypeError, ValueError, WrongTypeError])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"theta": "2"},
        {"sigma": "0.1"},
        {"max_iter_harmony": 2.5},
        {"verbose": "yes"},
        {"random_state": "0"},
        {"basis": 3},
    ],
    ids=["theta", "sigma", "max_iter_harmony", "verbose", "random_state", "basis"],
)
def test_a_wrong_type_is_a_type_error_and_a_value_error(kwargs, caught_as):
    with pytest.raises(caught_as):
        harmony_integrate(make_adata(), "batch", **kwargs)


def test_a_key_of_the_wrong_type_is_a_type_error_and_a_value_error():
    with pytest.raises(
        ValueError, match=r"must be the name of an obs column \(a str\) or a list of names"
    ):
        harmony_integrate(make_adata(), ["batch", 3])
    with pytest.raises(TypeError):
        harmony_integrate(make_adata(), ["batch", 3])
