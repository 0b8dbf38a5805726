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

The same code runs on the CPU (NumPy) and on the GPU (CuPy, ``xp=cupy``), with the same results
except where many cells tie at a neighbourhood's edge (see the first point):

* Neighbours are found in two stages. First ``3 * perplexity +`` :data:`CANDIDATE_MARGIN`
  candidates per query cell, by distances from matrix products (on the GPU a brute-force search
  in large tiles, see :func:`candidates_bruteforce`; on the CPU a single-precision search that
  checks its own rounding, see ``cpu_neighbours``). Then the candidates' distances are recomputed
  exactly, one dimension after the other (a sum of rounded squares in a fixed order, so that
  NumPy and CuPy give the same bits), the cell itself is left out, and the neighbours are ordered
  by (distance, index). Ties, duplicate cells included, are therefore broken identically on both
  devices wherever the candidates hold the neighbourhood. On the CPU that is checked, and a cell
  where it could fail is searched again until the result is that of a full sort. The GPU's
  candidates are not checked: where more cells tie at the edge, or lie within rounding of it,
  than the margin holds (duplicates, lattices of values), its neighbourhoods can differ.
* The perplexity calibration and the Simpson index are array operations in ``xp``.
* The silhouette width is computed from tiles of the pairwise distance matrix of the sampled
  cells, so memory stays bounded, with the definition of scikit-learn's ``silhouette_score``; one
  pass over the tiles serves the batch and the label silhouette.

On the GPU the embedding travels to the device once per metrics call, the tiles are sized from
the free device memory (10,000 query cells against a million take about five), and the host
waits for the device only a few times per tile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SAMPLE_SIZE = 10_000
"""Most cells used per metric; inputs above this are subsampled without replacement.

The neighbour search costs ``SAMPLE_SIZE * n_cells`` distances per embedding, so this bounds the
metrics' share of a run. The sampling error of the median LISI is then about 1.25 sd / 100, sd
being the spread of the per-cell values (0.12 for an iLISI spread of 10, as with 64 batches);
``--metrics-cells`` takes more."""

PERPLEXITY = 30.0
"""Effective number of neighbours of the LISI kernel; the neighbourhood is 3 * perplexity cells."""

_ENTROPY_TOL = 1e-5  # |H - log(perplexity)| accepted by the kernel-width bisection (as in R lisi)
_MAX_BISECTIONS = 50  # R lisi's limit; cells that do not settle keep their last kernel width

CANDIDATE_MARGIN = 16
"""Extra candidates of the first neighbour stage, so that the exact re-ranking usually sees every
cell that rounding in the matrix-product distances moved across the neighbourhood's edge (the CPU
checks that it did; the GPU relies on the margin)."""

_CPU_TILE_ELEMENTS = 1 << 24  # most matrix entries held at once on the CPU (128 MiB in float64)
_GPU_TILE_ELEMENTS = 1 << 31  # at most this on a GPU (16 GiB in float64): larger tiles gain nothing
_GPU_MIN_TILE_ELEMENTS = 1 << 24
_GPU_MEMORY_SHARE = 8  # a tile takes at most 1/8 of the free device memory (scratch comes on top)
_MAX_GROUP = 1024  # most columns per group in the brute-force search (see candidates_bruteforce)
_CPU_CHUNK_ROWS = 256  # query or sampled cells per task of the CPU's thread pool


