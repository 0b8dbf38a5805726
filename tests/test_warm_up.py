"""The GPU warm-up that runs while the step reads its input (harmony_step/_step/warm_up.py)."""

from __future__ import annotations

import logging
import threading
import warnings

import numpy as np
import pytest

from harmony_step._backend import select_backend
from harmony_step._params import HarmonyParams
from harmony_step._step.progress import PROGRESS_LOGGER
from harmony_step._step.warm_up import GpuWarmUp, exercise, warm_up


def _warm_up_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "harmony-step-warm-up"]


@pytest.mark.parametrize("values", [{"device": "cpu"}, {"device": "gpu", "n_gpus": 2}])
def test_no_warm_up_for_the_cpu_or_several_gpus(values):
    params = HarmonyParams.create(**values)
    GpuWarmUp(params)
    assert _warm_up_threads() == []
    assert warm_up(HarmonyParams.create(device="cpu")) is False


def test_the_warm_up_logs_nothing(caplog):
    """Whatever the machine: a fall-back line (no GPU) or the warm-up's rounds (a GPU) stay out."""
    caplog.set_level(logging.DEBUG, logger=PROGRESS_LOGGER)
    started = GpuWarmUp(HarmonyParams.create(device="auto"))
    started.wait()
    assert [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER] == []
    logging.getLogger(PROGRESS_LOGGER).info("after the warm-up")  # the filter is gone again
    assert [r.getMessage() for r in caplog.records] == ["after the warm-up"]


@pytest.mark.parametrize("flavor", ["harmony2", "harmony1"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_warm_up_work_converges_without_a_warning(dtype, flavor):
    """Its one round must converge, or the run's log would show a non-convergence warning."""
    params = HarmonyParams.create(dtype=dtype, flavor=flavor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exercise(params, select_backend("cpu"))


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:Harmony did not converge")
def test_a_run_after_the_warm_up_gives_the_same_bits(data_dir):
    import anndata as ad

    import harmony_step

    adata = ad.read_h5ad(data_dir / "pbmc_3500" / "pbmc_3500.h5ad")
    harmony_step.harmony_integrate(adata, "donor", device="gpu", max_iter_harmony=3)
    first = np.array(adata.obsm["X_pca_harmony"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warm_up(HarmonyParams.create(device="gpu")) is True
    harmony_step.harmony_integrate(adata, "donor", device="gpu", max_iter_harmony=3)
    assert np.array_equal(np.array(adata.obsm["X_pca_harmony"]), first)
