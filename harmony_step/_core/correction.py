"""The correction step (docs/algorithm.md §8): a mixture of ridge regressions, one per cluster.

Three pieces: per-level sums of R_ik x_i over cells (on the device, float64), the small
(B+1)-sized solves per cluster (on the host, float64, identical code for both backends), and the
subtraction of each cell's predicted batch effect (on the device). Strategies differ only in the solve:

- ``batched``: closed form (8.3) for all clusters at once (one key);
- ``fast``: the same closed form, cluster by cluster (one key; least scratch);
- ``original``: dense normal equations per cluster with Cholesky, least-squares fallback;
- ``general``: the dense solve with cross-key counts, used whenever there are several keys.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np

from harmony_step._batches import BatchDesign
from harmony_step._core import kernels
from harmony_step._core.raw import RawRows
from harmony_step._core.sums import counts, cross_sums, level_sums

# A cluster whose total mass is below this fraction of N gets no correction (docs/algorithm.md §8.2).
ZERO_MASS_FRACTION = 1e-12
# Automatic choice: the batched solve while K (B+1)^2 elements fit in this many bytes.
BATCHED_SCRATCH_BYTES = 1 << 30
# The device's level moments: each non-empty level's cells in pieces of equal length (a power of
# two within these bounds, the padding, at most one piece per level, under a quarter of the cells),
# a group of pieces gathered and multiplied at once. A group's scratch (group_pieces) stays under
# PIECE_SCRATCH_SHARE of R's bytes and under PIECE_SCRATCH_BYTES. A per-level loop costs some ten
# launches per level (64 levels: about 20 ms of host time per round at 100k cells).
MIN_PIECE_ROWS, MAX_PIECE_ROWS = 32, 4096
PIECE_SCRATCH_BYTES = 1 << 27
PIECE_SCRATCH_SHARE = 0.25


@dataclasses.dataclass(frozen=True)
class PieceGroup:
    """Pieces ``[first, stop)``, gathered and multiplied at once, and the levels they hold.

    The 0/1 matrix that adds the pieces' products into their levels, (L, stop - first), is formed
    when used (``level_rows == piece_level``), so only one group's exists at a time.
    """

    first: int
    stop: int
    levels: Any  # (L,) int64: the group's levels (global indices), each once, in piece order
    level_rows: Any  # (L, 1) int64: 0 .. L-1
    piece_level: Any  # (1, stop - first) int64: each piece's row in ``levels``


@dataclasses.dataclass(frozen=True)
class LevelPieces:
    """Every non-empty level's cells cut into pieces of equal length, for batched products on the
    device.

    The pieces of a level are consecutive and hold its cells in increasing order; the last one is
    padded with cell 0, masked out by ``valid``. Empty levels have no pieces.
    """

    cells: Any  # (n_pieces, P) int32 cell indices (int64 beyond 2^31 - 1 cells)
    valid: Any  # (n_pieces, P, 1) bool, False on padding
    groups: tuple[PieceGroup, ...]

    @classmethod
    def build(
        cls, xp: Any, codes: Any, counts: np.ndarray, product: tuple[int, int, np.dtype]
    ) -> LevelPieces:
        """Pieces of every level of ``codes`` (N, n_keys) on the device, the cells of a level in
        the order of a stable sort of its key's codes; ``counts`` (B,) are the cells per level, on
        the host, and ``product`` the (K, d, working dtype) of the moments, which sizes the groups.
        A handful of launches per key, with no per-level transfer to the host."""
        n_cells = codes.shape[0]
        rows = piece_rows(n_cells, int(np.count_nonzero(counts)))
        per_level = -(-counts // rows)
        n_pieces = int(per_level.sum())
        # A cell at position p of its key's sorted order, in level b, goes to slot
        # first_piece[b] * rows + (p - first cell of b in that order); the keys' levels follow one
        # another, so the first cell of b there is its exclusive count over all earlier levels,
        # less N per earlier key.
        shift = _exclusive_cumsum(per_level) * rows - _exclusive_cumsum(counts)
        shift = xp.asarray(shift.astype(np.int64))
        index_type = np.int32 if n_cells <= np.iinfo(np.int32).max else np.int64
        padded = xp.zeros(n_pieces * rows, dtype=index_type)
        valid = xp.zeros(n_pieces * rows, dtype=bool)
        for c in range(codes.shape[1]):
            order = xp.argsort(codes[:, c])  # stable: CuPy's radix sort
            slots = shift[codes[order, c]] + (xp.arange(n_cells) + c * n_cells)
            padded[slots] = order
            valid[slots] = True
        level_of_piece = np.repeat(np.arange(counts.size), per_level)
        size = group_pieces(n_cells, rows, *product)
        groups = tuple(
            _piece_group(xp, level_of_piece, first, min(first + size, n_pieces))
            for first in range(0, n_pieces, size)
        )
        return cls(padded.reshape(n_pieces, rows), valid.reshape(n_pieces, rows, 1), groups)


def _piece_group(xp: Any, level_of_piece: np.ndarray, first: int, stop: int) -> PieceGroup:
    levels, piece_level = np.unique(level_of_piece[first:stop], return_inverse=True)
    return PieceGroup(
        first, stop, xp.asarray(levels.astype(np.int64)),
        xp.arange(levels.size, dtype=xp.int64).reshape(-1, 1),
        xp.asarray(piece_level.astype(np.int64).reshape(1, -1)),
    )  # fmt: skip


def group_pieces(n_cells: int, rows: int, n_clusters: int, n_pcs: int, dtype: np.dtype) -> int:
    """Pieces per group (at least one): the most whose scratch fits the budget,
    ``min(PIECE_SCRATCH_BYTES, PIECE_SCRATCH_SHARE * N K s)``.

    The scratch of m pieces of P rows (s: the working dtype's bytes) in
    :func:`_piece_level_moments`, counted as if all were alive at once (some are released before
    others are made, so this over-estimates): the gathered R rows m P K s, the gathered X rows and
    the contiguous copy CuPy's batched product makes of them 2 m P d s, the products and their
    transposed copy 2 m K d s, their float64 copy below float64 m K d 8, the rows of the levels
    being added to and the sum added, at most 2 m K d 8 (a group holds at most m levels), and the
    0/1 matrix with the comparison that makes it, at most 9 m^2 bytes.
    """
    s = np.dtype(dtype).itemsize
    per_piece = rows * (n_clusters + 2 * n_pcs) * s + n_clusters * n_pcs * (2 * s + 16)
    if s < 8:
        per_piece += n_clusters * n_pcs * 8
    budget = min(PIECE_SCRATCH_BYTES, int(PIECE_SCRATCH_SHARE * n_cells * n_clusters * s))
    # the largest m with m per_piece + 9 m^2 <= budget
    most = (math.isqrt(per_piece * per_piece + 36 * budget) - per_piece) // 18
    return max(1, most)


def piece_rows(n_cells: int, n_levels: int) -> int:
    """Rows per piece: the largest power of two with the padding (at most one piece per non-empty
    level, ``n_levels`` of them) below a quarter of the cells, within ``MIN_PIECE_ROWS`` and
    ``MAX_PIECE_ROWS``."""
    rows = MIN_PIECE_ROWS
    while rows < MAX_PIECE_ROWS and 2 * rows * n_levels <= n_cells // 4:
        rows *= 2
    return rows


def _exclusive_cumsum(values: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(values)[:-1]]).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class LevelIndex:
    """Cells of every level, for per-level products: index arrays per level on the CPU (the numba
    kernels), pieces of equal length on the device (batched products)."""

    n_levels: int  # B, over all keys
    cells: tuple[Any, ...]  # B arrays of int64 cell indices (CPU; empty on the device)
    first_key_levels: int
    joint_codes: Any  # (N, 1) int32 combination index per cell; None with one key
    joint_membership: np.ndarray | None  # (J, B) 0/1 levels of each observed combination
    pieces: LevelPieces | None = None  # device, when X is kept there

    @classmethod
    def build(
        cls, xp: Any, codes: Any, design: BatchDesign, rows: slice | None = None, *,
        pieces_for: tuple[int, int, np.dtype] | None = None,
    ) -> LevelIndex:  # fmt: skip
        """Per-level cell lists from a stable sort of each key's codes.

        ``codes`` are the design's codes of ``rows`` (all cells by default), and the lists index
        those rows; the level combinations of several keys are those of all cells. On the device
        the lists become ``pieces`` when ``pieces_for`` gives the (K, d, working dtype) of the
        moments (X resident), and are not kept otherwise: a streamed X sorts each chunk's rows
        itself.
        """
        rows = slice(None) if rows is None else rows
        joint_codes, membership = None, None
        if design.n_keys > 1:
            joint, table = design.joint_codes()
            joint = joint[rows]
            membership = np.zeros((table.shape[0], design.n_levels_total))
            for c in range(design.n_keys):
                membership[np.arange(table.shape[0]), table[:, c]] = 1.0
            joint_codes = xp.asarray(joint.reshape(-1, 1).astype(np.int32))
        counts = np.bincount(design.codes[rows].ravel(), minlength=design.n_levels_total)
        cells, level_pieces = [], None
        if xp is np:
            cells = _level_cells(codes, counts, design)
        elif pieces_for is not None:
            level_pieces = LevelPieces.build(xp, codes, counts, pieces_for)
        return cls(
            design.n_levels_total, tuple(cells), design.n_levels[0], joint_codes, membership,
            level_pieces,
        )  # fmt: skip


def _level_cells(codes: np.ndarray, counts: np.ndarray, design: BatchDesign) -> list[np.ndarray]:
    """The cells of each level (all keys' levels in order, ``counts`` of them), each in increasing
    order."""
    cells = []
    for c, offset in enumerate(design.offsets):
        order = np.argsort(codes[:, c], kind="stable")
        bounds = np.concatenate([[0], np.cumsum(counts[offset : offset + design.n_levels[c]])])
        cells.extend(order[bounds[j] : bounds[j + 1]] for j in range(design.n_levels[c]))
    return cells


def resolve_method(
    requested: str | None, n_keys: int, n_clusters: int, n_levels: int, itemsize: int
) -> str:
    """The strategy actually used; with several keys every choice runs the general solve."""
    if n_keys > 1:
        if requested == "fast":
            warnings.warn(
                "correction_method='fast' needs a single batch key; using the general solve for "
                f"{n_keys} keys (the same result).",
                UserWarning,
                stacklevel=5,
            )
        return "general"
    if requested is not None:
        return requested
    return (
        "batched"
        if n_clusters * (n_levels + 1) ** 2 * itemsize <= BATCHED_SCRATCH_BYTES
        else "fast"
    )


def ridge_and_active(
    observed: np.ndarray, expected: np.ndarray, level_counts: np.ndarray, params: Any
) -> tuple[np.ndarray, np.ndarray]:
    """lambda_bk and the mask of (level, cluster) pairs kept in the regression (docs/algorithm.md §8.1)."""
    if params.flavor == "harmony1":
        ridge = np.full_like(observed, params.ridge_lambda)
        active = np.ones(observed.shape, dtype=bool)
    else:
        ridge = params.alpha * expected
        active = np.broadcast_to(level_counts[:, None] > 0, observed.shape).copy()
        if params.batch_prune_threshold is not None:
            share = observed / np.maximum(level_counts, 1)[:, None]
            active &= share >= params.batch_prune_threshold
    active &= (observed + ridge) > 0
    return ridge, active


def level_moments(xp: Any, raw: RawRows, assignments: Any, codes: Any, index: LevelIndex) -> Any:
    """M_bk = sum over cells of level b of R_ik x_i, shape (B, K, d), float64.

    X on the device: the levels' cells in pieces, one batched product per group of pieces. X
    streamed from the host: per row chunk of X (``raw.CHUNK_ROWS``), its rows sorted by level,
    one product per level.
    """
    if xp is np:
        x = raw.device if raw.resident else raw.host.astype(raw.dtype)  # X lives in host memory
        return kernels.cpu().level_moments(x, assignments, index.cells)
    n_clusters, n_pcs = assignments.shape[1], raw.shape[1]
    moments = xp.zeros((index.n_levels, n_clusters, n_pcs), dtype=xp.float64)
    if not raw.resident:
        _streamed_level_moments(xp, raw, assignments, codes, moments)
        return moments
    _piece_level_moments(xp, raw.device, assignments, index.pieces, moments)
    return moments


def _piece_level_moments(xp: Any, x: Any, assignments: Any, pieces: LevelPieces, out: Any) -> None:
    """out (B, K, d) float64 += the level moments, from batched products over groups of pieces.

    Each piece's x^T R is one GEMM of a batch in the working dtype (CuPy makes the operands of a
    batched product contiguous, so the X rows, d <= K columns in practice, are the ones
    transposed); a group's products join their levels' float64 totals through a 0/1 product, group
    after group (the same bits on every run). The scratch of each group is released before the
    next one's is taken (``group_pieces``).
    """
    n_clusters, n_pcs = assignments.shape[1], x.shape[1]
    flat = out.reshape(out.shape[0], n_clusters * n_pcs)
    for group in pieces.groups:
        cells = pieces.cells[group.first : group.stop]
        r = assignments[cells]  # (m, P, K)
        xs = x[cells]  # (m, P, d)
        xs *= pieces.valid[group.first : group.stop]
        products = xp.matmul(xs.transpose(0, 2, 1), r)  # (m, d, K)
        del r, xs
        products = products.transpose(0, 2, 1).reshape(products.shape[0], -1)  # (m, K d)
        products = products.astype(xp.float64, copy=False)
        membership = (group.level_rows == group.piece_level).astype(xp.float64)  # (L, m)
        flat[group.levels] += membership @ products
        del products, membership


def _streamed_level_moments(xp: Any, raw: RawRows, assignments: Any, codes: Any, out: Any) -> None:
    for rows, x in raw.chunks():
        for c in range(codes.shape[1]):
            levels = codes[rows, c]
            order = xp.argsort(levels)
            r_sorted, x_sorted = assignments[rows][order], x[order]
            sizes = xp.bincount(levels, minlength=out.shape[0])
            ends = np.cumsum(sizes.get() if hasattr(sizes, "get") else sizes)
            for b in np.flatnonzero(ends - np.concatenate([[0], ends[:-1]])):
                start, stop = (ends[b - 1] if b else 0), ends[b]
                out[b] += cross_sums(xp, r_sorted[start:stop], x_sorted[start:stop])


def closed_form(
    observed: np.ndarray,
    ridge: np.ndarray,
    active: np.ndarray,
    moments: np.ndarray,
    intercept: np.ndarray,
) -> np.ndarray:
    """One key: W_b for all clusters from the arrowhead inverse (docs/algorithm.md §8.3), shape (K, B, d).

    With f_b = 1/(o_b + l_b) on active levels, c = sum_active o l/(o + l) + sum_pruned o (the
    stable Schur complement), W_0 = (M_0 - sum_b f_b o_b M_b) / c and W_b = f_b (M_b - o_b W_0).
    """
    o, lam, act = observed.T, ridge.T, active.T  # (K, B)
    f = np.where(act, 1.0 / np.where(act, o + lam, 1.0), 0.0)
    schur = np.where(act, o * lam * f, o).sum(axis=1)  # (K,)
    m = moments.transpose(1, 0, 2)  # (K, B, d)
    w0 = (intercept - np.einsum("kb,kbd->kd", f * o, m)) / np.where(schur > 0, schur, 1.0)[:, None]
    return f[:, :, None] * (m - o[:, :, None] * w0[:, None, :])


def dense_solve(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve G_k W_k = M_k for every k: Cholesky-checked solve, least squares where G_k is not PD."""
    out = np.empty_like(rhs)
    for k in range(gram.shape[0]):
        try:
            np.linalg.cholesky(gram[k])
            out[k] = np.linalg.solve(gram[k], rhs[k])
        except np.linalg.LinAlgError:
            out[k] = np.linalg.lstsq(gram[k], rhs[k], rcond=None)[0]
    return out


def dense_system(
    observed: np.ndarray,
    ridge: np.ndarray,
    active: np.ndarray,
    moments: np.ndarray,
    intercept: np.ndarray,
    cluster_sizes: np.ndarray,
    cross: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Normal equations (K, B+1, B+1) and right-hand sides (K, B+1, d) with pruned levels removed.

    ``cross`` (K, B, B) holds sum_i R_ik Phi_ib Phi_ib' (diagonal = O_bk). A pruned level's row and
    column are replaced by the identity and its right-hand side by 0, which fixes W_b = 0 and leaves
    the other unknowns as if the level were absent.
    """
    n_levels, n_clusters = observed.shape
    act = active.T.astype(np.float64)  # (K, B)
    gram = np.zeros((n_clusters, n_levels + 1, n_levels + 1))
    gram[:, 0, 0] = cluster_sizes
    gram[:, 0, 1:] = observed.T * act
    gram[:, 1:, 0] = observed.T * act
    gram[:, 1:, 1:] = cross * act[:, :, None] * act[:, None, :]
    diag = np.arange(1, n_levels + 1)
    gram[:, diag, diag] = np.where(active.T, observed.T + ridge.T, 1.0)
    rhs = np.concatenate(
        [intercept[:, None, :], moments.transpose(1, 0, 2) * act[:, :, None]], axis=1
    )
    return gram, rhs


@dataclasses.dataclass(frozen=True)
class CorrectionInputs:
    """Host float64 statistics of one round, everything the solves need."""

    observed: np.ndarray  # O (B, K)
    ridge: np.ndarray  # lambda (B, K)
    active: np.ndarray  # (B, K) bool
    moments: np.ndarray  # M (B, K, d)
    intercept: np.ndarray  # M_0 (K, d)
    cluster_sizes: np.ndarray  # n_k (K,)
    cross: np.ndarray | None  # (K, B, B) cross-level counts (dense solves only)


def coefficients(method: str, stats: CorrectionInputs, n_cells: int) -> np.ndarray:
    """Batch coefficients W (K, B, d), zero for pruned pairs and for clusters without mass."""
    if method == "batched":
        weights = closed_form(
            stats.observed, stats.ridge, stats.active, stats.moments, stats.intercept
        )
    elif method == "fast":
        weights = np.concatenate(
            [
                closed_form(
                    stats.observed[:, k : k + 1],
                    stats.ridge[:, k : k + 1],
                    stats.active[:, k : k + 1],
                    stats.moments[:, k : k + 1],
                    stats.intercept[k : k + 1],
                )
                for k in range(stats.observed.shape[1])
            ]
        )
    else:
        gram, rhs = dense_system(
            stats.observed, stats.ridge, stats.active, stats.moments, stats.intercept,
            stats.cluster_sizes, stats.cross,
        )  # fmt: skip
        weights = dense_solve(gram, rhs)[:, 1:, :]
    weights[stats.cluster_sizes < ZERO_MASS_FRACTION * n_cells] = 0.0
    return weights


def cross_counts(
    xp: Any, assignments: Any, observed: np.ndarray, index: LevelIndex, to_host, over_ranks=None
) -> np.ndarray:
    """sum_i R_ik Phi_ib Phi_ib' (K, B, B): diagonal O with one key; via level combinations with several.

    ``over_ranks`` sums the per-combination counts over ranks on a sharded run.
    """
    if index.joint_membership is None:
        n_clusters = observed.shape[1]
        cross = np.zeros((n_clusters, observed.shape[0], observed.shape[0]))
        diag = np.arange(observed.shape[0])
        cross[:, diag, diag] = observed.T
        return cross
    membership = index.joint_membership
    fixed = level_sums(xp, index.joint_codes, assignments, membership.shape[0])
    joint = to_host(counts(xp, fixed if over_ranks is None else over_ranks(fixed)))
    return np.einsum("jb,jk,jc->kbc", membership, joint, membership)


def apply_correction(
    xp: Any, raw: RawRows, assignments: Any, weights: np.ndarray, codes: Any, index: LevelIndex,
    out: Any,
) -> None:  # fmt: skip
    """out = x - sum_c sum_k R_ik W_k[b_c(i)]: each cell's predicted batch effect removed, per key.

    ``weights`` (K, B, d) host float64; ``codes`` (N, C) int32 on the device; X read chunk by
    chunk (``raw.chunks``).
    """
    per_level = xp.asarray(np.ascontiguousarray(weights.transpose(1, 0, 2)), dtype=raw.dtype)
    if raw.resident:
        kernels.correct_rows(xp, raw.device, assignments, per_level, codes, index.cells, out)
        return
    for rows, x in raw.chunks():
        kernels.correct_rows(xp, x, assignments[rows], per_level, codes[rows], None, out[rows])
