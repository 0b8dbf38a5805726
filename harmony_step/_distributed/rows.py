"""Which cells each GPU holds: contiguous, near-equal ranges of the global cell order."""

from __future__ import annotations


def row_range(n_cells: int, size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank`` when ``n_cells`` rows are split over ``size`` ranks.

    Rank r gets ``[r * n_cells // size, (r + 1) * n_cells // size)``: the ranges are contiguous,
    cover every row once in order, and differ in length by at most one row.

    Raises
    ------
    ValueError
        ``size < 1``, ``rank`` outside ``[0, size)`` or ``n_cells < 0``.
    """
    if size < 1 or not 0 <= rank < size or n_cells < 0:
        raise ValueError(
            f"row_range needs size >= 1, 0 <= rank < size and n_cells >= 0; "
            f"got n_cells={n_cells}, size={size}, rank={rank}."
        )
    return rank * n_cells // size, (rank + 1) * n_cells // size


def byte_chunks(n_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """``[start, stop)`` byte ranges of at most ``chunk_bytes`` covering ``n_bytes`` in order."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1; got {chunk_bytes}.")
    return [(a, min(a + chunk_bytes, n_bytes)) for a in range(0, n_bytes, chunk_bytes)]
