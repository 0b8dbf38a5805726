"""The CPU's neighbour search for the mixing metrics: single precision, exact results.

The metrics need, for each query cell, its ``k`` nearest cells in (exact float64 distance, index)
order (``metrics.neighbours``). :func:`nearest_neighbours` finds them in up to four steps:

1. **Candidates in single precision** (:class:`TiledSearch` in float32). The coordinates are
   centred, scaled by a power of two into [-1, 1] (exact; single precision then neither
   overflows nor loses tiny values) and rounded. One BLAS product per tile of :data:`QUERY_ROWS`
   query cells and :data:`CELL_COLUMNS` cells gives ``|r|^2 - 2 q.r`` (the query's own norm does
   not change the ranking), and the compiled kernel :func:`keep_smallest` keeps the smallest
   values of each query across tiles. BLAS runs single-threaded on fixed tiles, the query chunks
   spread over the step's threads, so the result does not depend on the thread count; this runs
   at the speed of single-precision BLAS.
2. **Exact re-ranking** of the candidates (``metrics._nearest_candidates``), as on the GPU, and a
   check: every cell left out has a computed value at least the largest kept one, so its true
   squared distance is at least that less a bound on the rounding error
   (:meth:`TiledSearch.candidates`). Where that could reach the neighbourhood's edge, the
   candidates might not hold the neighbourhood. On realistic data that happens to no cell.
3. **The same in double precision** for those cells only, whose rounding bound is about 10^9
   times tighter (clusters far from the mean, values closer than single precision resolves).
4. **An exact search** (:meth:`TiledSearch.within`) for the cells even that cannot vouch for,
   in practice cells with ties at the edge (duplicates, lattices): every cell whose computed
   value could lie within the edge is measured exactly and the first ``k`` in (distance, index)
   order are kept.

The rounding error of one value, with u the unit roundoff (2^-24 or 2^-53): the products and
sums add at most (d + 1) u (|q|^2 + 2 |r|^2) for any order and with or without fused multiply-adds,
the rounding of the coordinates 2 u (|q|^2 + |r|^2) to first order, and that of the norm column
u |r|^2; in all under (d + 3) u |q|^2 + (2d + 5) u |r|^2. The bound used, 4 (d + 4) u (|q|^2 +
|r|^2), doubles that, which also covers the second-order terms and the float64 rounding of the
centring and of the norms; :data:`_UNDERFLOW` adds what underflow can lose.

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
from typing import NamedTuple

import numpy as np
from numba import njit

from harmony_step._step import metrics
from harmony_step._threads import run_chunks

GROUP = 64
"""Columns per group of the kernel's second check (within a row that has entries below its
threshold)."""

BUFFER_FACTOR = 2
"""The candidate buffer holds ``BUFFER_FACTOR * c`` entries per row before it is cut back."""

QUERY_ROWS = 256
"""Query cells per task of the search."""

CELL_COLUMNS = 512
"""Cells per tile of the search: a tile of 256 x 512 float32 is 512 KiB, which stays in a core's
L2 cache between the product that writes it and the kernel that reads it. On a 2-core AMD EPYC
(1 MiB of L2 per core), 10,000 query cells against a million took 7.5 s with 2048 columns and
6.6 s with 512; against 200,000 cells the two were level."""

_SUMMARY_ROWS = 1 << 16  # cells per chunk of the column sums: fixed, so the mean is too
_CENTRING_ROWS = 1 << 13  # cells centred per task: each thread's float64 scratch
_HITS_PER_BATCH = 1 << 15  # cells measured at once by the exact search: bounds its scratch
# Absolute error from underflow in the products and sums, in the scaled units (where values are
# at most d): d + 4 steps of the smallest normal number at most, also when subnormal results are
# flushed to zero, for d < 2^24.
_UNDERFLOW = {np.float32: 2.0**-100, np.float64: 2.0**-990}
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
        All cells, shape (n_cells, n_dims), float32 or float64; distances are those of the values
        in float64.
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

    Raises
    ------
    ValueError
        A coordinate that is not finite.
    """
    summary = ColumnSummary.of(points, threads)
    shift = metrics.safe_shift(summary.largest_magnitude())
    if shift:  # squares could overflow: search the cells scaled down by 2^shift (exactly)
        points = np.ldexp(points, -shift, dtype=np.float64)
        summary = ColumnSummary.of(points, threads)
    distances, indices = _nearest_without_overflow(points, query_idx, n_neighbors, threads, summary)
    return (np.ldexp(distances, shift) if shift else distances), indices


