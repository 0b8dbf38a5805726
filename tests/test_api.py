"""harmony_integrate on real data: agreement with R harmony, determinism, strategies, devices."""

from __future__ import annotations

import inspect
import warnings

import anndata as ad
import numpy as np
import pytest

import harmony_step
from harmony_step import HarmonyConvergenceWarning, harmony_integrate
from tests.reference import min_pc_correlation, relative_frobenius

DATASETS = {"pbmc_3500": "donor", "cell_lines": "dataset"}
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)]
DTYPES = [pytest.param(np.float64, id="float64"), pytest.param(np.float32, id="float32")]
# The larger dataset's runs are in the slow set; `pytest -m "not slow"` checks pbmc_3500 alone.
NAMES = [
    pytest.param(name, id=name, marks=[pytest.mark.slow] * (name == "cell_lines"))
    for name in DATASETS
]


def load(data_dir, name: str) -> ad.AnnData:
    return ad.read_h5ad(data_dir / name / f"{name}.h5ad")


def integrate(adata: ad.AnnData, key, **kwargs) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HarmonyConvergenceWarning)
        harmony_integrate(adata, key, **kwargs)
    return adata.obsm[kwargs.get("adjusted_basis", "X_pca_harmony")]


def test_signature_is_the_published_one():
    expected = (
        "(adata: 'AnnData', key: 'str | list[str]', *, basis: 'str' = 'X_pca', "
        "adjusted_basis: 'str' = 'X_pca_harmony', dtype: 'Any' = <class 'numpy.float64'>, "
        "flavor: 'str' = 'harmony2', n_clusters: 'int | None' = None, max_iter_harmony: 'int' = 10, "
        "max_iter_clustering: 'int' = 200, tol_harmony: 'float' = 0.0001, tol_clustering: 'float' = 1e-05, "
        "sigma: 'float' = 0.1, theta: 'float | list[float]' = 2.0, tau: 'float' = 0, "
        "ridge_lambda: 'float' = 1.0, alpha: 'float' = 0.2, batch_prune_threshold: 'float | None' = 1e-05, "
        "correction_method: 'str | None' = None, colsum_algo: 'str | None' = None, "
        "block_proportion: 'float' = 0.05, random_state: 'int | None' = 0, verbose: 'bool' = False, "
        "device: 'str' = 'auto', n_gpus: 'int' = 1) -> 'None'"
    )
    assert str(inspect.signature(harmony_integrate)) == expected
    names = list(inspect.signature(harmony_integrate).parameters)
    assert names[:2] == ["adata", "key"]
    defaults = {n: p.default for n, p in inspect.signature(harmony_integrate).parameters.items()}
    assert defaults["dtype"] is np.float64
    assert defaults["tau"] == 0
    assert defaults["random_state"] == 0
    assert defaults["n_gpus"] == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_harmony2_agrees_with_r_harmony_2(data_dir, name, dtype, device):
    adata = load(data_dir, name)
    ours = integrate(adata, DATASETS[name], dtype=dtype, device=device)
    reference = adata.obsm["X_pca_harmony_R_2.0.4_seed1"]
    r, rel = min_pc_correlation(ours, reference), relative_frobenius(ours, reference)
    print(f"{name} {np.dtype(dtype).name} {device}: min r {r:.4f}, rel F {rel:.4f}")
    assert r >= 0.995
    assert rel <= 0.05
    assert ours.dtype == np.dtype(dtype)
    assert ours.shape == adata.obsm["X_pca"].shape


def test_harmony1_agrees_with_pre_2_r_harmony(data_dir):
    adata = load(data_dir, "pbmc_3500")
    ours = integrate(adata, "donor", flavor="harmony1", device="cpu")
    reference = adata.obsm["X_pca_harmony_R_v1_shipped"]
    assert min_pc_correlation(ours, reference) >= 0.99
    assert relative_frobenius(ours, reference) <= 0.06


