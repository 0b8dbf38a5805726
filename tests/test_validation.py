"""Bad input is rejected before any work, with a message naming the problem; adata stays as it was."""

from __future__ import annotations

import copy
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from harmony_step import (
    BatchKeyWarning,
    HarmonyConvergenceWarning,
    HarmonyParameterWarning,
    HarmonyParams,
    ObjectiveRoseWarning,
    harmony_integrate,
)
from harmony_step._backend import GPUUnavailableError, gpu_available
from harmony_step._errors import WrongTypeError


def small_adata(n: int = 60, d: int = 5, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(rng.choice(["a", "b", "c"], n)),
            "donor": rng.choice(["x", "y"], n),
        },
        index=[f"c{i}" for i in range(n)],
    )
    return ad.AnnData(obs=obs, obsm={"X_pca": rng.normal(size=(n, d))})


def snapshot(adata: ad.AnnData) -> tuple:
    return (
        adata.obs.copy(),
        {k: v.copy() for k, v in adata.obsm.items()},
        copy.deepcopy(dict(adata.uns)),
    )


def assert_unchanged(adata: ad.AnnData, before: tuple) -> None:
    obs, obsm, uns = before
    pd.testing.assert_frame_equal(adata.obs, obs)
    assert set(adata.obsm) == set(obsm)
    for key, value in obsm.items():
        np.testing.assert_array_equal(np.asarray(adata.obsm[key]), value)
    assert dict(adata.uns) == uns


