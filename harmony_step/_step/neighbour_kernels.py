"""CPU kernel of the metrics' neighbour search: the smallest entries of each row of a distance tile.

The search (``metrics._candidates_float32``) computes single-precision distance tiles by BLAS and
hands each tile to :func:`keep_smallest`, which keeps, per query row, the ``c`` smallest values
seen so far across tiles. Imported only on the CPU, so the package and the GPU path do not compile
numba code for it.

Per row the kernel holds a buffer of candidates and a threshold: the ``c``-th smallest value once
``c`` are known, +inf before. A tile's row is first checked as a whole (a count of the entries
below the threshold, which the compiler vectorises); most rows of most tiles hold none. Only in a
row that does, groups of :data:`GROUP` columns are checked the same way and the groups with hits
are scanned entry by entry. A full buffer is cut back to its ``c`` smallest. The kept entries are
the ``c`` smallest in (value, column) order: columns arrive in increasing order and an entry equal
to the threshold is not taken, so on ties the earlier column stays.
"""

from __future__ import annotations

import numpy as np
from numba import njit

GROUP = 64
"""Columns per group of the second check (within a row that has entries below its threshold)."""

BUFFER_FACTOR = 2
"""The candidate buffer holds ``BUFFER_FACTOR * c`` entries per row before it is cut back."""


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
                n = c
                _cut_back(values, columns, values.shape[0], c)
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


def smallest_reference(tile: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference of the whole pipeline on one tile: columns and values of the ``c``
    smallest entries of each row in (value, column) order."""
    order = np.argsort(tile, axis=1, kind="stable")[:, :c]
    return order, np.take_along_axis(tile, order, axis=1)
