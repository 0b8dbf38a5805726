"""Agreement measures used against the reference outputs (tests/data/README.md)."""

from __future__ import annotations

import numpy as np


def min_pc_correlation(ours: np.ndarray, reference: np.ndarray) -> float:
    """Smallest per-PC Pearson correlation."""
    return min(float(np.corrcoef(ours[:, j], reference[:, j])[0, 1]) for j in range(ours.shape[1]))


def relative_frobenius(ours: np.ndarray, reference: np.ndarray) -> float:
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


# The fields every summary JSON must carry (the command-line contract).
SUMMARY_KEYS = frozenset(
    {
        "converged", "objective_rose_last_round", "n_rounds", "inner_iterations", "final_objective",
        "parameters", "device", "versions", "input_sha256", "peak_gpu_memory_bytes", "metrics",
        "environment",
    }
)  # fmt: skip

# The files the workflow writes per dataset under results/<name>/.
RESULT_FILES = (
    "integrated.h5ad",
    "convergence.tsv",
    "summary.json",
    "convergence.png",
    "params.yaml",
    "mixing_metrics.html",
    "embedding.png",
)

# The results that are byte-identical when the same input, parameters and seed run again.
REPRODUCIBLE_FILES = ("integrated.h5ad", "convergence.tsv", "summary.json", "params.yaml")