def simpson_index(
    distances: Any,
    neighbour_labels: Any,
    n_labels: int,
    perplexity: float = PERPLEXITY,
    *,
    xp: Any = np,
    threads: int = 1,
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
    threads
        CPU threads of the kernel calibration (see :func:`neighbour_weights`).

    Returns
    -------
    Simpson index per cell, shape (n_cells,), in (0, 1]; NaN where all kernel weights underflow.
    """
    weights, entropy = neighbour_weights(distances, perplexity, xp=xp, threads=threads)
    return _simpson_from_weights(weights, entropy, xp.asarray(neighbour_labels), n_labels, xp)


def neighbour_weights(
    distances: Any, perplexity: float = PERPLEXITY, *, xp: Any = np, threads: int = 1
) -> tuple[Any, Any]:
    """The LISI kernel of each cell: neighbour weights whose perplexity is ``perplexity``.

    The weights depend on the distances alone, so one calibration serves every labelling.

    Parameters
    ----------
    distances
        Euclidean distances to the neighbours (the cell itself excluded), shape (n_cells, n_neighbors).
    perplexity
        Target perplexity of the weights.
    xp
        Array namespace (NumPy, or CuPy for the GPU); the distances are moved into it.
    threads
        CPU threads: the cells are cut into fixed chunks, each calibrated on its own (every cell's
        value is the same for any cut and any thread count).

    Returns
    -------
    Normalised weights, shape (n_cells, n_neighbors), float64, and the entropy of each cell's
    weights, shape (n_cells,), float32 (0 where every weight underflows, and then the weights are 0).
    """
    distances = xp.asarray(distances, dtype=xp.float64)
    weights = xp.empty_like(distances)
    entropy = xp.empty(distances.shape[0], dtype=xp.float32)
    rows = _chunk_rows(distances.shape[0], 8 * _CPU_CHUNK_ROWS, xp)

    def task(i: int) -> None:
        chunk = slice(i * rows, (i + 1) * rows)
        weights[chunk], entropy[chunk] = _calibrated_rows(distances[chunk], perplexity, xp)

    _run_chunks(task, -(-distances.shape[0] // rows), xp, threads)
    return weights, entropy


def _calibrated_rows(distances: Any, perplexity: float, xp: Any) -> tuple[Any, Any]:
    """:func:`neighbour_weights` of a block of cells."""
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
    return weights, entropy


def _simpson_from_weights(
    weights: Any, entropy: Any, neighbour_labels: Any, n_labels: int, xp: Any
) -> Any:
    """Sum over labels of the squared weight of each label around each cell; NaN where the
    weights all underflowed (``entropy == 0``)."""
    n_cells = weights.shape[0]
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
    threads: int = 1,
) -> tuple[Any, Any]:
    """Distances and indices of the LISI neighbourhood of each (query) cell, the cell itself left out.

    On the GPU the candidates come from :func:`candidates_bruteforce`; their distances are then
    recomputed exactly (:func:`exact_distances`) and the neighbourhood is the first
    ``3 * perplexity - 1`` of them in (distance, index) order. On the CPU,
    ``cpu_neighbours.nearest_neighbours`` returns the same order exactly, as a full sort would:
    its single-precision candidates are re-ranked the same way, and a cell whose neighbourhood
    they might not hold (a cell left out could lie within their rounding error of its edge) is
    searched again exactly.

    Coordinates above 2^500, whose squares could overflow float64, are first scaled down by a
    power of two, and the distances returned are scaled back.

    Returns
    -------
    Distances and indices (arrays of ``xp``), each of shape (n_query, 3 * perplexity - 1), nearest
    first.

    Raises
    ------
    ValueError
        An embedding without cells or dimensions, a query index outside [0, n_cells), a
        perplexity below 1/3, or a coordinate that is not finite.
    """
    points = _as_points(embedding, xp)
    if points.ndim != 2 or 0 in points.shape:
        raise ValueError(f"The metrics need cells with coordinates; got shape {points.shape}.")
    n_cells = points.shape[0]
    query_idx = xp.arange(n_cells) if query is None else xp.asarray(query, dtype=xp.int64)
    if query_idx.size and (int(query_idx.min()) < 0 or int(query_idx.max()) >= n_cells):
        raise ValueError(f"Query cell indices must lie in [0, {n_cells}).")
    if not (math.isfinite(perplexity) and perplexity >= 1 / 3):
        raise ValueError(f"The perplexity must be at least 1/3 (one neighbour); got {perplexity}.")
    n_neighbors = min(int(3 * perplexity), n_cells)  # the cell itself included
    if xp is np:  # checks (and if need be rescales) the cells on the threads of its own set-up
        from harmony_step._step.cpu_neighbours import nearest_neighbours

        return nearest_neighbours(points, query_idx, n_neighbors, threads)
    if not bool(xp.isfinite(points).all()):
        raise ValueError(NOT_FINITE)
    shift = safe_shift(float(xp.abs(points).max()))
    if shift:
        points = xp.ldexp(points, -shift)
    n_candidates = min(n_neighbors + CANDIDATE_MARGIN, n_cells)
    candidates = candidates_bruteforce(points, query_idx, n_candidates, xp=xp)
    distances, indices = _nearest_candidates(
        points, query_idx, candidates, n_neighbors, xp, threads
    )
    return (xp.ldexp(distances, shift) if shift else distances), indices


NOT_FINITE = "The metrics need finite coordinates; the embedding has NaN or Inf."

# Squares of coordinates up to 2^500, summed over fewer than 2^20 dimensions, stay finite.
_LARGEST_SAFE_EXPONENT = 500


def safe_shift(largest: float) -> int:
    """An exponent e such that coordinates of at most ``largest`` in absolute value, times 2^-e,
    are at most 2^500, so that their squares cannot overflow; 0 when they already are (then
    nothing is rescaled, and tiny values keep every bit)."""
    if largest > 2.0**_LARGEST_SAFE_EXPONENT:
        return math.ceil(math.log2(largest)) - _LARGEST_SAFE_EXPONENT
    return 0


def _as_points(embedding: Any, xp: Any) -> Any:
    """The cells as an array of ``xp``: float64 on the GPU; on the CPU float32 stays float32 (the
    exact distances widen the rows they use, so a float64 copy of every cell is not needed)."""
    if xp is np:
        points = np.asarray(embedding)
        return points if points.dtype in (np.float32, np.float64) else points.astype(np.float64)
    return xp.asarray(embedding, dtype=xp.float64)


def _nearest_candidates(
    points: Any, query_idx: Any, candidates: Any, n_neighbors: int, xp: Any, threads: int
) -> tuple[Any, Any]:
    """The first ``n_neighbors - 1`` candidates of each query cell in (exact distance, index)
    order, the cell itself left out: their distances and indices."""
    candidates = xp.sort(candidates, axis=1)  # index order first: a stable sort on the distance
    distances = exact_distances(points, query_idx, candidates, xp=xp, threads=threads)
    distances[candidates == query_idx[:, None]] = xp.inf  # keeps it on ties; the cell goes last
    order = xp.argsort(distances, axis=1, kind="stable")[:, : n_neighbors - 1]
    return (
        xp.take_along_axis(distances, order, axis=1),
        xp.take_along_axis(candidates, order, axis=1),
    )


def candidates_bruteforce(points: Any, query_idx: Any, n_candidates: int, *, xp: Any = np) -> Any:
    """Indices of the ``n_candidates`` nearest cells of each query cell, by a brute-force search.

    One matrix product per block of query cells gives ``|r|^2 - 2 q.r`` against every cell ``r``
    (the query's own norm does not change the ranking), so a block holds at most about
    :func:`_tile_elements` entries and the cells are searched in one go. The candidates are then
    found without sorting the block: its columns are cut into groups of ``g`` (about
    ``sqrt(n_cells / n_candidates)``), the ``n_candidates``-th smallest group minimum ``b`` of a
    row bounds its ``n_candidates``-th smallest entry from above, so only the groups whose minimum
    is at most ``b``, and in them the entries at most ``b``, are gathered and sorted: about
    ``n_candidates`` groups and a few more than ``n_candidates`` entries per row. The host waits
    for the device twice per block, for those two counts.

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
    n_cells, n_dims = points.shape
    n_query = int(query_idx.shape[0])
    c = n_candidates
    group = _group_size(n_cells, c)
    width = -(-n_cells // group) * group
    # [r, |r|^2] against [-2 q, 1]: one product gives the distances up to |q|^2. The padding
    # columns that complete the last group are infinitely far.
    cells = xp.zeros((width, n_dims + 1), dtype=xp.float64)
    cells[:n_cells, :n_dims] = points
    cells[:n_cells, n_dims] = xp.einsum("ij,ij->i", points, points)
    cells[n_cells:, n_dims] = xp.inf
    block_rows = max(1, min(n_query, _tile_elements(xp) // width))
    out = xp.empty((n_query, c), dtype=xp.int64)
    for q0 in range(0, n_query, block_rows):
        rows = query_idx[q0 : q0 + block_rows]
        queries = xp.empty((rows.shape[0], n_dims + 1), dtype=xp.float64)
        xp.multiply(points[rows], -2.0, out=queries[:, :n_dims])
        queries[:, n_dims] = 1.0
        tile = queries @ cells.T
        out[q0 : q0 + rows.shape[0]] = _smallest_per_row(tile, c, group, xp)
        del tile
    return out


def _group_size(n_cells: int, c: int) -> int:
    """Columns per group: the power of two nearest sqrt(n_cells / c), so that the group minima
    (n_cells / g per row) and the gathered groups (c * g entries per row) are about equally many;
    at most n_cells // c, so that at least c groups exist."""
    if n_cells < 2 * c:
        return 1
    ideal = math.sqrt(n_cells / c)
    group = 1 << max(0, round(math.log2(ideal)))
    return max(1, min(group, _MAX_GROUP, n_cells // c))


def _smallest_per_row(tile: Any, c: int, group: int, xp: Any) -> Any:
    """Columns of the ``c`` smallest entries of each row, ascending (ties: lower column first).

    ``tile`` has a whole number of groups of ``group`` columns, and at least ``c`` of them.
    """
    n_rows, width = tile.shape
    n_groups = width // group
    minima = tile.reshape(n_rows, n_groups, group).min(axis=2) if group > 1 else tile
    # c groups have their minimum at or below the bound, so >= c entries are <= it; every entry
    # among the c smallest of its row is <= it, and so is its group's minimum.
    bound = xp.partition(minima, c - 1, axis=1)[:, c - 1]
    group_row, group_index = xp.nonzero(minima <= bound[:, None])  # by row, then by column
    columns = group_index[:, None] * group + xp.arange(group)
    values = tile[group_row[:, None], columns]
    pair, offset = xp.nonzero(values <= bound[group_row][:, None])
    row, column, value = group_row[pair], columns[pair, offset], values[pair, offset]
    order = xp.argsort(value, kind="stable")  # equal values keep the column order
    order = order[xp.argsort(row[order], kind="stable")]  # by row, then by value
    row, column = row[order], column[order]
    counts = xp.bincount(row, minlength=n_rows)
    rank = xp.arange(row.shape[0]) - (xp.cumsum(counts) - counts)[row]
    kept = rank < c
    best = xp.empty((n_rows, c), dtype=xp.int64)
    best[row[kept], rank[kept]] = column[kept]
    return best


def exact_distances(
    points: Any, query_idx: Any, candidates: Any, *, xp: Any = np, threads: int = 1
) -> Any:
    """Euclidean distance of each query cell to each of its candidates, bit-identical on both devices.

    The squares of the coordinate differences are added one dimension after the other, each
    operation rounded on its own (no fused multiply-add, no reordered reduction), and the square
    root is correctly rounded; NumPy and CuPy therefore give the same bits.
    """
    n_query, n_cand = candidates.shape
    n_dims = points.shape[1]
    out = xp.empty((n_query, n_cand), dtype=xp.float64)
    # on the CPU a chunk stays in the cache; on the GPU it is one tile
    step = _chunk_rows(n_query, _CPU_CHUNK_ROWS // 4, xp, per_row=n_cand * n_dims)

    def task(i: int) -> None:
        rows = slice(i * step, (i + 1) * step)
        # (rows, n_cand, n_dims), widened: float32 cells give the same values as in float64
        differences = points[candidates[rows]].astype(xp.float64, copy=False)
        differences -= points[query_idx[rows]][:, None, :]
        out[rows] = ordered_distances(differences, xp=xp)

    _run_chunks(task, -(-n_query // step), xp, threads)
    return out


def ordered_distances(differences: Any, *, xp: Any = np) -> Any:
    """Euclidean norms over the last axis of ``differences`` (which this squares in place): the
    squares added one dimension after the other, each addition rounded on its own, and a correctly
    rounded square root, so that NumPy and CuPy, and any caller, get the same bits."""
    differences *= differences
    # dimension-major, so that each addition below runs over contiguous memory
    squares = xp.ascontiguousarray(xp.moveaxis(differences, -1, 0))
    total = squares[0]
    for j in range(1, squares.shape[0]):
        total += squares[j]
    return xp.sqrt(total)


def _chunk_rows(n_rows: int, cpu_rows: int, xp: Any, per_row: int = 1) -> int:
    """Rows per chunk: fixed on the CPU (so that results do not depend on the thread count), and
    as many as a tile holds on the GPU."""
    if xp is np:
        return max(1, cpu_rows)
    return max(1, min(max(1, n_rows), _tile_elements(xp) // max(1, per_row)))


def _run_chunks(task: Any, n_chunks: int, xp: Any, threads: int) -> None:
    """``task(i)`` for each chunk: on ``threads`` threads on the CPU (``_threads.run_chunks``),
    with the BLAS library held at one thread (NumPy releases the GIL in its loops and in BLAS
    calls), and one after the other on the GPU."""
    if xp is not np:
        for i in range(n_chunks):
            task(i)
        return
    from harmony_step._threads import run_chunks, single_threaded_blas

    # BLAS single-threaded also when the chunks run one after the other: a threaded BLAS rounds
    # differently with its thread count.
    with single_threaded_blas():
        run_chunks(task, n_chunks, threads)


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
    weights, entropy = neighbour_weights(distances, perplexity, xp=xp)
    return _lisi_from_weights(weights, entropy, xp.asarray(indices), codes, n_labels, xp)


def _lisi_from_weights(
    weights: Any, entropy: Any, indices: Any, codes: np.ndarray, n_labels: int, xp: Any
) -> Any:
    """LISI of the labels ``codes`` (one per cell) over calibrated neighbourhoods."""
    neighbour_labels = xp.asarray(codes)[indices]
    return 1.0 / _simpson_from_weights(weights, entropy, neighbour_labels, n_labels, xp)


def _codes(labels: Any) -> tuple[np.ndarray, int]:
    """Integer codes of the labels in order of first appearance, and the number of labels."""
    import pandas as pd

    # pandas factorizes its own columns (categorical codes, say) without making Python objects
    values = (
        labels if isinstance(labels, pd.Series | pd.Index | pd.Categorical) else np.asarray(labels)
    )
    codes, uniques = pd.factorize(values)
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
    points = xp.asarray(embedding if sample is None else _take_rows(embedding, sample, xp))
    codes, _ = _codes(labels if sample is None else labels[sample])
    return silhouettes(points, [codes], xp=xp)[0]


def silhouettes(
    points: Any, label_codes: Sequence[np.ndarray], *, xp: Any = np, threads: int = 1
) -> list[float | None]:
    """Mean silhouette width of each labelling of the same cells, from one pass over their distances.

    Parameters
    ----------
    points
        The cells, shape (n_cells, n_dims), in ``xp``.
    label_codes
        Per labelling, an integer code per cell, shape (n_cells,).
    xp, threads
        Array namespace (NumPy or CuPy) and, on the CPU, the threads that share the tiles.

    Returns
    -------
    One mean width per labelling; None where it has fewer than 2 labels or as many as cells.
    """
    points = xp.asarray(points).astype(xp.float64, copy=False)
    n, n_dims = points.shape
    results: list[float | None] = [None] * len(label_codes)
    kept = []  # (position, codes on the device, number of labels, first one-hot column)
    width = 0
    for position, codes in enumerate(label_codes):
        _, codes = np.unique(np.asarray(codes), return_inverse=True)  # present labels: 0 .. k-1
        n_labels = int(codes.max()) + 1 if codes.size else 0
        if 2 <= n_labels <= n - 1:
            kept.append((position, xp.asarray(codes.reshape(-1).astype(np.int64)), n_labels, width))
            width += n_labels
    if not kept:
        return results
    rows = xp.arange(n)
    onehot = xp.zeros((n, width), dtype=xp.float64)
    for _, codes, _, first in kept:
        onehot[rows, first + codes] = 1.0
    sizes = onehot.sum(axis=0)
    # [-2 x, |x|^2, 1] against [y, 1, |y|^2]: one product gives the squared distances
    norms = xp.einsum("ij,ij->i", points, points)
    left = xp.empty((n, n_dims + 2), dtype=xp.float64)
    xp.multiply(points, -2.0, out=left[:, :n_dims])
    left[:, n_dims] = norms
    left[:, n_dims + 1] = 1.0
    right = xp.empty((n, n_dims + 2), dtype=xp.float64)
    right[:, :n_dims] = points
    right[:, n_dims] = 1.0
    right[:, n_dims + 1] = norms
    sums = xp.empty((n, width), dtype=xp.float64)  # summed distance to each label's cells
    step = _chunk_rows(n, _CPU_CHUNK_ROWS, xp, per_row=n)

    def task(i: int) -> None:
        r0, r1 = i * step, min(n, (i + 1) * step)
        block = left[r0:r1] @ right.T
        xp.maximum(block, 0, out=block)
        xp.sqrt(block, out=block)
        block[xp.arange(r1 - r0), xp.arange(r0, r1)] = 0.0  # a cell's distance to itself
        sums[r0:r1] = block @ onehot

    _run_chunks(task, -(-n // step), xp, threads)
    for position, codes, n_labels, first in kept:
        labels = slice(first, first + n_labels)
        with np.errstate(divide="ignore", invalid="ignore"):
            intra = sums[rows, first + codes] / (sizes[first + codes] - 1)
            means = sums[:, labels] / sizes[None, labels]
            means[rows, codes] = xp.inf
            inter = means.min(axis=1)
            widths = (inter - intra) / xp.maximum(intra, inter)
        widths = xp.nan_to_num(widths)  # a cell alone in its label (0 / 0) scores 0
        results[position] = float(widths.mean())
    return results


def _tile_elements(xp: Any) -> int:
    """Most matrix entries held at once: fixed on the CPU; on a GPU, a share of its free memory
    (CuPy's pool of freed blocks counted as free), between 16 Mi and 2 Gi entries."""
    if xp is np:
        return _CPU_TILE_ELEMENTS
    free, _ = xp.cuda.runtime.memGetInfo()
    free += xp.get_default_memory_pool().free_bytes()
    share = free // (8 * _GPU_MEMORY_SHARE)
    return int(max(_GPU_MIN_TILE_ELEMENTS, min(_GPU_TILE_ELEMENTS, share)))


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
    threads: int | None = None,
) -> dict[str, float | None]:
    """Median iLISI and batch silhouette, plus median cLISI and label silhouette when labels are given.

    ``xp`` is the array namespace the metrics are computed in: NumPy, or CuPy for the GPU;
    ``threads``, the CPU threads (default: the CPUs the process may use).
    """
    columns = [_codes(batches)] + ([_codes(labels)] if labels is not None else [])
    return _embedding_metrics(embedding, columns, sample, xp, _thread_count(threads))


def _embedding_metrics(
    embedding: Any,
    columns: Sequence[tuple[np.ndarray, int]],
    sample: np.ndarray | None,
    xp: Any,
    threads: int,
) -> dict[str, float | None]:
    """The metrics of one embedding for the batch codes and, if given, the label codes."""
    points = _to_device(embedding, xp)  # the one host-to-device copy of the embedding
    # one neighbour search for iLISI and cLISI
    distances, indices = neighbours(points, query=sample, xp=xp, threads=threads)
    weights, entropy = neighbour_weights(distances, xp=xp, threads=threads)  # for every labelling
    indices = xp.asarray(indices)
    lisi_medians = []
    for codes, n_labels in columns:
        values = _lisi_from_weights(weights, entropy, indices, codes, n_labels, xp)
        lisi_medians.append(_median(_to_host(values)))
    chosen = points if sample is None else points[xp.asarray(sample)]
    widths = silhouettes(
        chosen,
        [codes if sample is None else codes[sample] for codes, _ in columns],
        xp=xp,
        threads=threads,
    )
    metrics: dict[str, float | None] = {
        "ilisi_median": lisi_medians[0],
        "batch_silhouette": widths[0],
    }
    if len(columns) > 1:
        metrics["clisi_median"] = lisi_medians[1]
        metrics["label_silhouette"] = widths[1]
    return metrics


def _thread_count(threads: int | None) -> int:
    if threads is not None:
        return threads
    from harmony_step._threads import available_cpus

    return available_cpus()


def _to_device(embedding: Any, xp: Any) -> Any:
    """The embedding in ``xp``: on the GPU as float64, a host array crossing to the device in its
    own dtype (half the bytes for float32) and widened there; on the CPU float32 and float64 stay
    as they are and other dtypes become float64 (:func:`_as_points`)."""
    if xp is not np and isinstance(embedding, np.ndarray):
        return xp.asarray(np.ascontiguousarray(embedding)).astype(xp.float64, copy=False)
    return _as_points(embedding, xp)


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
    threads: int | None = None,
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
    threads
        CPU threads of the work on the sampled cells (default: the CPUs the process may use); the
        values do not depend on it.
    """
    sample = sample_cells(len(before), seed, sample_size)
    threads = _thread_count(threads)
    settings: Mapping[str, Any] = {
        "batch_key": batch_key,
        "label_key": label_key,
        "perplexity": PERPLEXITY,
        "n_neighbors": int(3 * PERPLEXITY) - 1,  # the search's 90 cells minus the cell itself
        "n_cells_evaluated": len(before) if sample is None else len(sample),
        "sample_size": sample_size,
        "sample_seed": seed,
    }
    columns = [_codes(batches)] + ([_codes(labels)] if labels is not None else [])
    return {
        "before": _embedding_metrics(before, columns, sample, xp, threads),
        "after": _embedding_metrics(after, columns, sample, xp, threads),
        "settings": dict(settings),
    }
