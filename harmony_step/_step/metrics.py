"""Integration metrics: LISI (Korsunsky et al. 2019) and silhouette width, before and after Harmony.

LISI is the inverse Simpson index of the labels in a cell's neighbourhood, where neighbours are
weighted by a Gaussian kernel whose width is calibrated so that the distribution has a fixed
perplexity (as in t-SNE). As in R ``lisi::compute_lisi`` 1.0, whose values this module reproduces
to within 1e-6, the neighbour search returns the ``3 * perplexity`` (90) nearest cells, the cell
itself included, and the index is computed over the other 89.

* iLISI (on batch labels) ranges from 1 (one batch around every cell) to the number of batches
  (perfectly mixed): higher is better integration.
* cLISI (on cell-type labels) is 1 when neighbourhoods hold one cell type: lower keeps biology.

Large inputs are subsampled: LISI is evaluated for at most :data:`SAMPLE_SIZE` query cells (their
neighbours are searched among all cells, so neighbourhoods are those of the full data), and the
silhouette width on at most :data:`SAMPLE_SIZE` cells. The sample is drawn from a generator seeded
with the run's random state, so the same run gives the same metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

SAMPLE_SIZE = 20_000
"""Most cells used per metric; inputs above this are subsampled without replacement."""

PERPLEXITY = 30.0
"""Effective number of neighbours of the LISI kernel; the neighbourhood is 3 * perplexity cells."""

_ENTROPY_TOL = 1e-5  # |H - log(perplexity)| accepted by the kernel-width bisection (as in R lisi)
_MAX_BISECTIONS = 50  # R lisi's limit; cells that do not settle keep their last kernel width


def simpson_index(
    distances: np.ndarray,
    neighbour_labels: np.ndarray,
    n_labels: int,
    perplexity: float = PERPLEXITY,
) -> np.ndarray:
    """Simpson index of the labels around each cell under a perplexity-calibrated Gaussian kernel.

    Parameters
    ----------
    distances
        Euclidean distances to the neighbours (the cell itself excluded), shape (n_cells, n_neighbors).
    neighbour_labels
        Integer label (0 .. n_labels - 1) of each neighbour, shape (n_cells, n_neighbors).
    n_labels
        Number of distinct labels.
    perplexity
        Target perplexity of the neighbour weights; larger spreads the weight over more neighbours.

    Returns
    -------
    Simpson index per cell, shape (n_cells,), in (0, 1]; NaN where all kernel weights underflow.
    """
    distances = np.asarray(distances, dtype=np.float64)
    n_cells = distances.shape[0]
    # The kernel precision beta and the entropy are single precision, as in R lisi's C++ code:
    # with doubles the bisection stops one step earlier or later for some cells, which moves
    # their LISI by up to ~3e-6.
    beta = np.ones(n_cells, dtype=np.float32)
    beta_low = np.full(n_cells, -np.inf, dtype=np.float32)
    beta_high = np.full(n_cells, np.inf, dtype=np.float32)
    target = np.float32(math.log(perplexity))
    tolerance = np.float32(_ENTROPY_TOL)
    weights, entropy = _kernel(distances, beta)
    # Bisection on beta, vectorised: every cell takes the same steps as in a per-cell loop and
    # stops once its own entropy is within tolerance of log(perplexity).
    for _ in range(_MAX_BISECTIONS):
        excess = entropy - target
        active = np.abs(excess) > tolerance
        if not active.any():
            break
        sharpen = active & (excess > 0)
        widen = active & ~(excess > 0)
        beta_low[sharpen] = beta[sharpen]
        beta[sharpen] = np.where(
            np.isinf(beta_high[sharpen]),
            beta[sharpen] * 2,
            (beta[sharpen] + beta_high[sharpen]) / 2,
        )
        beta_high[widen] = beta[widen]
        beta[widen] = np.where(
            np.isinf(beta_low[widen]), beta[widen] / 2, (beta[widen] + beta_low[widen]) / 2
        )
        weights[active], entropy[active] = _kernel(distances[active], beta[active])
    # one bin per (cell, label) pair
    cell_label = np.arange(n_cells)[:, None] * n_labels + neighbour_labels
    label_weights = np.bincount(cell_label.ravel(), weights.ravel(), minlength=n_cells * n_labels)
    label_weights = label_weights.reshape(n_cells, n_labels)
    simpson = np.sum(label_weights**2, axis=1)
    simpson[entropy == 0] = np.nan
    return simpson


def _kernel(distances: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised weights exp(-beta d) (float64) and their Shannon entropy (float32), per row.

    A row whose weights all underflow gets zero weights and entropy 0, as in R lisi.
    """
    beta = beta.astype(np.float64)
    raw = np.exp(-distances * beta[:, None])
    total = raw.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):  # rows with total == 0 are reset below
        entropy = (np.log(total) + beta * np.einsum("ij,ij->i", distances, raw) / total).astype(
            np.float32
        )
        weights = raw / total[:, None]
    underflow = total == 0
    entropy[underflow] = 0
    weights[underflow] = 0
    return weights, entropy


