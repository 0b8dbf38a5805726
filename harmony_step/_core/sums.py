"""Sums over cells, in a fixed order or exactly (docs/algorithm.md §12).

No floating-point atomics: O is summed exactly in fixed point (``kernels.FIXED_POINT_SCALE``), and
the K x d products R^T Z are GEMMs over fixed row chunks in the working dtype, whose partial sums
are added in float64 in chunk order. Neither copies N x K or N x d data to float64, and both depend
only on N, so the same input gives the same bits on every run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harmony_step._core import kernels

# Rows per chunk of the chunked per-level sums: an eighth of the cells, within these bounds.
# The scratch stays a small share of R (N x K) while big inputs need few launches.
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 1 << 16, 1 << 19
# Rows summed in the working dtype before a partial product joins the float64 total: short enough
# that float32 rounding stays near 1e-6 relative on the CPU, where chunks are shared among threads;
# on the GPU fewer, longer GEMMs run faster (a batched GEMM over short chunks was 2.5x slower).
CROSS_CHUNK_ROWS = 1 << 14
GPU_CROSS_CHUNK_ROWS = 1 << 18


def chunk_rows(n_cells: int) -> int:
    return min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, n_cells // 8))


# Guard for row normalisation: a zero row stays zero instead of becoming NaN.
NORM_FLOOR = kernels.NORM_FLOOR


def one_hot(xp: Any, codes: Any, n_levels: int, dtype: Any) -> Any:
    """Stacked one-hot of ``codes`` (n, C): each row has C ones, one per key, shape (n, n_levels)."""
    out = kernels.one_hot(xp, codes, n_levels)
    return out if dtype == out.dtype else out.astype(dtype)


def level_sums(xp: Any, codes: Any, assignments: Any, n_levels: int) -> Any:
    """O = sum_i Phi_ib R_ik for every level b, in fixed point: (n_levels, K) int64.

    ``codes`` (N, C) int32, ``assignments`` (N, K) working dtype. Exact, so any order gives the
    same bits; ``counts`` turns it into float64 cell mass.
    """
    observed = xp.zeros((n_levels, assignments.shape[1]), dtype=xp.int64)
    kernels.block_update(
        xp, None, None, codes, None, 0, assignments, None, observed, 0.0, other_sign=1
    )
    return observed


def counts(xp: Any, fixed: Any) -> Any:
    """Fixed-point mass (int64) as float64 cell counts."""
    return fixed.astype(xp.float64) * (1.0 / kernels.FIXED_POINT_SCALE)


def cross_sums(xp: Any, left: Any, right: Any) -> Any:
    """left^T @ right over all rows, (m1, m2) float64, from (N, m1) and (N, m2) in the working dtype.

    One GEMM of the working dtype per chunk of rows (``CROSS_CHUNK_ROWS`` on the CPU,
    ``GPU_CROSS_CHUNK_ROWS`` on the GPU); the partial products are summed in float64 in chunk order.
    """
    if xp is np:
        return kernels.cpu().cross_sums(left, right)
    out = xp.zeros((left.shape[1], right.shape[1]), dtype=xp.float64)
    for start in range(0, left.shape[0], GPU_CROSS_CHUNK_ROWS):
        stop = start + GPU_CROSS_CHUNK_ROWS
        out += left[start:stop].T @ right[start:stop]
    return out


def matmul(xp: Any, left: Any, right: Any, out: Any = None) -> Any:
    """left @ right, into ``out`` if given; on the CPU in fixed row chunks on the run's threads
    (``cpu_kernels.matmul``)."""
    if xp is np:
        return kernels.cpu().matmul(left, right, out)
    return xp.matmul(left, right, out=out)


def row_normalize(xp: Any, x: Any, out: Any = None) -> Any:
    """Rows scaled to unit L2 norm (squares summed in the working dtype); all-zero rows stay zero."""
    if xp is np:  # one pass, on the run's threads
        out = np.empty_like(x) if out is None else out
        kernels.cpu().row_normalize(x, NORM_FLOOR, out)
        return out
    norms = xp.sqrt((x * x).sum(axis=1, keepdims=True))
    return xp.divide(x, xp.maximum(norms, NORM_FLOOR), out=out)


def largest_magnitude(xp: Any, x: Any) -> Any:
    """max |x| as a 0-d array, NaN if x holds a NaN (then not finite, like an Inf)."""
    if xp is np:
        return np.asarray(kernels.cpu().largest_magnitude(x.reshape(-1)), dtype=x.dtype)
    return xp.abs(x).max()
