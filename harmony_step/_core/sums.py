"""Fixed-order sums over cells, accumulated in float64 (spec section 12).

No floating-point atomics: per-level and per-cluster sums are dense GEMMs over row chunks, added
in chunk order, so the same input gives the same bits on every run.
"""

from __future__ import annotations

from typing import Any

from harmony_step import _kernels

# Rows per chunk of the chunked sums: an eighth of the cells, within these bounds. The float64
# scratch (~rows * (K + d) * 8 bytes) stays a small share of R (N x K) while big inputs need few
# launches. It depends only on N, so the summation order, and the result, are fixed for an input.
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 1 << 16, 1 << 19


def chunk_rows(n_cells: int) -> int:
    return min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, n_cells // 8))


# Guard for row normalisation: a zero row stays zero instead of becoming NaN.
NORM_FLOOR = 1e-12


def one_hot(xp: Any, codes: Any, n_levels: int, dtype: Any) -> Any:
    """Stacked one-hot of ``codes`` (n, C): each row has C ones, one per key, shape (n, n_levels)."""
    out = _kernels.one_hot(xp, codes, n_levels)
    return out if dtype == out.dtype else out.astype(dtype)


def level_sums(xp: Any, codes: Any, values: Any, n_levels: int) -> Any:
    """sum_i Phi_ib * values_i for every level b, (n_levels, m) float64; values (n, m)."""
    out = xp.zeros((n_levels, values.shape[1]), dtype=xp.float64)
    step = chunk_rows(values.shape[0])
    for start in range(0, values.shape[0], step):
        stop = start + step
        phi = one_hot(xp, codes[start:stop], n_levels, xp.float64)
        out += phi.T @ values[start:stop].astype(xp.float64, copy=False)
    return out


def cross_sums(xp: Any, left: Any, right: Any) -> Any:
    """left^T @ right over all rows in float64, chunked: (m1, m2)."""
    out = xp.zeros((left.shape[1], right.shape[1]), dtype=xp.float64)
    step = chunk_rows(left.shape[0])
    for start in range(0, left.shape[0], step):
        stop = start + step
        out += left[start:stop].astype(xp.float64, copy=False).T @ right[start:stop].astype(
            xp.float64, copy=False
        )
    return out


def row_normalize(xp: Any, x: Any, out: Any = None) -> Any:
    """Rows scaled to unit L2 norm; all-zero rows stay zero."""
    norms = xp.sqrt((x * x).sum(axis=1, keepdims=True))
    return xp.divide(x, xp.maximum(norms, NORM_FLOOR), out=out)
