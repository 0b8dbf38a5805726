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

The same code runs on the CPU (NumPy) and on the GPU (CuPy, ``xp=cupy``), with the same results:

* Neighbours are found in two stages. First ``3 * perplexity +`` :data:`CANDIDATE_MARGIN`
  candidates per query cell, by distances from matrix products (scikit-learn on the CPU; a tiled
  brute-force search on the GPU, see :func:`candidates_bruteforce`). Then the candidates' distances
  are recomputed exactly, one dimension after the other (a sum of rounded squares in a fixed
  order, so that NumPy and CuPy give the same bits), the cell itself is left out, and the
  neighbours are ordered by (distance, index). Ties, duplicate cells included, are therefore broken
  identically on both devices.
* The perplexity calibration and the Simpson index are array operations in ``xp``.
* The silhouette width is computed from tiles of the pairwise distance matrix, so memory stays
  bounded, with the definition of scikit-learn's ``silhouette_score``.
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

CANDIDATE_MARGIN = 16
"""Extra candidates of the first neighbour stage, so that the exact re-ranking sees every cell that
rounding in the matrix-product distances could have moved across the neighbourhood's edge."""

_TILE_ELEMENTS = 1 << 26  # most distance-matrix entries held at once on a GPU (512 MiB in float64)
_CPU_TILE_ELEMENTS = 1 << 24  # on the CPU (128 MiB): large enough for efficient matrix products
_GROUP = 32  # columns per group in the brute-force search's threshold (see candidates_bruteforce)
_REFERENCE_ROWS = 1 << 17  # cells per tile of the brute-force search


def simpson_index(
    distances: Any,
    neighbour_labels: Any,
    n_labels: int,
    perplexity: float = PERPLEXITY,
    *,
    xp: Any = np,
) -> Any:
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
    xp
        Array namespace (NumPy, or CuPy for the GPU); the inputs are moved into it.

    Returns
    -------
    Simpson index per cell, shape (n_cells,), in (0, 1]; NaN where all kernel weights underflow.
    """
    distances = xp.asarray(distances, dtype=xp.float64)
    neighbour_labels = xp.asarray(neighbour_labels)
    n_cells = distances.shape[0]
    # The kernel precision beta and the entropy are single precision, as in R lisi's C++ code:
    # with doubles the bisection stops one step earlier or later for some cells, which moves
    # their LISI by up to ~3e-6.
    beta = xp.ones(n_cells, dtype=xp.float32)
    beta_low = xp.full(n_cells, -xp.inf, dtype=xp.float32)
    beta_high = xp.full(n_cells, xp.inf, dtype=xp.float32)
    target = np.float32(math.log(perplexity))
    tolerance = np.float32(_ENTROPY_TOL)
    weights, entropy = _kernel(distances, beta, xp)
    # Bisection on beta, vectorised: every cell takes the same steps as in a per-cell loop and
    # stops once its own entropy is within tolerance of log(perplexity).
    for _ in range(_MAX_BISECTIONS):
        excess = entropy - target
        active = xp.abs(excess) > tolerance
        if not bool(active.any()):
            break
        sharpen = active & (excess > 0)
        widen = active & ~(excess > 0)
        beta_low[sharpen] = beta[sharpen]
        beta[sharpen] = xp.where(
            xp.isinf(beta_high[sharpen]),
            beta[sharpen] * 2,
            (beta[sharpen] + beta_high[sharpen]) / 2,
        )
        beta_high[widen] = beta[widen]
        beta[widen] = xp.where(
            xp.isinf(beta_low[widen]), beta[widen] / 2, (beta[widen] + beta_low[widen]) / 2
        )
        weights[active], entropy[active] = _kernel(distances[active], beta[active], xp)
    # one bin per (cell, label) pair
    cell_label = xp.arange(n_cells)[:, None] * n_labels + neighbour_labels
    label_weights = xp.bincount(
        cell_label.ravel(), weights=weights.ravel(), minlength=n_cells * n_labels
    )
    label_weights = label_weights.reshape(n_cells, n_labels)
    simpson = xp.sum(label_weights**2, axis=1)
    simpson[entropy == 0] = xp.nan
    return simpson


def _kernel(distances: Any, beta: Any, xp: Any) -> tuple[Any, Any]:
    """Normalised weights exp(-beta d) (float64) and their Shannon entropy (float32), per row.

    A row whose weights all underflow gets zero weights and entropy 0, as in R lisi.
    """
    beta = beta.astype(xp.float64)
    raw = xp.exp(-distances * beta[:, None])
    total = raw.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):  # rows with total == 0 are reset below
        entropy = (xp.log(total) + beta * xp.einsum("ij,ij->i", distances, raw) / total).astype(
            xp.float32
        )
        weights = raw / total[:, None]
    underflow = total == 0
    entropy[underflow] = 0
    weights[underflow] = 0
    return weights, entropy


def lisi(
    embedding: Any,
    labels: Any,
    *,
    perplexity: float = PERPLEXITY,
    query: np.ndarray | None = None,
    xp: Any = np,
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
    xp
        Array namespace: NumPy (the CPU) or CuPy (the GPU).

    Notes
    -----
    The search asks for ``3 * perplexity`` neighbours, the cell itself included, and the cell
    itself is then left out of its own neighbourhood, as R ``lisi`` 1.0 does.

    Returns
    -------
    LISI per query cell (a NumPy array), between 1 and the number of labels.
    """
    distances, indices = neighbours(embedding, perplexity=perplexity, query=query, xp=xp)
    return _to_host(lisi_from_neighbours(distances, indices, labels, perplexity=perplexity, xp=xp))


