"""What a run records in ``adata.uns['harmony']``: parameters used, convergence, versions.

Layout (every value is writable to h5ad; ``None`` is stored as such, which needs anndata >= 0.12)::

    params       the checked parameters (theta as a list)
    keys         the batch keys, in order
    resolved     n_clusters, block_size, correction_method, random_state, device, device_name,
                 device_reason (why that device, e.g. why 'auto' fell back to the CPU), dtype,
                 n_cells, n_pcs, n_levels (per key)
    converged    bool; n_rounds: int
    objective_rose_last_round
                 bool: the last round raised the objective; with converged true, the loop stopped
                 on that rise (the stopping rule of R harmony) rather than on a settled objective
    iterations   columns, one row per clustering iteration (round 0 = initialisation):
                 round, iteration, objective, kmeans, entropy, diversity
    rounds       columns, one row per round (round 0 = initialisation):
                 round, inner_iterations, inner_converged, objective, kmeans, entropy, diversity
    versions     :func:`software_versions`: harmony_step, Python, the libraries that shape the
                 result, and cupy / CUDA on the GPU
    peak_gpu_memory_bytes   high-water mark of CuPy's memory pool (0 on the CPU)

Nothing here depends on the clock: the same input, parameters and seed on the same machine give
the same record, so files that carry it are byte-identical across reruns. Timings are logged
instead (:func:`log_timings`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from harmony_step._backend import Backend
from harmony_step._batches import BatchDesign
from harmony_step._core.result import HarmonyResult, RoundRecord
from harmony_step._params import HarmonyParams
from harmony_step._version import __version__

_LIBRARIES = ("numpy", "scipy", "pandas", "anndata", "h5py", "numba")

progress_log = logging.getLogger("harmony_step.progress")


def software_versions(backend: Backend) -> dict[str, str]:
    """Versions of harmony-step, Python and the libraries that shape a result, by name.

    The libraries are read from installed metadata (``"none"`` when one is not installed); on the
    GPU, ``backend`` adds CuPy and the CUDA runtime and driver versions.
    """
    import platform
    from importlib import metadata

    versions = {"harmony_step": __version__, "python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "none"
    versions.update(backend.versions())
    return versions


def objective_rose_last_round(rounds: list[RoundRecord]) -> bool:
    """True when the objective after the last round is above the one before it.

    The outer loop's stopping test is signed (as in R harmony and rapids-singlecell), so such a
    rise also counts as convergence; this flag tells the two apart.
    """
    return len(rounds) >= 2 and rounds[-1].objective.total > rounds[-2].objective.total


def build_provenance(
    result: HarmonyResult, design: BatchDesign, params: HarmonyParams, backend: Backend
) -> dict[str, Any]:
    """The ``uns['harmony']`` record of a run (layout in the module documentation).

    Parameters
    ----------
    result
        What :func:`harmony_step._core.run_harmony` returned.
    design
        The batch design the run used (keys and level counts).
    params
        The checked parameters of the run.
    backend
        The backend the run used (device kind, name and versions).
    """
    iterations = result.iterations
    rounds = result.rounds
    return {
        "params": params.to_dict(),
        "keys": list(design.keys),
        "resolved": {
            "n_clusters": result.n_clusters,
            "block_size": result.block_size,
            "correction_method": result.correction_method,
            "random_state": result.random_state,
            "device": backend.kind,
            "device_name": backend.name,
            "device_reason": backend.reason or None,
            "dtype": params.dtype,
            "n_cells": int(result.embedding.shape[0]),
            "n_pcs": int(result.embedding.shape[1]),
            "n_levels": np.asarray(design.n_levels, dtype=np.int64),
        },
        "converged": bool(result.converged),
        "objective_rose_last_round": objective_rose_last_round(rounds),
        "n_rounds": len(rounds) - 1,
        "iterations": {
            "round": np.array([r.round for r in iterations], dtype=np.int64),
            "iteration": np.array([r.iteration for r in iterations], dtype=np.int64),
            "objective": np.array([r.objective.total for r in iterations]),
            "kmeans": np.array([r.objective.kmeans for r in iterations]),
            "entropy": np.array([r.objective.entropy for r in iterations]),
            "diversity": np.array([r.objective.diversity for r in iterations]),
        },
        "rounds": {
            "round": np.array([r.round for r in rounds], dtype=np.int64),
            "inner_iterations": np.array([r.inner_iterations for r in rounds], dtype=np.int64),
            "inner_converged": np.array([r.inner_converged for r in rounds], dtype=bool),
            "objective": np.array([r.objective.total for r in rounds]),
            "kmeans": np.array([r.objective.kmeans for r in rounds]),
            "entropy": np.array([r.objective.entropy for r in rounds]),
            "diversity": np.array([r.objective.diversity for r in rounds]),
        },
        "versions": software_versions(backend),
        "peak_gpu_memory_bytes": int(result.peak_pool_bytes),
    }


def format_seconds(seconds: Mapping[str, float]) -> str:
    """``name 1.23 s, ...`` for a mapping of phase names to seconds."""
    return ", ".join(f"{name} {float(value):.3g} s" for name, value in seconds.items())


def log_timings(result: HarmonyResult) -> None:
    """One progress line with the seconds of each Harmony phase (kept out of ``uns``).

    The record also carries them as the field ``harmony_timings`` (phase name -> seconds), for a
    caller that wants the numbers rather than the line.
    """
    timings = {name: float(value) for name, value in result.timings.items()}
    progress_log.info(
        "Harmony timings: %s", format_seconds(timings), extra={"harmony_timings": timings}
    )