def test_correction_moves_the_embedding_towards_r(data_dir):
    """The uncorrected input is far from R's output (min r 0.825); ours must be much closer."""
    adata = load(data_dir, "pbmc_3500")
    reference = adata.obsm["X_pca_harmony_R_2.0.4_seed1"]
    before = relative_frobenius(adata.obsm["X_pca"], reference)
    after = relative_frobenius(integrate(adata, "donor", device="cpu"), reference)
    assert before > 0.2
    assert after < before / 4


@pytest.mark.parametrize("device", DEVICES)
def test_strategies_agree_in_float64(data_dir, device):
    adata = load(data_dir, "pbmc_3500")
    runs = {
        m: integrate(adata, "donor", correction_method=m, max_iter_harmony=4, device=device).copy()
        for m in ("original", "fast", "batched")
    }
    for method in ("original", "fast"):
        assert relative_frobenius(runs[method], runs["batched"]) <= 1e-10, method
    assert adata.uns["harmony"]["resolved"]["correction_method"] == "batched"


@pytest.mark.parametrize("algo", ["columns", "atomics", "gemm", "benchmark"])
def test_colsum_algo_does_not_change_results(data_dir, algo):
    adata = load(data_dir, "pbmc_3500")
    base = integrate(adata, "donor", max_iter_harmony=2, device="cpu").copy()
    assert np.array_equal(
        integrate(adata, "donor", max_iter_harmony=2, colsum_algo=algo, device="cpu"), base
    )


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reruns_are_bitwise_identical(data_dir, device, dtype):
    adata = load(data_dir, "cell_lines")
    first = integrate(adata, "dataset", dtype=dtype, device=device, random_state=7).copy()
    second = integrate(adata, "dataset", dtype=dtype, device=device, random_state=7)
    assert np.array_equal(first, second)
    other_seed = integrate(adata, "dataset", dtype=dtype, device=device, random_state=8)
    assert not np.array_equal(first, other_seed)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(DATASETS))
def test_gpu_matches_cpu(data_dir, name):
    """float64: the GPU and CPU results agree closely. float32: the two sum in different orders,
    so they agree only to float32's own noise on these runs, measured as the distance of the CPU's
    float32 result from the float64 one (a run that stops early amplifies it), and to 1e-4 where
    that noise is smaller; the GPU's float32 result must be as close to float64."""
    adata = load(data_dir, name)
    key = DATASETS[name]
    cpu64 = integrate(adata, key, dtype=np.float64, device="cpu").copy()
    gpu64 = integrate(adata, key, dtype=np.float64, device="gpu").copy()
    assert adata.uns["harmony"]["resolved"]["device"] == "gpu"
    cpu32 = integrate(adata, key, dtype=np.float32, device="cpu").copy()
    gpu32 = integrate(adata, key, dtype=np.float32, device="gpu").copy()
    noise = relative_frobenius(cpu32, cpu64)
    print(
        f"{name}: GPU vs CPU rel F float64 {relative_frobenius(gpu64, cpu64):.2e}, float32 "
        f"{relative_frobenius(gpu32, cpu32):.2e}; float32 vs float64: CPU {noise:.2e}, "
        f"GPU {relative_frobenius(gpu32, gpu64):.2e}"
    )
    assert relative_frobenius(gpu64, cpu64) <= 1e-6
    assert relative_frobenius(gpu32, gpu64) <= max(2 * noise, 1e-4)
    assert relative_frobenius(gpu32, cpu32) <= max(3 * noise, 1e-4)


