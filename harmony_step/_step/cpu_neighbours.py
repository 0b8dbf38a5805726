"""The CPU's neighbour search for the mixing metrics: single precision, exact results.

The metrics need, for each query cell, its ``k`` nearest cells in (exact float64 distance, index)
order (``metrics.neighbours``). :func:`nearest_neighbours` finds them in three steps:

1. **Candidates in single precision.** The coordinates are centred, scaled by a power of two into
   [-1, 1] (exact; single precision then neither overflows nor loses tiny values) and rounded to
   float32. One BLAS product per tile of :data:`QUERY_ROWS` query cells and :data:`CELL_COLUMNS`
   cells gives ``|r|^2 - 2 q.r`` (the query's own norm does not change the ranking), and the
   compiled kernel :func:`keep_smallest` keeps the smallest values of each query across tiles.
   BLAS runs single-threaded on fixed tiles, the query chunks spread over the step's threads, so
   the result does not depend on the thread count; this runs at the speed of single-precision BLAS.
2. **Exact re-ranking** of the candidates (``metrics._nearest_candidates``), as on the GPU.
3. **A check, and an exact second search where it fails.** Every cell left out of the candidates
   has a single-precision value at least the largest kept one, so its true squared distance is at
   least that less a bound on the rounding error (:meth:`SinglePrecisionSearch.candidates`). Where
   that reach could touch the neighbourhood's edge (ties at the edge, or values closer than single
   precision resolves), the query cell is searched again (:meth:`SinglePrecisionSearch.within`):
   every cell whose single-precision value could lie within the edge is measured exactly and the
   first ``k`` in (distance, index) order are kept. On realistic data no cell needs it; on data
   with many cells at exactly the edge's distance (duplicates, lattices) it measures all of them.

The rounding error of one value: the products and sums add at most (d + 1) u (|q|^2 + 2 |r|^2)
for any order and with or without fused multiply-adds, the rounding of the coordinates to float32
2 u (|q|^2 + |r|^2) to first order, and that of the norm column u |r|^2, with u = 2^-24; in all
under (d + 3) u |q|^2 + (2d + 5) u |r|^2. :data:`_ERROR_PER_DIMENSION` doubles that for
the second-order terms: the bound used is 4 (d + 4) u (|q|^2 + |r|^2), plus
:data:`_FLOAT32_TINY` for underflow.

Imported only on the CPU, so the package and the GPU path do not compile numba code for it.

The kernel: per row it holds a buffer of candidates and a threshold, the ``c``-th smallest value
once ``c`` are known. The first tile sets the threshold by a selection. In later tiles a row is
first checked as a whole (a count of the entries below the threshold, which the compiler
vectorises); most rows of most tiles hold none. Only in a row that does, groups of :data:`GROUP`
columns are checked the same way and the groups with hits are scanned entry by entry. A full
buffer is cut back to its ``c`` smallest. The kept entries are the ``c`` smallest in (value,
column) order: columns arrive in increasing order and an entry equal to the threshold is not
taken, so on ties the earlier column stays.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from harmony_step._step import metrics

GROUP = 64
"""Columns per group of the kernel's second check (within a row that has entries below its
threshold)."""

BUFFER_FACTOR = 2
"""The candidate buffer holds ``BUFFER_FACTOR * c`` entries per row before it is cut back."""

QUERY_ROWS = 256
"""Query cells per task of the search."""

CELL_COLUMNS = 2048
"""Cells per tile of the search: a tile of 256 x 2048 float32 is 2 MiB, a row 8 KiB."""

_CENTRING_ROWS = 1 << 16  # cells centred per step: bounds the float64 scratch to 64 Ki rows
_ERROR_PER_DIMENSION = 4 * 2.0**-24  # the rounding bound is this * (d + 4) * (|q|^2 + |r|^2)
# Underflow in the float32 products and sums: d + 4 steps of 2^-149 at most (also when subnormal
# results are flushed to zero), for d < 2^24.
_FLOAT32_TINY = 2.0**-100
# The relative rounding of a squared float64 distance summed over d dimensions, with room to spare
# (d 2^-53 is below it up to d ~ 8000).
_SQUARE_SLACK = 2.0**-40


def nearest_neighbours(
    points: np.ndarray, query_idx: np.ndarray, n_neighbors: int, threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_neighbors - 1`` nearest cells of each query cell, the cell itself left out.

    Parameters
    ----------
    points
        All cells, shape (n_cells, n_dims), float64, finite.
    query_idx
        Indices of the query cells, shape (n_query,), int64, each in [0, n_cells).
    n_neighbors
        Cells of a neighbourhood with the cell itself, 1 <= n_neighbors <= n_cells.
    threads
        CPU threads; the result is the same for any number.

    Returns
    -------
    Exact distances and indices, each of shape (n_query, n_neighbors - 1), in (distance, index)
    order: those of a full sort.
    """
    n_candidates = min(n_neighbors + metrics.CANDIDATE_MARGIN, points.shape[0])
    search = SinglePrecisionSearch(points, query_idx, threads)
    candidates, outside = search.candidates(n_candidates)
    distances, indices = metrics._nearest_candidates(
        points, query_idx, candidates, n_neighbors, np, threads
    )
    unsure = unsure_rows(distances, outside)
    if unsure.size:
        distances[unsure], indices[unsure] = search.within(
            unsure, distances[unsure, -1], n_neighbors - 1
        )
    return distances, indices


