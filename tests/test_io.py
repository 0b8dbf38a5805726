"""h5ad reading of only the needed parts, staged atomic writes, copies with added results."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from anndata.io import write_elem

from harmony_step._step.files import (
    H5adError,
    StagedOutputs,
    check_output_path,
    read_harmony_inputs,
    sha256_file,
    write_into_copy,
    write_small_h5ad,
)


@pytest.fixture(scope="module")
def pbmc(data_dir) -> Path:
    return data_dir / "pbmc_3500" / "pbmc_3500.h5ad"


def _write(path: Path, n_cells: int = 50, *, basis=None, obs=None, with_x: bool = True) -> Path:
    """A small real h5ad file with an X, obs columns 'batch' and 'kind', and obsm['X_pca']."""
    rng = np.random.default_rng(0)
    frame = obs
    if frame is None:
        frame = pd.DataFrame(
            {
                "batch": pd.Categorical(rng.choice(["a", "b"], n_cells)),
                "kind": rng.choice(["t", "b"], n_cells),
            },
            index=[f"cell{i}" for i in range(n_cells)],
        )
    x = rng.normal(size=(n_cells, 7)).astype(np.float32) if with_x else None
    obsm = {"X_pca": rng.normal(size=(n_cells, 5)) if basis is None else basis}
    ad.AnnData(X=x, obs=frame, obsm=obsm).write_h5ad(path)
    return path


# --- reading -------------------------------------------------------------------------------------


def test_reads_only_the_basis_and_the_requested_columns(pbmc):
    adata = read_harmony_inputs(pbmc, "X_pca", ["donor", "donor"])
    assert adata.X is None
    assert list(adata.obs.columns) == ["donor"]
    assert list(adata.obsm.keys()) == ["X_pca"]
    full = ad.read_h5ad(pbmc)
    np.testing.assert_array_equal(adata.obsm["X_pca"], full.obsm["X_pca"])
    assert list(adata.obs_names) == list(full.obs_names)
    assert adata.obs["donor"].equals(full.obs["donor"])


def test_reads_string_and_categorical_columns(tmp_path):
    path = _write(tmp_path / "in.h5ad")
    adata = read_harmony_inputs(path, "X_pca", ["batch", "kind"])
    assert isinstance(adata.obs["batch"].dtype, pd.CategoricalDtype)
    assert set(adata.obs["kind"]) <= {"t", "b"}
    assert adata.obs_names[0] == "cell0"


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_harmony_inputs(tmp_path / "absent.h5ad", "X_pca", ["batch"])


def test_text_file_is_not_hdf5(tmp_path):
    path = tmp_path / "text.h5ad"
    path.write_text("cell,batch\n1,a\n")
    with pytest.raises(H5adError, match="not an HDF5 file"):
        read_harmony_inputs(path, "X_pca", ["batch"])


def test_truncated_file_is_reported_as_truncated(tmp_path, pbmc):
    path = tmp_path / "cut.h5ad"
    path.write_bytes(pbmc.read_bytes()[:100_000])
    with pytest.raises(H5adError, match="truncated"):
        read_harmony_inputs(path, "X_pca", ["donor"])


def test_hdf5_file_without_anndata_layout_is_rejected(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as handle:
        handle["numbers"] = np.arange(3)
    with pytest.raises(H5adError, match="no 'obs' group"):
        read_harmony_inputs(path, "X_pca", ["batch"])


def test_missing_basis_lists_available_keys(tmp_path):
    path = _write(tmp_path / "in.h5ad")
    with pytest.raises(KeyError, match=r"'X_umap' is not in obsm.*\['X_pca'\]"):
        read_harmony_inputs(path, "X_umap", ["batch"])


def test_missing_column_lists_available_columns(tmp_path):
    path = _write(tmp_path / "in.h5ad")
    with pytest.raises(KeyError, match=r"\['donor'\] are not in obs.*'batch', 'kind'"):
        read_harmony_inputs(path, "X_pca", ["batch", "donor"])


def test_one_dimensional_basis_is_rejected(tmp_path):
    path = _write(tmp_path / "in.h5ad")
    with h5py.File(path, "r+") as handle:
        del handle["obsm/X_pca"]
        write_elem(handle["obsm"], "X_pca", np.zeros(50))
    with pytest.raises(ValueError, match=r"must be 2-D .*\(50,\)"):
        read_harmony_inputs(path, "X_pca", ["batch"])


def test_basis_with_wrong_row_count_is_rejected(tmp_path):
    path = _write(tmp_path / "in.h5ad")
    with h5py.File(path, "r+") as handle:
        del handle["obsm/X_pca"]
        write_elem(handle["obsm"], "X_pca", np.zeros((49, 3)))
    with pytest.raises(ValueError, match="49 rows but obs has 50"):
        read_harmony_inputs(path, "X_pca", ["batch"])


def test_sha256_file_matches_hashlib(pbmc):
    assert sha256_file(pbmc) == hashlib.sha256(pbmc.read_bytes()).hexdigest()


# --- checking destinations -----------------------------------------------------------------------


def test_check_output_path_accepts_a_writable_folder_and_leaves_nothing(tmp_path):
    check_output_path(tmp_path / "out.h5ad", "output")
    assert list(tmp_path.iterdir()) == []


def test_check_output_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_output_path(tmp_path / "no" / "out.h5ad", "output")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        check_output_path(tmp_path / "file" / "out.h5ad", "output")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_output_path(tmp_path, "output")


def test_check_output_path_refuses_an_unwritable_folder(locked_folder):
    with pytest.raises(PermissionError, match="Cannot write output into folder"):
        check_output_path(locked_folder / "out.h5ad", "output")


# --- staged outputs ------------------------------------------------------------------------------


def test_staged_outputs_appear_together_on_commit(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    with StagedOutputs() as staged:
        staged.temporary(first).write_text("one")
        staged.temporary(second).write_text("two")
        assert not first.exists()
        assert not second.exists()
        hidden = sorted(p.name for p in tmp_path.iterdir())
        assert all(name.startswith(".") and name.endswith(".tmp") for name in hidden)
        staged.commit()
    assert first.read_text() == "one"
    assert second.read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_staged_outputs_have_umask_permissions(tmp_path):
    target = tmp_path / "a.txt"
    with StagedOutputs() as staged:
        staged.temporary(target).write_text("x")
        staged.commit()
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_staged_outputs_leave_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("previous result")

    def fail_half_way() -> None:
        with StagedOutputs() as staged:
            staged.temporary(target).write_text("half")
            staged.temporary(tmp_path / "other.txt").write_text("half")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_half_way()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    assert target.read_text() == "previous result"


# --- writing results -----------------------------------------------------------------------------


def test_write_into_copy_adds_results_and_keeps_everything_else(tmp_path):
    source = _write(tmp_path / "in.h5ad")
    before = sha256_file(source)
    corrected = np.arange(250, dtype=np.float64).reshape(50, 5)
    uns = {"converged": True, "none_value": "none", "table": {"x": np.arange(3)}}
    target = tmp_path / "out.h5ad"
    write_into_copy(source, target, {"X_pca_harmony": corrected}, {"harmony": uns})
    assert sha256_file(source) == before
    original, result = ad.read_h5ad(source), ad.read_h5ad(target)
    np.testing.assert_array_equal(result.X, original.X)
    np.testing.assert_array_equal(result.obsm["X_pca"], original.obsm["X_pca"])
    np.testing.assert_array_equal(result.obsm["X_pca_harmony"], corrected)
    assert bool(result.uns["harmony"]["converged"]) is True
    assert result.uns["harmony"]["none_value"] == "none"
    np.testing.assert_array_equal(result.uns["harmony"]["table"]["x"], np.arange(3))
    pd.testing.assert_frame_equal(result.obs, original.obs)


def test_write_into_copy_replaces_an_existing_result(tmp_path):
    source = _write(tmp_path / "in.h5ad")
    first = tmp_path / "first.h5ad"
    write_into_copy(source, first, {"X_pca_harmony": np.zeros((50, 5))}, {"harmony": {"run": 1}})
    second = tmp_path / "second.h5ad"
    write_into_copy(first, second, {"X_pca_harmony": np.ones((50, 2))}, {"harmony": {"run": 2}})
    result = ad.read_h5ad(second)
    np.testing.assert_array_equal(result.obsm["X_pca_harmony"], np.ones((50, 2)))
    assert result.uns["harmony"] == {"run": 2}


def test_write_into_copy_creates_a_missing_uns_group(tmp_path):
    source = _write(tmp_path / "in.h5ad")
    with h5py.File(source, "r+") as handle:
        del handle["uns"]
    target = tmp_path / "out.h5ad"
    write_into_copy(source, target, {"X_pca_harmony": np.zeros((50, 5))}, {"harmony": {"a": 1}})
    assert ad.read_h5ad(target).uns["harmony"] == {"a": 1}


def test_write_small_h5ad_holds_no_x(tmp_path):
    adata = read_harmony_inputs(_write(tmp_path / "in.h5ad"), "X_pca", ["batch"])
    adata.obsm["X_pca_harmony"] = adata.obsm["X_pca"] * 2
    write_small_h5ad(tmp_path / "small.h5ad", adata)
    with h5py.File(tmp_path / "small.h5ad") as handle:
        assert "X" not in handle
    result = ad.read_h5ad(tmp_path / "small.h5ad")
    assert set(result.obsm.keys()) == {"X_pca", "X_pca_harmony"}
    assert list(result.obs.columns) == ["batch"]
