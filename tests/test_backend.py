"""Device selection: the reason for the device is recorded, and a hidden GPU gets the right advice."""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest

from harmony_step import HarmonyConvergenceWarning, _backend, harmony_integrate
from harmony_step._backend import GPUUnavailableError, probe_cupy, select_backend
from tests.test_validation import small_adata


def fake_cupy(error: Exception | None = None, devices: int = 1) -> types.ModuleType:
    """A stand-in for CuPy whose CUDA calls fail with ``error``."""

    def device_count() -> int:
        if error is not None:
            raise error
        return devices

    module = types.ModuleType("cupy")
    module.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=device_count))
    return module


INSUFFICIENT = RuntimeError(
    "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"
)


def test_hidden_gpu_advises_nv_and_gpus():
    cupy, reason = probe_cupy(fake_cupy(INSUFFICIENT), lambda: False)
    assert cupy is None
    assert reason.startswith("CuPy is installed but no NVIDIA driver or GPU device is visible here")
    assert "--nv (Apptainer" in reason
    assert "--gpus all (Docker)" in reason


def test_a_visible_driver_that_fails_keeps_the_cuda_message():
    cupy, reason = probe_cupy(fake_cupy(INSUFFICIENT), lambda: True)
    assert cupy is None
    assert reason == f"CuPy cannot use the GPU: {INSUFFICIENT}"
    assert "--nv" not in reason


def test_no_device_with_a_visible_driver():
    _, reason = probe_cupy(fake_cupy(devices=0), lambda: True)
    assert reason == "CuPy cannot use the GPU: CuPy found no CUDA device"


def hidden_gpu(monkeypatch):
    reason = probe_cupy(fake_cupy(INSUFFICIENT), lambda: False)[1]
    monkeypatch.setattr(_backend, "_cupy_or_reason", lambda: (None, reason))
    return reason


def test_gpu_requested_in_a_container_without_the_gpu_says_how_to_show_it(monkeypatch):
    hidden_gpu(monkeypatch)
    with pytest.raises(
        GPUUnavailableError,
        match=r"device='gpu' was requested but no GPU can be used: CuPy is installed but no "
        r"NVIDIA driver.*--nv \(Apptainer.*--gpus all \(Docker\)",
    ):
        select_backend("gpu")


def test_auto_falling_back_from_a_hidden_gpu_logs_one_warning_line_and_keeps_the_reason(
    monkeypatch, caplog
):
    reason = hidden_gpu(monkeypatch)
    with caplog.at_level(logging.INFO, logger="harmony_step.progress"):
        backend = select_backend("auto")
    assert backend.kind == "cpu"
    assert backend.reason == f"device='auto' is running on the CPU: {reason}"
    records = [r for r in caplog.records if r.name == "harmony_step.progress"]
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.WARNING, backend.reason)]


def test_auto_without_cupy_logs_an_info_line(monkeypatch, caplog):
    reason = (
        "CuPy is not installed (No module named 'cupy'); install harmony-step[cuda12] or [cuda13]"
    )
    monkeypatch.setattr(_backend, "_cupy_or_reason", lambda: (None, reason))
    with caplog.at_level(logging.INFO, logger="harmony_step.progress"):
        backend = select_backend("auto")
    assert backend.reason == f"device='auto' is running on the CPU: {reason}"
    assert [r.levelno for r in caplog.records if r.name == "harmony_step.progress"] == [
        logging.INFO
    ]


def test_cpu_requested_says_so_and_logs_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="harmony_step.progress"):
        backend = select_backend("cpu")
    assert backend.reason == "device='cpu' was requested"
    assert not caplog.records


def test_the_reason_reaches_uns(monkeypatch):
    reason = hidden_gpu(monkeypatch)
    adata = small_adata()
    with pytest.warns(HarmonyConvergenceWarning):
        harmony_integrate(adata, "batch", max_iter_harmony=1)
    resolved = adata.uns["harmony"]["resolved"]
    assert resolved["device"] == "cpu"
    assert resolved["device_reason"] == f"device='auto' is running on the CPU: {reason}"
    assert np.isfinite(adata.obsm["X_pca_harmony"]).all()