def neighbours(
    embedding: Any,
    *,
    perplexity: float = PERPLEXITY,
    query: np.ndarray | None = None,
    xp: Any = np,
) -> tuple[Any, Any]:
    """Distances and indices of the LISI neighbourhood of each (query) cell, the cell itself left out.

    Candidates come from :func:`candidates_bruteforce` on the GPU and from scikit-learn on the
    CPU; their distances are then recomputed exactly (:func:`exact_distances`) and the
    neighbourhood is the first ``3 * perplexity - 1`` of them in (distance, index) order, so both
    devices return the same neighbours, ties included.

    Returns
    -------
    Distances and indices (arrays of ``xp``), each of shape (n_query, 3 * perplexity - 1), nearest
    first.
    """
    points = xp.asarray(embedding, dtype=xp.float64)
    n_cells = points.shape[0]
    query_idx = xp.arange(n_cells) if query is None else xp.asarray(query, dtype=xp.int64)
    n_neighbors = min(int(3 * perplexity), n_cells)  # the cell itself included
    n_candidates = min(n_neighbors + CANDIDATE_MARGIN, n_cells)
    if xp is np:
        candidates = _candidates_sklearn(points, query_idx, n_candidates)
    else:
        candidates = candidates_bruteforce(points, query_idx, n_candidates, xp=xp)
    candidates = xp.sort(candidates, axis=1)  # index order first, so that a stable sort on the
    distances = exact_distances(points, query_idx, candidates, xp=xp)  # distance keeps it on ties
    distances[candidates == query_idx[:, None]] = xp.inf  # the cell itself goes last
    order = xp.argsort(distances, axis=1, kind="stable")[:, : n_neighbors - 1]
    return (
        xp.take_along_axis(distances, order, axis=1),
        xp.take_along_axis(candidates, order, axis=1),
    )


