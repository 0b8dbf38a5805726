"""Fixed-order sums over cells, accumulated in float64 (spec section 12).

No floating-point atomics: per-level and per-cluster sums are dense GEMMs over row chunks, added
in chunk order, so the same input gives the same bits on every run.
"""

from __future__ import annotations

from typing import Any

# Rows per chunk of the chunked sums: bounds the float64 scratch to ~CHUNK_ROWS * (K + d) * 8 bytes.
CHUNK_ROWS = 1 << 17
# Guard for row normalisation: a zero row stays zero instead of becoming NaN.
NORM_FLOOR = 1e-12


def one_hot(xp: Any, codes: Any, n_levels: int, dtype: Any) -> Any:
    """Stacked one-hot of ``codes`` (n, C): each row has C ones, one per key, shape (n, n_levels)."""
    n = codes.shape[0]
    out = xp.zeros((n, n_levels), dtype=dtype)
    rows = xp.arange(n)
    for c in range(codes.shape[1]):
        out[rows, codes[:, c]] = 1
    return out


def level_sums(xp: Any, codes: Any, values: Any, n_levels: int) -> Any:
    """sum_i Phi_ib * values_i for every level b, (n_levels, m) float64; values (n, m)."""
    out = xp.zeros((n_levels, values.shape[1]), dtype=xp.float64)
    for start in range(0, values.shape[0], CHUNK_ROWS):
        stop = start + CHUNK_ROWS
        phi = one_hot(xp, codes[start:stop], n_levels, xp.float64)
        out += phi.T @ values[start:stop].astype(xp.float64, copy=False)
    return out


def cross_sums(xp: Any, left: Any, right: Any) -> Any:
    """left^T @ right over all rows in float64, chunked: (m1, m2)."""
    out = xp.zeros((left.shape[1], right.shape[1]), dtype=xp.float64)
    for start in range(0, left.shape[0], CHUNK_ROWS):
        stop = start + CHUNK_ROWS
        out += left[start:stop].astype(xp.float64, copy=False).T @ right[start:stop].astype(
            xp.float64, copy=False
        )
    return out


def row_normalize(xp: Any, x: Any, out: Any = None) -> Any:
    """Rows scaled to unit L2 norm; all-zero rows stay zero."""
    norms = xp.sqrt((x * x).sum(axis=1, keepdims=True))
    return xp.divide(x, xp.maximum(norms, NORM_FLOOR), out=out)