def lisi(
    embedding: np.ndarray,
    labels: Any,
    *,
    perplexity: float = PERPLEXITY,
    query: np.ndarray | None = None,
) -> np.ndarray:
    """Local inverse Simpson index of ``labels`` for each (query) cell.

    Parameters
    ----------
    embedding
        Cell coordinates, shape (n_cells, n_dims).
    labels
        One label per cell, shape (n_cells,); any hashable values.
    perplexity
        Effective neighbourhood size; ``3 * perplexity`` nearest cells (the cell itself included)
        are considered.
    query
        Indices of the cells to evaluate (default: all). Neighbours come from all cells.

    Notes
    -----
    The search asks for ``3 * perplexity`` neighbours, the cell itself being the first, and the
    cell itself is then left out of its own neighbourhood, exactly as R ``lisi`` 1.0 does.

    Returns
    -------
    LISI per query cell, between 1 and the number of labels.
    """
    distances, indices = neighbours(embedding, perplexity=perplexity, query=query)
    return lisi_from_neighbours(distances, indices, labels, perplexity=perplexity)


def neighbours(
    embedding: np.ndarray, *, perplexity: float = PERPLEXITY, query: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances and indices of the LISI neighbourhood of each (query) cell, the cell itself left out.

    Returns
    -------
    Distances and indices, each of shape (n_query, 3 * perplexity - 1), nearest first.
    """
    from sklearn.neighbors import NearestNeighbors

    embedding = np.asarray(embedding, dtype=np.float64)
    n_neighbors = min(int(3 * perplexity), embedding.shape[0])
    points = embedding if query is None else embedding[query]
    knn = NearestNeighbors(n_neighbors=n_neighbors).fit(embedding)
    distances, indices = knn.kneighbors(points)
    return distances[:, 1:], indices[:, 1:]  # column 0 is the cell itself, at distance 0


def lisi_from_neighbours(
    distances: np.ndarray, indices: np.ndarray, labels: Any, *, perplexity: float = PERPLEXITY
) -> np.ndarray:
    """LISI of ``labels`` (one per cell of the whole embedding) over precomputed neighbourhoods."""
    codes, n_labels = _codes(labels)
    return 1.0 / simpson_index(distances, codes[indices], n_labels, perplexity)


def _codes(labels: Any) -> tuple[np.ndarray, int]:
    import pandas as pd

    codes, uniques = pd.factorize(np.asarray(labels, dtype=object))
    if (codes < 0).any():
        raise ValueError("LISI labels contain missing values.")
    return codes.astype(np.int64), len(uniques)


def silhouette(
    embedding: np.ndarray, labels: Any, sample: np.ndarray | None = None
) -> float | None:
    """Mean silhouette width of ``labels`` in ``embedding`` (Euclidean); None with < 2 labels.

    For batch labels, values near 0 or below mean well-mixed batches; for cell types, higher means
    better-separated types.
    """
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels, dtype=object)
    points = np.asarray(embedding, dtype=np.float64)
    if sample is not None:
        points, labels = points[sample], labels[sample]
    codes, n_labels = _codes(labels)
    if not 2 <= n_labels <= len(codes) - 1:
        return None
    return float(silhouette_score(points, codes, metric="euclidean"))


def sample_cells(n_cells: int, seed: int, size: int = SAMPLE_SIZE) -> np.ndarray | None:
    """Sorted indices of ``size`` cells drawn without replacement, or None when all cells fit."""
    if n_cells <= size:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_cells, size=size, replace=False))


def integration_metrics(
    embedding: np.ndarray,
    batches: Any,
    labels: Any | None,
    sample: np.ndarray | None,
) -> dict[str, float | None]:
    """Median iLISI and batch silhouette, plus median cLISI and label silhouette when labels are given."""
    distances, indices = neighbours(embedding, query=sample)  # shared by iLISI and cLISI
    metrics: dict[str, float | None] = {
        "ilisi_median": _median(lisi_from_neighbours(distances, indices, batches)),
        "batch_silhouette": silhouette(embedding, batches, sample),
    }
    if labels is not None:
        metrics["clisi_median"] = _median(lisi_from_neighbours(distances, indices, labels))
        metrics["label_silhouette"] = silhouette(embedding, labels, sample)
    return metrics


def _median(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else None


def metrics_before_after(
    before: np.ndarray,
    after: np.ndarray,
    batches: Any,
    labels: Any | None,
    *,
    batch_key: str,
    label_key: str | None,
    seed: int,
    sample_size: int = SAMPLE_SIZE,
) -> dict[str, Any]:
    """Metrics of the embedding before and after correction, on the same cells, with their settings.

    Parameters
    ----------
    before, after
        The embedding before and after correction, shape (n_cells, n_dims).
    batches, labels
        Batch and (optional) cell-type label of each cell, shape (n_cells,).
    batch_key, label_key
        Column names, recorded with the settings.
    seed
        Seed of the cell sample (the run's random state).
    sample_size
        Most cells evaluated; more cells than this are subsampled.
    """
    sample = sample_cells(len(before), seed, sample_size)
    settings: Mapping[str, Any] = {
        "batch_key": batch_key,
        "label_key": label_key,
        "perplexity": PERPLEXITY,
        "n_neighbors": int(3 * PERPLEXITY) - 1,  # the search's 90 cells minus the cell itself
        "n_cells_evaluated": len(before) if sample is None else len(sample),
        "sample_size": sample_size,
        "sample_seed": seed,
    }
    return {
        "before": integration_metrics(before, batches, labels, sample),
        "after": integration_metrics(after, batches, labels, sample),
        "settings": dict(settings),
    }