def _candidates_sklearn(points: np.ndarray, query_idx: np.ndarray, n_candidates: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    knn = NearestNeighbors(n_neighbors=n_candidates, algorithm="brute").fit(points)
    return knn.kneighbors(points[query_idx], return_distance=False).astype(np.int64)


def candidates_bruteforce(points: Any, query_idx: Any, n_candidates: int, *, xp: Any = np) -> Any:
    """Indices of the ``n_candidates`` nearest cells of each query cell, by a tiled brute-force search.

    The squared distances (up to the query's own norm, which does not change the ranking) come
    from matrix products over tiles of at most about :data:`_TILE_ELEMENTS` entries. In each tile
    the candidates are found without sorting the tile: the columns are cut into groups of
    :data:`_GROUP`, and the ``n_candidates``-th smallest group minimum bounds the
    ``n_candidates``-th smallest distance from above, so only the entries at or below it are
    sorted. The best of each tile are merged with the best so far.

    Parameters
    ----------
    points
        All cells, shape (n_cells, n_dims), float64, in ``xp``.
    query_idx
        Indices of the query cells, shape (n_query,).
    n_candidates
        Candidates per query cell, at most n_cells.
    xp
        Array namespace (CuPy on the GPU; NumPy works too and is what the CPU tests use).

    Returns
    -------
    Candidate indices, shape (n_query, n_candidates), nearest first (int64).
    """
    n_cells = points.shape[0]
    n_query = int(query_idx.shape[0])
    c = n_candidates
    norms = xp.einsum("ij,ij->i", points, points)
    ref_rows = max(_GROUP * (c + 1), min(n_cells, _REFERENCE_ROWS))
    ref_rows = -(-ref_rows // _GROUP) * _GROUP
    query_rows = max(1, min(n_query, _tile_elements(xp) // ref_rows))
    out = xp.empty((n_query, c), dtype=xp.int64)
    for q0 in range(0, n_query, query_rows):
        rows = query_idx[q0 : q0 + query_rows]
        queries = points[rows]
        best_d = xp.full((len(rows), c), xp.inf)
        best_i = xp.full((len(rows), c), -1, dtype=xp.int64)
        for r0 in range(0, n_cells, ref_rows):
            r1 = min(n_cells, r0 + ref_rows)
            tile = norms[r0:r1][None, :] - 2.0 * (queries @ points[r0:r1].T)
            tile_d, tile_i = _smallest_per_row(tile, c, xp)
            tile_i = xp.where(tile_i >= 0, tile_i + r0, -1)
            both_d = xp.concatenate([best_d, tile_d], axis=1)
            both_i = xp.concatenate([best_i, tile_i], axis=1)
            keep = xp.argsort(both_d, axis=1, kind="stable")[:, :c]
            best_d = xp.take_along_axis(both_d, keep, axis=1)
            best_i = xp.take_along_axis(both_i, keep, axis=1)
        out[q0 : q0 + len(rows)] = best_i
    return out


def _smallest_per_row(tile: Any, c: int, xp: Any) -> tuple[Any, Any]:
    """The ``c`` smallest entries of each row and their columns, ascending (-1 and inf where a
    row has fewer than ``c`` entries)."""
    n_rows, n_cols = tile.shape
    n_groups = n_cols // _GROUP
    if n_groups > c:
        minima = tile[:, : n_groups * _GROUP].reshape(n_rows, n_groups, _GROUP).min(axis=2)
        # c groups have their minimum at or below this bound, so >= c entries are <= it
        bound = xp.partition(minima, c - 1, axis=1)[:, c - 1]
        row, col = xp.nonzero(tile <= bound[:, None])
    else:
        row, col = xp.nonzero(xp.ones(tile.shape, dtype=bool))
    values = tile[row, col]
    order = xp.argsort(values, kind="stable")
    order = order[xp.argsort(row[order], kind="stable")]  # by row, then by value
    row, col, values = row[order], col[order], values[order]
    counts = xp.bincount(row, minlength=n_rows)
    starts = xp.cumsum(counts) - counts
    rank = xp.arange(row.shape[0]) - starts[row]
    kept = rank < c
    best_d = xp.full((n_rows, c), xp.inf)
    best_i = xp.full((n_rows, c), -1, dtype=xp.int64)
    best_d[row[kept], rank[kept]] = values[kept]
    best_i[row[kept], rank[kept]] = col[kept]
    return best_d, best_i


def exact_distances(points: Any, query_idx: Any, candidates: Any, *, xp: Any = np) -> Any:
    """Euclidean distance of each query cell to each of its candidates, bit-identical on both devices.

    The squares of the coordinate differences are added one dimension after the other, each
    operation rounded on its own (no fused multiply-add, no reordered reduction), and the square
    root is correctly rounded; NumPy and CuPy therefore give the same bits.
    """
    n_query, n_cand = candidates.shape
    out = xp.empty((n_query, n_cand), dtype=xp.float64)
    step = max(1, _tile_elements(xp) // max(1, n_cand * points.shape[1]))
    for q0 in range(0, n_query, step):
        cand = points[candidates[q0 : q0 + step]]  # (rows, n_cand, n_dims)
        own = points[query_idx[q0 : q0 + step]][:, None, :]
        total = xp.zeros(cand.shape[:2], dtype=xp.float64)
        for j in range(points.shape[1]):
            diff = xp.subtract(cand[:, :, j], own[:, :, j])
            total = xp.add(total, xp.multiply(diff, diff))
        out[q0 : q0 + step] = xp.sqrt(total)
    return out


def lisi_from_neighbours(
    distances: Any,
    indices: Any,
    labels: Any,
    *,
    perplexity: float = PERPLEXITY,
    xp: Any = np,
) -> Any:
    """LISI of ``labels`` (one per cell of the whole embedding) over precomputed neighbourhoods."""
    codes, n_labels = _codes(labels)
    neighbour_labels = xp.asarray(codes)[xp.asarray(indices)]
    return 1.0 / simpson_index(distances, neighbour_labels, n_labels, perplexity, xp=xp)


def _codes(labels: Any) -> tuple[np.ndarray, int]:
    import pandas as pd

    codes, uniques = pd.factorize(np.asarray(labels, dtype=object))
    if (codes < 0).any():
        raise ValueError("LISI labels contain missing values.")
    return codes.astype(np.int64), len(uniques)


def _to_host(array: Any) -> np.ndarray:
    return array.get() if hasattr(array, "get") and not isinstance(array, np.ndarray) else array


def silhouette(
    embedding: Any, labels: Any, sample: np.ndarray | None = None, *, xp: Any = np
) -> float | None:
    """Mean silhouette width of ``labels`` in ``embedding`` (Euclidean); None with < 2 labels.

    For batch labels, values near 0 or below mean well-mixed batches; for cell types, higher means
    better-separated types. The definition is scikit-learn's ``silhouette_score``: a cell alone in
    its label scores 0. The distance matrix is computed in row tiles (``xp``: NumPy or CuPy).
    """
    labels = np.asarray(labels, dtype=object)
    if sample is not None:
        labels = labels[sample]
    codes, n_labels = _codes(labels)
    if not 2 <= n_labels <= len(codes) - 1:
        return None
    points = xp.asarray(embedding if sample is None else _take_rows(embedding, sample, xp))
    points = points.astype(xp.float64, copy=False)
    n = points.shape[0]
    codes_x = xp.asarray(codes)
    onehot = xp.zeros((n, n_labels), dtype=xp.float64)
    onehot[xp.arange(n), codes_x] = 1.0
    sizes = onehot.sum(axis=0)
    norms = xp.einsum("ij,ij->i", points, points)
    sums = xp.empty((n, n_labels), dtype=xp.float64)  # summed distance to each label's cells
    step = max(1, _tile_elements(xp) // n)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        squared = -2.0 * (points[r0:r1] @ points.T)
        squared += norms[r0:r1, None]
        squared += norms[None, :]
        xp.maximum(squared, 0, out=squared)
        block = xp.sqrt(squared)
        block[xp.arange(r1 - r0), xp.arange(r0, r1)] = 0.0  # a cell's distance to itself
        sums[r0:r1] = block @ onehot
    rows = xp.arange(n)
    own_size = sizes[codes_x]
    with np.errstate(divide="ignore", invalid="ignore"):
        intra = sums[rows, codes_x] / (own_size - 1)
        means = sums / sizes[None, :]
        means[rows, codes_x] = xp.inf
        inter = means.min(axis=1)
        widths = (inter - intra) / xp.maximum(intra, inter)
    widths = xp.nan_to_num(widths)  # a cell alone in its label (0 / 0) scores 0
    return float(widths.mean())


def _tile_elements(xp: Any) -> int:
    return _CPU_TILE_ELEMENTS if xp is np else _TILE_ELEMENTS


def _take_rows(embedding: Any, sample: np.ndarray, xp: Any) -> Any:
    if isinstance(embedding, np.ndarray):
        return embedding[sample]  # only the sampled rows travel to the device
    return xp.asarray(embedding)[xp.asarray(sample)]


def sample_cells(n_cells: int, seed: int, size: int = SAMPLE_SIZE) -> np.ndarray | None:
    """Sorted indices of ``size`` cells drawn without replacement, or None when all cells fit."""
    if n_cells <= size:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_cells, size=size, replace=False))


def integration_metrics(
    embedding: Any,
    batches: Any,
    labels: Any | None,
    sample: np.ndarray | None,
    *,
    xp: Any = np,
) -> dict[str, float | None]:
    """Median iLISI and batch silhouette, plus median cLISI and label silhouette when labels are given.

    ``xp`` is the array namespace the metrics are computed in: NumPy, or CuPy for the GPU.
    """
    points = xp.asarray(embedding, dtype=xp.float64)
    distances, indices = neighbours(points, query=sample, xp=xp)  # shared by iLISI and cLISI
    metrics: dict[str, float | None] = {
        "ilisi_median": _median(_to_host(lisi_from_neighbours(distances, indices, batches, xp=xp))),
        "batch_silhouette": silhouette(points, batches, sample, xp=xp),
    }
    if labels is not None:
        clisi = lisi_from_neighbours(distances, indices, labels, xp=xp)
        metrics["clisi_median"] = _median(_to_host(clisi))
        metrics["label_silhouette"] = silhouette(points, labels, sample, xp=xp)
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
    xp: Any = np,
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
    xp
        Array namespace: NumPy (the CPU) or CuPy (the GPU); the values agree to within 1e-6.
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
        "before": integration_metrics(before, batches, labels, sample, xp=xp),
        "after": integration_metrics(after, batches, labels, sample, xp=xp),
        "settings": dict(settings),
    }