def test_uns_records_parameters_history_and_versions(data_dir):
    adata = load(data_dir, "pbmc_3500")
    integrate(adata, "donor", device="cpu", max_iter_harmony=3)
    record = adata.uns["harmony"]
    resolved = record["resolved"]
    assert resolved["n_clusters"] == 100
    assert resolved["block_size"] == 175
    assert resolved["device"] == "cpu"
    assert resolved["dtype"] == "float64"
    assert resolved["random_state"] == 0
    assert record["params"]["batch_prune_threshold"] == 1e-5
    rounds, iterations = record["rounds"], record["iterations"]
    assert rounds["round"].tolist() == list(range(record["n_rounds"] + 1))
    assert iterations["iteration"].size == 1 + rounds["inner_iterations"].sum()
    parts = iterations["kmeans"] + iterations["entropy"] + iterations["diversity"]
    np.testing.assert_allclose(iterations["objective"], parts)
    assert record["versions"]["harmony_step"] == harmony_step.__version__
    # nothing that depends on the clock: timings are logged, not stored
    assert "timings" not in record
    assert "seconds" not in iterations


def test_result_can_be_written_to_h5ad(data_dir, tmp_path):
    adata = load(data_dir, "pbmc_3500")
    integrate(adata, "donor", device="cpu", max_iter_harmony=2, random_state=None)
    path = tmp_path / "out.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert np.array_equal(back.obsm["X_pca_harmony"], adata.obsm["X_pca_harmony"])
    assert back.uns["harmony"]["params"]["random_state"] is None
    assert back.uns["harmony"]["resolved"]["random_state"] >= 0


def test_not_converging_is_a_warning(data_dir):
    adata = load(data_dir, "pbmc_3500")
    with pytest.warns(HarmonyConvergenceWarning, match="max_iter_harmony=1"):
        harmony_integrate(adata, "donor", max_iter_harmony=1, device="cpu")
    assert adata.uns["harmony"]["converged"] is False or not adata.uns["harmony"]["converged"]


def test_verbose_prints_rounds(data_dir, capsys):
    adata = load(data_dir, "pbmc_3500")
    integrate(adata, "donor", max_iter_harmony=2, verbose=True, device="cpu")
    out = capsys.readouterr().out
    assert "round 1/2" in out
    assert "objective" in out


@pytest.mark.parametrize(
    ("name", "r_ilisi"),
    [("pbmc_3500", 2.32), pytest.param("cell_lines", 1.73, marks=pytest.mark.slow)],
)
def test_mixing_matches_r_harmony(data_dir, name, r_ilisi):
    """Median iLISI (perplexity 30) within 0.05 of R harmony 2.0.4's; cell types stay apart."""
    from harmony_step._step.metrics import lisi

    adata = load(data_dir, name)
    ours = integrate(adata, DATASETS[name], device="cpu")
    ilisi = float(np.median(lisi(ours, adata.obs[DATASETS[name]].to_numpy())))
    print(f"{name}: median iLISI ours {ilisi:.3f}, R {r_ilisi}")
    assert abs(ilisi - r_ilisi) <= 0.05
    if "cell_type" in adata.obs:
        assert float(np.median(lisi(ours, adata.obs["cell_type"].to_numpy()))) <= 1.02


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_input_streamed_from_host_memory_gives_the_same_result(data_dir, dtype):
    """Under a memory-pool limit that cannot hold X beside Z_hat and R, X stays in host memory
    and is streamed each round; the result matches the run with X on the device."""
    import cupy

    from harmony_step._core import raw

    adata = load(data_dir, "pbmc_3500")
    resident = integrate(adata, "donor", dtype=dtype, device="gpu").copy()
    pool = cupy.get_default_memory_pool()
    shape = adata.obsm["X_pca"].shape
    assert raw.keep_on_device(cupy, shape, 100, np.dtype(dtype), n_keys=1, n_levels=3)
    pool.set_limit(size=200 << 20)  # below the planned bytes (their fixed 384 MiB share alone)
    try:
        assert not raw.keep_on_device(cupy, shape, 100, np.dtype(dtype), n_keys=1, n_levels=3)
        streamed = integrate(adata, "donor", dtype=dtype, device="gpu")
    finally:
        pool.set_limit(size=0)
    tolerance = 1e-10 if dtype == np.float64 else 1e-4
    assert relative_frobenius(streamed, resident) <= tolerance
