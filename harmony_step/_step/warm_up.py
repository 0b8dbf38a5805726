"""The GPU made ready while the input is read.

A process's first GPU work pays fixed costs that have nothing to do with the data: the CUDA
context, the cuBLAS handle, loading each kernel module (from CuPy's disk cache, or compiling it)
and the memory pool's first blocks. For a million cells they are about a second, as much as the
Harmony compute itself. The step reads its input first, which keeps the GPU idle, so a thread
meanwhile runs one round of Harmony and the metrics on a few thousand synthetic cells with the
run's dtype, flavor and cluster count: the same kernels, already loaded when the real work begins.

The warm-up changes nothing that the run computes (it shares no arrays with it and the run's
random state is its own), logs nothing (its records are dropped), and its errors are left to the
run itself to meet and report.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import numpy as np

from harmony_step._params import HarmonyParams
from harmony_step._step.progress import PROGRESS_LOGGER

WARM_UP_CELLS = 4000
"""Synthetic cells of the warm-up run (more for K > 133: at least 30 cells per cluster)."""

_WARM_UP_DIMS = 20
_WARM_UP_BATCHES = 4
_DEFAULT_CLUSTERS = 100  # min(100, N / 30) for the inputs large enough to need a warm-up


class GpuWarmUp:
    """Starts the warm-up on a thread when the run will use one GPU; :meth:`wait` joins it.

    Nothing starts for a CPU run or for several GPUs (their work runs in other processes).
    """

    def __init__(self, params: HarmonyParams) -> None:
        self._thread: threading.Thread | None = None
        if params.device == "cpu" or params.n_gpus > 1:
            return
        self._filter = _DropThreadRecords()
        self._thread = threading.Thread(
            target=self._run, args=(params,), name="harmony-step-warm-up", daemon=True
        )
        self._filter.thread = self._thread
        logging.getLogger(PROGRESS_LOGGER).addFilter(self._filter)
        self._thread.start()

    def _run(self, params: HarmonyParams) -> None:
        try:
            warm_up(params)
        except Exception:  # an optimisation only: the run itself meets and reports the error
            return

    def wait(self) -> None:
        """Wait for the warm-up (before the run's own GPU work), then let the log through again."""
        if self._thread is None:
            return
        self._thread.join()
        logging.getLogger(PROGRESS_LOGGER).removeFilter(self._filter)
        self._thread = None


class _DropThreadRecords(logging.Filter):
    """Drops the log records made on one thread (the warm-up's)."""

    thread: threading.Thread | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        return self.thread is None or record.thread != self.thread.ident


def warm_up(params: HarmonyParams) -> bool:
    """One converged round of Harmony and the metrics on synthetic cells, on the GPU that
    ``params.device`` selects; returns False, doing nothing, where the run would use the CPU."""
    from harmony_step._backend import select_backend

    backend = select_backend(params.device)
    if not backend.is_gpu:
        return False
    exercise(params, backend)
    return True


def exercise(params: HarmonyParams, backend: Any) -> None:
    """The warm-up's work on ``backend``: one converged round of Harmony with ``params``' dtype,
    flavor and K on synthetic cells, then the metrics of the result on a sample of them."""
    import pandas as pd

    from harmony_step._batches import encode_batches
    from harmony_step._core.loop import run_harmony
    from harmony_step._step.metrics import metrics_before_after

    n_clusters = params.n_clusters or _DEFAULT_CLUSTERS  # the block kernel is built for K
    n_cells = max(WARM_UP_CELLS, 30 * n_clusters)
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal((n_cells, _WARM_UP_DIMS)).astype(params.numpy_dtype)
    batches = pd.Series(rng.integers(0, _WARM_UP_BATCHES, n_cells).astype(str))
    design = encode_batches(pd.DataFrame({"batch": batches.astype("category")}), ("batch",))
    one_round = dataclasses.replace(
        params,
        n_clusters=n_clusters,
        max_iter_harmony=1,
        max_iter_clustering=2,
        tol_harmony=np.inf,  # converged after the round: no warning
        random_state=0,
        verbose=False,
    )
    result = run_harmony(embedding, design, one_round, backend)
    metrics_before_after(  # on a sample, as a large run takes them
        embedding, result.embedding, batches, batches, batch_key="batch", label_key="batch",
        seed=0, sample_size=n_cells // 2, xp=backend.xp, threads=1,
    )  # fmt: skip
    backend.synchronize()