def unsure_rows(distances: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """Positions of the query cells whose neighbourhood edge (the last of ``distances``) the cells
    left out could reach: their squared distance bound ``outside`` is not beyond the edge."""
    if distances.shape[1] == 0:  # no neighbours asked for
        return np.empty(0, dtype=np.int64)
    edge = distances[:, -1] ** 2 * (1 + _SQUARE_SLACK)
    return np.flatnonzero(~(outside > edge))


class SinglePrecisionSearch:
    """The cells and query cells in single precision, and the two searches over them.

    Parameters
    ----------
    points
        All cells, shape (n_cells, n_dims), float64, finite.
    query_idx
        Indices of the query cells, shape (n_query,).
    threads
        CPU threads of the searches.
    """

    def __init__(self, points: np.ndarray, query_idx: np.ndarray, threads: int) -> None:
        n_cells, n_dims = points.shape
        self.points, self.query_idx, self.threads = points, query_idx, threads
        mean = points.mean(axis=0)
        # the largest |x - mean| of any coordinate (rounding is monotonic), without a centred copy
        largest = max(float(np.max(points.max(axis=0) - mean, initial=0.0)),
                      float(np.max(mean - points.min(axis=0), initial=0.0)))  # fmt: skip
        # a power of two: the scaling is exact and the ranking unchanged
        self.scale = 2.0 ** -math.ceil(math.log2(largest)) if largest > 0 else 1.0
        # [r, |r|^2] against [-2 q, 1], the coordinates centred and scaled in float64 chunk by chunk
        self.cells = np.empty((n_cells, n_dims + 1), dtype=np.float32)
        norms = np.empty(n_cells)  # each at most n_dims
        for start in range(0, n_cells, _CENTRING_ROWS):
            rows = slice(start, start + _CENTRING_ROWS)
            centred = points[rows] - mean
            centred *= self.scale
            norms[rows] = np.einsum("ij,ij->i", centred, centred)
            self.cells[rows, :n_dims] = centred
        self.cells[:, n_dims] = norms
        self.largest_norm = float(norms.max(initial=0.0))
        self.query_norms = norms[query_idx]
        self.queries = np.empty((query_idx.shape[0], n_dims + 1), dtype=np.float32)
        self.queries[:, :n_dims] = self.cells[query_idx, :n_dims]
        self.queries[:, :n_dims] *= -2  # exact: a power of two
        self.queries[:, n_dims] = 1
        self.error = _ERROR_PER_DIMENSION * (n_dims + 4)

    def _tiles(self, rows: np.ndarray | slice):
        """(first cell, values) for each tile of the query cells at positions ``rows``: values
        ``|r|^2 - 2 q.r`` in float32, shape (rows, up to CELL_COLUMNS), in one reused buffer."""
        queries = self.queries[rows]
        tile = np.empty((queries.shape[0], CELL_COLUMNS), dtype=np.float32)
        for first in range(0, self.cells.shape[0], CELL_COLUMNS):
            block = self.cells[first : first + CELL_COLUMNS]
            view = tile[:, : block.shape[0]]
            np.matmul(queries, block.T, out=view)
            yield first, view

    def candidates(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``c`` cells of smallest single-precision distance from each query cell, and a
        squared distance every other cell is known to reach.

        Returns
        -------
        Candidate indices, shape (n_query, c), int64, and the bound, shape (n_query,), float64:
        the larger of two lower bounds on the true squared distance of a cell left out, whose
        single-precision value ``a~`` is at least the largest kept one ``a``, so that its true
        value is at least ``a - E (|q|^2 + |r|^2)`` (E the error per unit, module docstring).
        With ``|r|^2 <= max |r|^2`` that gives ``a + |q|^2 - E (|q|^2 + max |r|^2)``; with
        ``|r|^2 <= 2 |q|^2 + 2 D`` (D the squared distance) it gives
        ``(a + |q|^2 - 3 E |q|^2) / (1 + 2 E)``, which one far outlier does not spoil. +inf
        when every cell is a candidate.
        """
        n_cells, n_query = self.cells.shape[0], self.query_idx.shape[0]
        if c >= n_cells:
            return np.tile(np.arange(n_cells), (n_query, 1)), np.full(n_query, np.inf)
        found = np.empty((n_query, c), dtype=np.int64)
        largest = np.empty((n_query, c), dtype=np.float32)
        capacity = BUFFER_FACTOR * c

        def task(rows: slice) -> None:
            n_rows = rows.stop - rows.start
            values = np.empty((n_rows, capacity), dtype=np.float32)
            columns = np.empty((n_rows, capacity), dtype=np.int64)
            counts = np.zeros(n_rows, dtype=np.int64)
            thresholds = np.full(n_rows, np.inf, dtype=np.float32)
            for first, tile in self._tiles(rows):
                keep_smallest(tile, first, values, columns, counts, thresholds, c)
            smallest_in_order(values, columns, counts, c, found[rows], largest[rows])

        self._run(task, n_query)
        kept = largest[:, -1].astype(np.float64)
        q2, e = self.query_norms, self.error
        by_largest = kept + q2 - e * (q2 + self.largest_norm)
        by_distance = (kept + q2 - 3 * e * q2) / (1 + 2 * e)
        reach = np.maximum(by_largest, by_distance) - _FLOAT32_TINY
        return found, reach / self.scale**2

    def within(self, rows: np.ndarray, edge: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact ``k`` nearest cells of the query cells at positions ``rows``, given for each
        a distance ``edge`` that its k-th nearest cell does not exceed.

        Every cell whose single-precision value could belong to a cell within ``edge`` (the
        bound of :meth:`candidates` read the other way) is measured exactly, tile by tile, and the
        first ``k`` in (distance, index) order are kept, the query cell itself left out.

        Returns
        -------
        Distances and indices, each of shape (len(rows), k).
        """
        distances = np.empty((rows.shape[0], k))
        indices = np.empty((rows.shape[0], k), dtype=np.int64)
        limit = self.value_limit(rows, edge)

        def task(chunk: slice) -> None:
            query = self.query_idx[rows[chunk]]
            best = _Nearest(query.shape[0], k, self.points.shape[0])
            for first, tile in self._tiles(rows[chunk]):
                row, column = np.nonzero(tile <= limit[chunk, None])
                column += first
                other = column != query[row]
                row, column = row[other], column[other]
                if row.size:
                    differences = self.points[column] - self.points[query[row]]
                    best.add(row, metrics.ordered_distances(differences), column)
            distances[chunk], indices[chunk] = best.distances, best.indices

        self._run(task, rows.shape[0])
        return distances, indices

    def value_limit(self, rows: np.ndarray, edge: np.ndarray) -> np.ndarray:
        """The largest single-precision value a cell within distance ``edge`` of each query cell
        at positions ``rows`` can have: its squared distance, scaled, less ``|q|^2``, plus the
        rounding bound, with ``|r|^2`` bounded by ``max |r|^2`` or by ``2 |q|^2 + 2 edge^2``,
        whichever is smaller. Shape (len(rows),), float64."""
        reach = (edge * self.scale) ** 2 * (1 + _SQUARE_SLACK)
        q2, e = self.query_norms[rows], self.error
        return (
            reach - q2 + e * np.minimum(q2 + self.largest_norm, 3 * q2 + 2 * reach) + _FLOAT32_TINY
        )

    def _run(self, task, n_rows: int) -> None:
        """``task(rows)`` for each slice of :data:`QUERY_ROWS` rows, on the step's threads."""

        def one(i: int) -> None:
            task(slice(i * QUERY_ROWS, min(n_rows, (i + 1) * QUERY_ROWS)))

        metrics._run_chunks(one, -(-n_rows // QUERY_ROWS), np, self.threads)


class _Nearest:
    """The ``k`` smallest (distance, index) pairs of each of ``n_rows`` rows seen so far."""

    def __init__(self, n_rows: int, k: int, no_index: int) -> None:
        self.k = k
        self.distances = np.full((n_rows, k), np.inf)
        self.indices = np.full((n_rows, k), no_index, dtype=np.int64)  # sorts after every cell

    def add(self, row: np.ndarray, distance: np.ndarray, index: np.ndarray) -> None:
        n_rows, k = self.distances.shape
        row = np.concatenate([np.repeat(np.arange(n_rows), k), row])
        distance = np.concatenate([self.distances.ravel(), distance])
        index = np.concatenate([self.indices.ravel(), index])
        order = np.lexsort((index, distance, row))
        row, distance, index = row[order], distance[order], index[order]
        rank = np.arange(row.shape[0]) - np.searchsorted(row, row)  # position within its row
        kept = rank < k
        self.distances[row[kept], rank[kept]] = distance[kept]
        self.indices[row[kept], rank[kept]] = index[kept]


@njit(cache=True, error_model="numpy", nogil=True)
def _cut_back(values, columns, n, c):
    """Keep the ``c`` smallest of the first ``n`` entries, in (value, column) order, at the front;
    returns the new threshold (the ``c``-th value)."""
    order = np.argsort(values[:n], kind="mergesort")[:c]  # stable: equal values keep column order
    kept_values = values[order]
    kept_columns = columns[order]
    values[:c] = kept_values
    columns[:c] = kept_columns
    return values[c - 1]


@njit(cache=True, error_model="numpy", nogil=True)
def _count_below(row, start, stop, threshold):
    hits = 0
    for j in range(start, stop):
        hits += row[j] < threshold
    return hits


@njit(cache=True, error_model="numpy", nogil=True)
def _first_threshold(row, values, columns, first_column, c):
    """Fill an empty buffer with the ``c`` smallest entries of ``row`` in (value, column) order
    and return the ``c``-th value. A selection finds that value first, so that the buffer is not
    filled and cut back again and again while the threshold is still high."""
    kth = np.partition(row, c - 1)[c - 1]
    n = 0
    for j in range(row.shape[0]):
        if row[j] <= kth:  # at least c entries; more when values tie with the c-th
            if n == values.shape[0]:
                _cut_back(values, columns, n, c)
                n = c
            values[n] = row[j]
            columns[n] = first_column + j
            n += 1
    return _cut_back(values, columns, n, c)


@njit(cache=True, error_model="numpy", nogil=True)
def keep_smallest(tile, first_column, values, columns, counts, thresholds, c):
    """Merge one tile into the running ``c`` smallest entries of each row.

    Parameters
    ----------
    tile
        Values, shape (n_rows, n_columns), float32; column ``j`` is column ``first_column + j`` of
        the whole row.
    values, columns
        Per row, the buffer of kept values and their columns, shape (n_rows, BUFFER_FACTOR * c),
        updated in place; ``counts`` (n_rows,) says how many entries each holds.
    thresholds
        Per row, the value an entry must be below to be kept, shape (n_rows,), updated in place
        (start at +inf).
    c
        Entries to keep per row, at least 1.
    """
    capacity = values.shape[1]
    n_columns = tile.shape[1]
    for i in range(tile.shape[0]):
        row = tile[i]
        threshold = thresholds[i]
        n = counts[i]
        if n == 0 and n_columns >= c:
            thresholds[i] = _first_threshold(row, values[i], columns[i], first_column, c)
            counts[i] = c
            continue
        if _count_below(row, 0, n_columns, threshold) == 0:
            continue
        for start in range(0, n_columns, GROUP):
            stop = min(start + GROUP, n_columns)
            if _count_below(row, start, stop, threshold) == 0:
                continue
            for j in range(start, stop):
                if row[j] < threshold:
                    values[i, n] = row[j]
                    columns[i, n] = first_column + j
                    n += 1
                    if n == capacity:
                        threshold = _cut_back(values[i], columns[i], n, c)
                        n = c
        thresholds[i] = threshold
        counts[i] = n


@njit(cache=True, error_model="numpy", nogil=True)
def smallest_in_order(values, columns, counts, c, out_columns, out_values):
    """The ``c`` kept entries of each row in (value, column) order: their columns and values
    (``out_columns``, ``out_values``, shape (n_rows, c)). Every row must hold at least ``c``."""
    for i in range(values.shape[0]):
        n = counts[i]
        _cut_back(values[i], columns[i], n, c)
        out_columns[i] = columns[i, :c]
        out_values[i] = values[i, :c]