BAD_PARAMETERS = [
    (
        {"max_iter_harmony": 0},
        ValueError,
        r"'max_iter_harmony' parameter must be an int in the range \[1, 2\*\*63\)",
    ),
    ({"max_iter_harmony": 2**70}, ValueError, r"'max_iter_harmony'.*Got 1180591620717411303424"),
    ({"max_iter_clustering": 2**63}, ValueError, "'max_iter_clustering'"),
    ({"max_iter_clustering": 0}, ValueError, "'max_iter_clustering'"),
    ({"max_iter_harmony": 2.5}, TypeError, "'max_iter_harmony'"),
    (
        {"block_proportion": 0.0},
        ValueError,
        r"'block_proportion' parameter must be a float in the range \(0, 1\]",
    ),
    ({"block_proportion": 1.5}, ValueError, "'block_proportion'"),
    ({"sigma": 0}, ValueError, r"'sigma' parameter must be a float in the range \(0, inf\)"),
    ({"sigma": -1.0}, ValueError, "Got -1.0 instead"),
    ({"tau": -1}, ValueError, "'tau'"),
    ({"theta": -1.0}, ValueError, "'theta' parameter must be finite and >= 0"),
    ({"theta": float("nan")}, ValueError, "'theta'"),
    ({"theta": "2"}, TypeError, "'theta'"),
    ({"theta": [1.0, 2.0]}, ValueError, r"one value per key \(1\) or one per batch level \(3\)"),
    ({"n_clusters": 0}, ValueError, "'n_clusters'"),
    ({"n_clusters": 61}, ValueError, r"'n_clusters' parameter must be in \[1, n_cells=60\]"),
    ({"alpha": 0.0}, ValueError, "'alpha'"),
    ({"alpha": float("inf")}, ValueError, "'alpha'"),
    ({"batch_prune_threshold": 1.5}, ValueError, "'batch_prune_threshold'"),
    ({"ridge_lambda": 0.0, "flavor": "harmony1"}, ValueError, "'ridge_lambda'"),
    (
        {"flavor": "harmony3"},
        ValueError,
        "'flavor' parameter must be one of 'harmony1', 'harmony2'",
    ),
    ({"correction_method": "magic"}, ValueError, "'correction_method'"),
    ({"colsum_algo": "magic"}, ValueError, "'colsum_algo'"),
    ({"dtype": np.int32}, ValueError, "'dtype' parameter must be numpy.float32 or numpy.float64"),
    (
        {"random_state": -1},
        ValueError,
        r"'random_state' parameter must be an int in the range \[0, 2\*\*32\) or None",
    ),
    ({"random_state": 2**32}, ValueError, r"'random_state'.*Got 4294967296 instead"),
    ({"random_state": 2**64}, ValueError, "'random_state'"),
    ({"random_state": 1.5}, TypeError, "'random_state'"),
    (
        {"adjusted_basis": "X_pca"},
        ValueError,
        r"'adjusted_basis' parameter must differ from 'basis' \('X_pca'\)",
    ),
    (
        {"adjusted_basis": "harmony/X_pca"},
        ValueError,
        r"'adjusted_basis' parameter must be a name h5ad files can store: no '/'.*'harmony_X_pca'",
    ),
    ({"adjusted_basis": "."}, ValueError, "'adjusted_basis'"),
    ({"adjusted_basis": ""}, ValueError, "'adjusted_basis' parameter must be a non-empty str"),
    ({"adjusted_basis": 3}, TypeError, "'adjusted_basis' parameter must be a non-empty str"),
    ({"device": "tpu"}, ValueError, "'device'"),
    ({"n_gpus": 0}, ValueError, r"'n_gpus' parameter must be an int in the range \[1, 2\*\*63\)"),
    ({"n_gpus": 2.0}, TypeError, "'n_gpus'"),
    (
        {"n_gpus": 2, "device": "cpu"},
        ValueError,
        r"'n_gpus' parameter must be 1 with device='cpu' \(the CPU backend runs in one process\)",
    ),
    ({"verbose": "yes"}, TypeError, "'verbose'"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_PARAMETERS)
def test_bad_parameters_are_rejected(kwargs, error, message):
    adata = small_adata()
    before = snapshot(adata)
    with pytest.raises(error, match=message):
        harmony_integrate(adata, "batch", **kwargs)
    assert_unchanged(adata, before)


def test_missing_basis_lists_obsm_keys():
    adata = small_adata()
    before = snapshot(adata)
    with pytest.raises(
        KeyError, match=r"'X_umap' is not in adata.obsm. Available keys: \['X_pca'\]"
    ):
        harmony_integrate(adata, "batch", basis="X_umap")
    assert_unchanged(adata, before)


def test_missing_key_lists_obs_columns():
    adata = small_adata()
    before = snapshot(adata)
    with pytest.raises(
        KeyError,
        match=r"'sample' is not a column of adata.obs. Available columns: \['batch', 'donor'\]",
    ):
        harmony_integrate(adata, ["batch", "sample"])
    assert_unchanged(adata, before)


def test_empty_key_list():
    with pytest.raises(ValueError, match="at least one obs column"):
        harmony_integrate(small_adata(), [])


@pytest.mark.parametrize(
    ("key", "shown"),
    [(None, r"None \(NoneType\)"), (3, r"3 \(int\)"), (b"batch", r"b'batch' \(bytes\)"),
     ({"batch": 1}, r"\{'batch': 1\} \(dict\)"), (["batch", 3], r"3 \(int\) in the list")],
)  # fmt: skip
def test_key_of_a_wrong_type_names_key_and_what_is_accepted(key, shown):
    adata = small_adata()
    before = snapshot(adata)
    with pytest.raises(WrongTypeError, match=r"'key' parameter must be the name of an obs column "
                       r"\(a str\) or a list of names\. Got " + shown):  # fmt: skip
        harmony_integrate(adata, key)
    assert_unchanged(adata, before)


@pytest.mark.parametrize(
    "adata", [None, np.zeros((10, 3)), pd.DataFrame({"batch": ["a", "b"]})], ids=repr
)
def test_adata_that_is_not_an_anndata_names_adata(adata):
    with pytest.raises(WrongTypeError, match=r"^The 'adata' parameter must be an AnnData object"):
        harmony_integrate(adata, "batch")
    with pytest.raises(ValueError, match=type(adata).__name__):  # catchable as scanpy's error
        harmony_integrate(adata, "batch")


def test_missing_values_in_a_key():
    adata = small_adata()
    adata.obs["batch"] = adata.obs["batch"].astype(object)
    adata.obs.iloc[3, 0] = None
    before = snapshot(adata)
    with pytest.raises(ValueError, match="'batch' has 1 missing value"):
        harmony_integrate(adata, "batch")
    assert_unchanged(adata, before)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_basis(bad):
    adata = small_adata()
    adata.obsm["X_pca"][7, 2] = bad
    before = snapshot(adata)
    with pytest.raises(
        ValueError, match=r"non-finite value\(s\) \(NaN or Inf\) in 1 cell\(s\), first at row 7"
    ):
        harmony_integrate(adata, "batch")
    assert_unchanged(adata, before)


def test_float32_overflow_is_caught():
    adata = small_adata()
    adata.obsm["X_pca"][0, 0] = 1e300
    with pytest.raises(ValueError, match=r"beyond the range of float32\. Use dtype=numpy\.float64"):
        harmony_integrate(adata, "batch", dtype=np.float32)


def test_basis_must_be_two_dimensional():
    adata = small_adata()
    adata.obsm["X_bad"] = np.zeros((60, 2, 2))
    before = snapshot(adata)
    with pytest.raises(ValueError, match=r"adata.obsm\['X_bad'\] must be 2-D \(n_cells, n_pcs\)"):
        harmony_integrate(adata, "batch", basis="X_bad")
    assert_unchanged(adata, before)


def test_one_dimensional_basis_from_a_file_is_rejected():
    # AnnData reshapes 1-D obsm values to one column; an array read straight from a file is not.
    from harmony_step._integrate import _embedding_array

    with pytest.raises(ValueError, match=r"must be 2-D \(n_cells, n_pcs\). Got shape \(60,\)"):
        _embedding_array(np.zeros(60), HarmonyParams.create())


def test_one_cell_is_rejected():
    adata = small_adata(n=1)
    before = snapshot(adata)
    with pytest.raises(ValueError, match=r"has 1 cell\(s\); Harmony needs at least 2"):
        harmony_integrate(adata, "batch")
    assert_unchanged(adata, before)


def test_unknown_flavor_specific_parameter_warns():
    adata = small_adata()
    with pytest.warns(UserWarning, match="'ridge_lambda' is ignored by flavor='harmony2'"):
        harmony_integrate(adata, "batch", ridge_lambda=2.0, max_iter_harmony=1, device="cpu")
    with pytest.warns(UserWarning, match="ignored by flavor='harmony1'"):
        harmony_integrate(
            adata, "batch", flavor="harmony1", alpha=0.5, max_iter_harmony=1, device="cpu"
        )


@pytest.mark.skipif(
    gpu_available(), reason="checks the error raised where there is no GPU; a GPU is present"
)
def test_gpu_requested_without_gpu():
    adata = small_adata()
    before = snapshot(adata)
    with pytest.raises(
        GPUUnavailableError, match="device='gpu' was requested but no GPU can be used"
    ):
        harmony_integrate(adata, "batch", device="gpu")
    assert_unchanged(adata, before)


def test_prefaulted_host_buffer_has_the_requested_layout():
    from harmony_step._backend import _touched_empty

    for shape, dtype in [((1, 1), np.float32), ((1000, 7), np.float32), ((5000, 50), np.float64)]:
        out = _touched_empty(shape, np.dtype(dtype))
        assert out.shape == shape
        assert out.dtype == dtype
        assert out.flags.c_contiguous


def test_colsum_algo_is_accepted_with_a_warning_and_not_recorded():
    adata = small_adata()
    with pytest.warns(HarmonyParameterWarning, match="colsum_algo='gemm' has no effect"):
        harmony_integrate(adata, "batch", colsum_algo="gemm", max_iter_harmony=1, device="cpu")
    assert "colsum_algo" not in adata.uns["harmony"]["params"]


def test_layers_are_merged_and_checked_once_naming_where_a_bad_value_came_from():
    layers = [("--params 'p.yaml'", {"sigma": 0.2, "tau": 1, "ridge_lambda": 2.0}),
              ("", {"sigma": 0.3, "ridge_lambda": 3.0})]  # fmt: skip
    with pytest.warns(HarmonyParameterWarning) as shown:
        params = HarmonyParams.resolve(layers)
    assert len(shown) == 1
    assert (params.sigma, params.tau, params.ridge_lambda) == (0.3, 1.0, 3.0)
    with pytest.raises(ValueError, match=r"^--params 'p.yaml': The 'tau' parameter must be"):
        HarmonyParams.resolve([("--params 'p.yaml'", {"tau": -1})])
    with pytest.raises(TypeError, match=r"^--params 'p.yaml': Unknown Harmony parameter"):
        HarmonyParams.resolve([("--params 'p.yaml'", {"colsum_algo": None})])


@pytest.mark.parametrize(
    ("dtype", "value", "limit"),
    [(np.float64, 1e200, "3e\\+153"), (np.float32, 1e19, "4.12e\\+18")],
    ids=["float64", "float32"],
)
def test_values_whose_squares_overflow_are_refused_naming_the_basis_and_the_limit(
    dtype, value, limit
):
    adata = small_adata()
    adata.obsm["X_pca"][4, 1] = value
    before = snapshot(adata)
    with pytest.raises(
        ValueError,
        match=rf"adata.obsm\['X_pca'\] has values up to 1e\+{int(np.log10(value))}, above {limit}, "
        rf"the largest magnitude whose squares {np.dtype(dtype).name} can sum over 5 columns",
    ):
        harmony_integrate(adata, "batch", dtype=dtype, device="cpu")
    assert_unchanged(adata, before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_pcs", [3, 10, 50, 100])
def test_rows_at_the_overflow_limit_keep_unit_norm(dtype, n_pcs):
    from harmony_step._core.setup import largest_safe_value, load_embedding

    limit = largest_safe_value(np.dtype(dtype), n_pcs)
    host = np.full((4, n_pcs), limit, dtype=dtype)
    host[1] *= -1
    _, z_hat = load_embedding(np, host, np.dtype(dtype), "X")
    np.testing.assert_allclose(np.linalg.norm(z_hat.astype(np.float64), axis=1), 1.0, rtol=1e-6)


def test_values_just_below_the_overflow_limit_run():
    from harmony_step._core.setup import largest_safe_value

    adata = small_adata()
    adata.obsm["X_pca"] *= (
        0.5 * largest_safe_value(np.dtype(np.float64), 5) / np.abs(adata.obsm["X_pca"]).max()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        harmony_integrate(adata, "batch", device="cpu", max_iter_harmony=2)
    out = adata.obsm["X_pca_harmony"]
    assert np.isfinite(out).all()
    assert (np.abs(out).sum(axis=1) > 0).all()


def test_an_objective_that_rose_in_the_last_round_is_recorded_and_warned():
    adata = small_adata(n=120, d=4)
    adata.obsm["X_pca"] = np.random.default_rng(0).normal(size=(120, 4))
    with pytest.warns(ObjectiveRoseWarning, match=r"because the objective rose in the last round"):
        harmony_integrate(adata, "batch", device="cpu", max_iter_clustering=3)
    record = adata.uns["harmony"]
    objective = record["rounds"]["objective"]
    assert record["converged"]
    assert objective[-1] > objective[-2]
    assert record["objective_rose_last_round"] is True


def test_a_falling_objective_is_not_flagged():
    from harmony_step._core.result import ObjectiveParts, RoundRecord
    from harmony_step._provenance import objective_rose_last_round

    def rounds(*totals):
        return [RoundRecord(i, 1, False, ObjectiveParts(t, 0.0, 0.0)) for i, t in enumerate(totals)]

    assert not objective_rose_last_round(rounds(3.0, 2.0, 1.0))
    assert not objective_rose_last_round(rounds(3.0, 2.0, 2.0))
    assert objective_rose_last_round(rounds(3.0, 2.0, 2.5))
    assert not objective_rose_last_round(rounds(3.0))


def test_the_result_is_kept_when_the_objective_rise_warning_is_an_error():
    adata = small_adata(n=120, d=4)
    adata.obsm["X_pca"] = np.random.default_rng(0).normal(size=(120, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ObjectiveRoseWarning)
        with pytest.raises(ObjectiveRoseWarning):
            harmony_integrate(adata, "batch", device="cpu", max_iter_clustering=3)
    assert adata.obsm["X_pca_harmony"].shape == (120, 4)
    assert adata.uns["harmony"]["objective_rose_last_round"]


def _cell_key_adata() -> ad.AnnData:
    adata = small_adata(n=120, d=4)
    adata.obs["cell"] = [f"w{i}" for i in range(120)]
    return adata


def _rising_adata() -> ad.AnnData:
    adata = small_adata(n=120, d=4)
    adata.obsm["X_pca"] = np.random.default_rng(0).normal(size=(120, 4))
    return adata


@pytest.mark.parametrize(
    ("category", "make", "kwargs"),
    [
        (HarmonyConvergenceWarning, small_adata, {"key": "batch", "max_iter_harmony": 1}),
        (BatchKeyWarning, _cell_key_adata, {"key": "cell", "max_iter_harmony": 1}),
        (ObjectiveRoseWarning, _rising_adata, {"key": "batch", "max_iter_clustering": 3}),
    ],
    ids=["not-converged", "batch-key", "objective-rose"],
)
def test_warnings_point_at_the_callers_line(category, make, kwargs):
    adata = make()
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        harmony_integrate(adata, device="cpu", **kwargs)
    matching = [w for w in shown if w.category is category]
    assert matching
    assert {w.filename for w in matching} == {__file__}