def _nearest_without_overflow(
    points: np.ndarray,
    query_idx: np.ndarray,
    n_neighbors: int,
    threads: int,
    summary: ColumnSummary,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`nearest_neighbours` for cells whose squared distances cannot overflow."""
    n_candidates = min(n_neighbors + metrics.CANDIDATE_MARGIN, points.shape[0])
    distances, indices, unsure = _searched(
        TiledSearch(points, query_idx, threads, np.float32, summary), n_candidates, n_neighbors
    )
    if unsure.size:  # again in double precision, for those cells only
        search = TiledSearch(points, query_idx[unsure], threads, np.float64, summary)
        again, again_indices, still = _searched(search, n_candidates, n_neighbors)
        if still.size:  # ties at the edge, or closer than double precision resolves
            again[still], again_indices[still] = search.within(
                still, again[still, -1], n_neighbors - 1
            )
        distances[unsure], indices[unsure] = again, again_indices
    return distances, indices


def _searched(
    search: TiledSearch, n_candidates: int, n_neighbors: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The search's candidates re-ranked exactly: distances, indices, and the positions of the
    query cells whose neighbourhood the candidates might not hold."""
    candidates, outside = search.candidates(n_candidates)
    distances, indices = metrics._nearest_candidates(
        search.points, search.query_idx, candidates, n_neighbors, np, search.threads
    )
    return distances, indices, unsure_rows(distances, outside)


def unsure_rows(distances: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """Positions of the query cells whose neighbourhood edge (the last of ``distances``) the cells
    left out could reach: their squared distance bound ``outside`` is not beyond the edge."""
    if distances.shape[1] == 0:  # no neighbours asked for
        return np.empty(0, dtype=np.int64)
    edge = distances[:, -1] ** 2 * (1 + _SQUARE_SLACK)
    return np.flatnonzero(~(outside > edge))


class ColumnSummary(NamedTuple):
    """Per dimension, the smallest and largest coordinate and the float64 sum over the cells,
    computed chunk by chunk (fixed chunks of rows, so the sums are the same for any thread count)
    on the step's threads."""

    minimum: np.ndarray
    maximum: np.ndarray
    total: np.ndarray

    @classmethod
    def of(cls, points: np.ndarray, threads: int) -> ColumnSummary:
        """The summary of ``points`` (n_cells, n_dims); raises ValueError on a value that is not
        finite (``metrics.NOT_FINITE``)."""
        n_cells, n_dims = points.shape
        n_chunks = -(-n_cells // _SUMMARY_ROWS)
        parts = np.empty((3, n_chunks, n_dims))

        def chunk(i: int) -> None:
            rows = points[i * _SUMMARY_ROWS : (i + 1) * _SUMMARY_ROWS]
            parts[0, i], parts[1, i] = rows.min(axis=0), rows.max(axis=0)
            # Huge coordinates (rescaled afterwards) can overflow the sum, and +Inf beside -Inf
            # gives NaN; neither may warn before the check below names the problem.
            with np.errstate(over="ignore", invalid="ignore"):
                parts[2, i] = rows.sum(axis=0, dtype=np.float64)

        run_chunks(chunk, n_chunks, threads)
        with np.errstate(over="ignore", invalid="ignore"):
            total = parts[2].sum(axis=0)
        summary = cls(parts[0].min(axis=0), parts[1].max(axis=0), total)
        if not (np.isfinite(summary.minimum).all() and np.isfinite(summary.maximum).all()):
            raise ValueError(metrics.NOT_FINITE)
        return summary

    def largest_magnitude(self) -> float:
        """The largest absolute value of any coordinate."""
        return float(max(np.max(-self.minimum, initial=0.0), np.max(self.maximum, initial=0.0)))


class TiledSearch:
    """The cells and query cells, centred and scaled, in ``dtype``, and the two searches over them.

    Parameters
    ----------
    points
        All cells, shape (n_cells, n_dims), float32 or float64, finite, with squared distances in
        float64's normal range (:func:`nearest_neighbours` rescales inputs that are not).
    query_idx
        Indices of the query cells, shape (n_query,).
    threads
        CPU threads of the searches.
    dtype
        float32 for the first, fast search; float64 for the second one, whose rounding bound is
        about 10^9 times tighter.
    summary
        The cells' :class:`ColumnSummary`, when already known.
    """

    def __init__(
        self,
        points: np.ndarray,
        query_idx: np.ndarray,
        threads: int,
        dtype: type = np.float32,
        summary: ColumnSummary | None = None,
    ) -> None:
        n_cells, n_dims = points.shape
        self.points, self.query_idx, self.threads = points, query_idx, threads
        self.dtype = np.dtype(dtype)
        summary = summary if summary is not None else ColumnSummary.of(points, threads)
        mean = summary.total / n_cells
        # the largest |x - mean| of any coordinate (rounding is monotonic), without a centred copy
        largest = max(float(np.max(summary.maximum - mean, initial=0.0)),
                      float(np.max(mean - summary.minimum, initial=0.0)))  # fmt: skip
        # Coordinates times 2^-shift lie in [-1, 1]: a power of two, so the scaling is exact and
        # the ranking unchanged.
        self.shift = math.ceil(math.log2(largest)) if largest > 0 else 0
        # [r, |r|^2] against [-2 q, 1], the coordinates centred and scaled in float64 chunk by chunk
        self.cells = np.empty((n_cells, n_dims + 1), dtype=self.dtype)
        norms = np.empty(n_cells)  # each at most n_dims

        def centre(i: int) -> None:
            rows = slice(i * _CENTRING_ROWS, (i + 1) * _CENTRING_ROWS)
            centred = np.ldexp(points[rows] - mean, -self.shift)
            norms[rows] = np.einsum("ij,ij->i", centred, centred)
            self.cells[rows, :n_dims] = centred
            self.cells[rows, n_dims] = norms[rows]

        run_chunks(centre, -(-n_cells // _CENTRING_ROWS), threads)
        self.largest_norm = float(norms.max(initial=0.0))
        self.query_norms = norms[query_idx]
        self.queries = np.empty((query_idx.shape[0], n_dims + 1), dtype=self.dtype)
        self.queries[:, :n_dims] = self.cells[query_idx, :n_dims]
        self.queries[:, :n_dims] *= -2  # exact: a power of two
        self.queries[:, n_dims] = 1
        unit = np.finfo(self.dtype).eps / 2  # 2^-24 or 2^-53
        self.error = 4 * unit * (n_dims + 4)  # per unit of |q|^2 + |r|^2 (module docstring)
        # Underflow in the computed values, and in the exact distances they are compared with
        # (each square of the input's differences can lose 2^-1074), both in the scaled units.
        self.underflow = _UNDERFLOW[self.dtype.type] + float(
            np.ldexp((n_dims + 2) * 2.0**-1074, -2 * self.shift)
        )

    def _tiles(self, rows: np.ndarray | slice):
        """(first cell, values) for each tile of the query cells at positions ``rows``: values
        ``|r|^2 - 2 q.r`` in ``dtype``, shape (rows, up to CELL_COLUMNS), in one reused buffer."""
        queries = self.queries[rows]
        tile = np.empty((queries.shape[0], CELL_COLUMNS), dtype=self.dtype)
        for first in range(0, self.cells.shape[0], CELL_COLUMNS):
            block = self.cells[first : first + CELL_COLUMNS]
            view = tile[:, : block.shape[0]]
            np.matmul(queries, block.T, out=view)
            yield first, view

    def candidates(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``c`` cells of smallest computed distance from each query cell, and a squared
        distance every other cell is known to reach.

        Returns
        -------
        Candidate indices, shape (n_query, c), int64, and the bound, shape (n_query,), float64,
        in the units of ``points``. In the scaled units used here: the larger of two lower bounds
        on the true squared distance D of a cell left out, whose computed value is at least the
        largest kept one ``a``, so that its true value ``|r|^2 - 2 q.r`` is at least
        ``a - E (|q|^2 + |r|^2)`` (E the error per unit, module docstring). With
        ``|r|^2 <= max |r|^2`` that gives ``a + |q|^2 - E (|q|^2 + max |r|^2)``; with
        ``|r|^2 <= 2 |q|^2 + 2 D`` it gives ``(a + |q|^2 - 3 E |q|^2) / (1 + 2 E)``, which one
        far outlier does not spoil. +inf when every cell is a candidate.
        """
        n_cells, n_query = self.cells.shape[0], self.query_idx.shape[0]
        if c >= n_cells:
            return np.tile(np.arange(n_cells), (n_query, 1)), np.full(n_query, np.inf)
        found = np.empty((n_query, c), dtype=np.int64)
        largest = np.empty((n_query, c), dtype=self.dtype)
        capacity = BUFFER_FACTOR * c

        def task(rows: slice) -> None:
            n_rows = rows.stop - rows.start
            values = np.empty((n_rows, capacity), dtype=self.dtype)
            columns = np.empty((n_rows, capacity), dtype=np.int64)
            counts = np.zeros(n_rows, dtype=np.int64)
            thresholds = np.full(n_rows, np.inf, dtype=self.dtype)
            for first, tile in self._tiles(rows):
                keep_smallest(tile, first, values, columns, counts, thresholds, c)
            smallest_in_order(values, columns, counts, c, found[rows], largest[rows])

        self._run(task, n_query)
        kept = largest[:, -1].astype(np.float64)
        q2, e = self.query_norms, self.error
        by_largest = kept + q2 - e * (q2 + self.largest_norm)
        by_distance = (kept + q2 - 3 * e * q2) / (1 + 2 * e)
        reach = np.maximum(by_largest, by_distance) - self.underflow
        return found, np.ldexp(reach, 2 * self.shift)

    def within(self, rows: np.ndarray, edge: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact ``k`` nearest cells of the query cells at positions ``rows``, given for each
        a distance ``edge`` that its k-th nearest cell does not exceed.

        Every cell whose computed value could belong to a cell within the edge
        (:meth:`value_limit`) is measured exactly, tile by tile, and the first ``k`` in
        (distance, index) order are kept, the query cell itself left out. After each tile a row's
        edge shrinks to its k-th distance so far; a row whose k-th distance is 0 is complete,
        since the cells still to come have larger indices.

        Returns
        -------
        Distances and indices, each of shape (len(rows), k).
        """
        distances = np.empty((rows.shape[0], k))
        indices = np.empty((rows.shape[0], k), dtype=np.int64)

        def task(chunk: slice) -> None:
            positions = rows[chunk]
            query = self.query_idx[positions]
            row_edge = edge[chunk].copy()
            best = _Nearest(query.shape[0], k, self.points.shape[0])
            for first, tile in self._tiles(positions):
                limit = self.value_limit(positions, row_edge)
                limit[best.distances[:, -1] == 0] = -np.inf  # complete rows
                row, column = np.nonzero(tile <= limit[:, None])
                column += first
                other = column != query[row]
                for part in range(0, other.shape[0], _HITS_PER_BATCH):  # bounds the scratch
                    taken = slice(part, part + _HITS_PER_BATCH)
                    r, col = row[taken][other[taken]], column[taken][other[taken]]
                    widened = self.points[col].astype(np.float64, copy=False)  # a gathered copy
                    differences = widened - self.points[query[r]]
                    measured = metrics.ordered_distances(differences)
                    near = measured <= row_edge[r]  # the others cannot enter
                    if near.any():
                        best.add(r[near], measured[near], col[near])
                np.minimum(row_edge, best.distances[:, -1], out=row_edge)
            if not np.all(best.indices < self.points.shape[0]):
                raise RuntimeError("The exact neighbour search found fewer cells than it must.")
            distances[chunk], indices[chunk] = best.distances, best.indices

        self._run(task, rows.shape[0])
        return distances, indices

    def value_limit(self, rows: np.ndarray, edge: np.ndarray) -> np.ndarray:
        """The largest computed value a cell within distance ``edge`` of each query cell at
        positions ``rows`` can have: its squared distance, scaled, less ``|q|^2``, plus the
        rounding bound, with ``|r|^2`` bounded by ``max |r|^2`` or by ``2 |q|^2 + 2 edge^2``,
        whichever is smaller. Shape (len(rows),), float64, in the scaled units."""
        edge_squared = np.ldexp(edge, -self.shift) ** 2 * (1 + _SQUARE_SLACK)
        q2, e = self.query_norms[rows], self.error
        rounding = e * np.minimum(q2 + self.largest_norm, 3 * q2 + 2 * edge_squared)
        return edge_squared - q2 + rounding + self.underflow

    def _run(self, task, n_rows: int) -> None:
        """``task(rows)`` for each slice of :data:`QUERY_ROWS` rows, on the step's threads."""

        def one(i: int) -> None:
            task(slice(i * QUERY_ROWS, min(n_rows, (i + 1) * QUERY_ROWS)))

        metrics._run_chunks(one, -(-n_rows // QUERY_ROWS), np, self.threads)


class _Nearest:
    """The ``k`` smallest (distance, index) pairs of each of ``n_rows`` rows seen so far."""

    def __init__(self, n_rows: int, k: int, no_index: int) -> None:
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
