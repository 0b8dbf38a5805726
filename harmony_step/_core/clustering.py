"""The clustering step (docs/algorithm.md §5): block-wise soft k-means with the diversity penalty.

Each iteration visits the cells in a pseudo-random order, in blocks. A block's mass is removed
from the observed counts O, the penalty is formed from these leave-block-out counts, the block's
assignments are recomputed and its mass is added back. One kernel launch per block does the
update, the addition and the next block's removal (``kernels.block_update``); O is exact fixed
point, so nothing drifts. The objective needs no N x K similarity matrix: its k-means part is
recovered from R^T Z (see ``objective.kmeans_term``), computed once per iteration.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from harmony_step._core.graphs import LaunchReplay, address
from harmony_step._core.kernels import (
    block_update,
    gather_rows,
    log_penalty_table,
    objective_parts,
    unit_centroids,
)
from harmony_step._core.objective import diversity_term, expected_counts, kmeans_term, to_parts
from harmony_step._core.permutation import cell_order, group_blocks_by_level, iteration_seed
from harmony_step._core.result import ObjectiveParts
from harmony_step._core.shard import Shard
from harmony_step._core.sums import counts, cross_sums, matmul

# Inner convergence window (docs/algorithm.md §7.1): compare sums of the last three objectives.
WINDOW = 3
# Similarities (rows x K, working dtype) formed by one GEMM: at most this many bytes, and at least
# one block. On the GPU small inputs then need one GEMM per iteration, large ones one per few
# blocks (about six at a million cells in float32). The CPU's budget of 0 means one block per
# GEMM: the block update then reads similarities just written, mostly from the last-level cache
# rather than memory (a 12 % shorter clustering step at a million cells on two cores).
SIMILARITY_SPAN_BYTES = 1 << 27
CPU_SIMILARITY_SPAN_BYTES = 0


@dataclasses.dataclass
class ClusteringState:
    """Device arrays carried between rounds. ``centroid_sums`` is R^T Z_hat for the current R and Z_hat."""

    z_hat: Any  # (N, d) working dtype
    assignments: Any  # R, (N, K) working dtype
    codes: Any  # (N, C) int32
    observed: Any  # O, (B, K) int64 fixed point (kernels.FIXED_POINT_SCALE per cell)
    centroid_sums: Any  # (K, d) float64
    row_entropy: Any  # (N,) float64, sum_k R log(R + eps) of each cell
    work: BlockWork | None = None  # scratch of the block loop, made on first use


@dataclasses.dataclass
class BlockWork:
    """Scratch of the block loop, kept for the whole run so that recorded launches stay valid.

    ``span`` rows (a whole number of blocks, or all cells) get their similarities from one GEMM into
    ``similarity``; ``order`` holds the iteration's visiting order at a fixed address.
    """

    order: Any  # (N,) int64
    gathered: Any  # (span, d) working dtype: Z_hat rows in visiting order
    similarity: Any  # (span, K) working dtype
    penalty: Any  # (B, K) float64
    observed_total: Any  # (B, K) int64: O summed over ranks (sharded runs only)
    span: int
    replay: LaunchReplay

    @classmethod
    def allocate(cls, xp: Any, state: ClusteringState, block_size: int) -> BlockWork:
        n_cells, n_pcs = state.z_hat.shape  # this rank's cells
        n_clusters = state.assignments.shape[1]
        row_bytes = n_clusters * state.assignments.dtype.itemsize
        span_bytes = SIMILARITY_SPAN_BYTES if xp is not np else CPU_SIMILARITY_SPAN_BYTES
        blocks = max(1, span_bytes // (block_size * row_bytes))
        span = min(n_cells, blocks * block_size)
        dtype = state.z_hat.dtype
        return cls(
            order=xp.empty(n_cells, dtype=xp.int64),
            gathered=xp.empty((span, n_pcs), dtype=dtype),
            similarity=xp.empty((span, n_clusters), dtype=dtype),
            penalty=xp.empty(state.observed.shape, dtype=xp.float64),
            observed_total=xp.empty_like(state.observed),
            span=span,
            replay=LaunchReplay(xp),
        )


@dataclasses.dataclass(frozen=True)
class ClusteringConstants:
    """Per-run constants on the device."""

    theta: Any  # (B,) float64
    level_share: Any  # (B,) float64
    first_key_levels: int
    n_levels: int
    sigma: float
    flavor: str
    block_size: int
    random_state: int
    shard: Shard | None = None  # this rank's cells when the run is spread over several GPUs


def total_observed(xp: Any, state: ClusteringState, consts: ClusteringConstants, out: Any = None):
    """O over all cells: the carried O itself, or on a sharded run its sum over ranks (exact)."""
    if consts.shard is None:
        return state.observed
    out = xp.empty_like(state.observed) if out is None else out
    out[...] = state.observed
    consts.shard.comm.all_sum(out)
    return out


def all_ranks(consts: ClusteringConstants, value: Any) -> Any:
    """A device array summed over ranks in place (a sharded run), else unchanged."""
    if consts.shard is not None:
        consts.shard.comm.all_sum(value)
    return value


def objective(
    xp: Any, state: ClusteringState, consts: ClusteringConstants, centroids: Any, entropy: Any
) -> Any:
    """(kmeans, entropy, diversity) as a float64 device vector, from carried sums.

    ``state.centroid_sums`` and ``entropy`` (a one-element array) are over all cells already; O is
    summed here. On the GPU it is one launch (``kernels.objective_parts``).
    """
    fixed = total_observed(xp, state, consts)
    if xp is np:
        observed = counts(xp, fixed)
        expected = expected_counts(xp, observed, consts.level_share, consts.first_key_levels)
        mass = observed[: consts.first_key_levels].sum()
        parts = xp.stack(
            [
                kmeans_term(xp, centroids, state.centroid_sums, mass),
                consts.sigma * entropy[0],
                diversity_term(xp, observed, expected, consts.theta, consts.sigma, consts.flavor),
            ]
        )
    else:
        parts = objective_parts(
            xp, fixed, consts.level_share, consts.theta, centroids, state.centroid_sums, entropy,
            consts.first_key_levels, consts.flavor, consts.sigma,
        )  # fmt: skip
    if consts.shard is not None:  # every rank takes the same convergence decisions
        consts.shard.comm.broadcast(parts)
    return parts


def _iterate(xp: Any, state: ClusteringState, consts: ClusteringConstants, seed: int) -> Any:
    """One pass over all cells in blocks; returns the objective parts (device, float64)."""
    if state.work is None:
        state.work = BlockWork.allocate(xp, state, consts.block_size)
    work = state.work
    centroids64, centroids_t = unit_centroids(xp, state.centroid_sums, state.z_hat.dtype)
    offsets = _visiting_order(xp, state, consts, seed)
    for first, last in _spans(offsets, work.span):
        start, stop = offsets[first], offsets[last]
        gathered, similarity = work.gathered[: stop - start], work.similarity[: stop - start]
        gather_rows(xp, state.z_hat, work.order[start:stop], gathered)
        matmul(xp, gathered, centroids_t, out=similarity)
        launches = functools.partial(_update_blocks, xp, state, consts, offsets, first, last)
        if consts.shard is not None:  # collectives inside: run, never record
            launches()
            continue
        key = (first, last, stop - start, *map(address, (work.order, work.similarity,
               work.penalty, state.assignments, state.observed, state.row_entropy, state.codes)))  # fmt: skip
        work.replay.run(key, launches)
    state.centroid_sums = all_ranks(consts, cross_sums(xp, state.assignments, state.z_hat))
    entropy = all_ranks(consts, state.row_entropy.sum(keepdims=True))
    return objective(xp, state, consts, centroids64, entropy)


def _visiting_order(
    xp: Any, state: ClusteringState, consts: ClusteringConstants, seed: int
) -> list[int]:
    """Writes this iteration's visiting order of this rank's cells into ``work.order``, each
    block's cells grouped by key-0 level; returns the block boundaries in it (host ints).

    Blocks are those of the one-GPU run: consecutive ``block_size`` positions of the hash order
    of all cells. A rank visits its own cells of each block, so every rank walks the same blocks.
    """
    size, order = consts.block_size, state.work.order
    n_local = order.shape[0]
    if consts.shard is None:
        order[...] = group_blocks_by_level(
            xp, cell_order(xp, n_local, seed), state.codes, consts.first_key_levels, size
        )
        return [*range(0, n_local, size), n_local]
    shard = consts.shard
    everyone = cell_order(xp, shard.n_cells, seed)
    positions = xp.flatnonzero((everyone >= shard.start) & (everyone < shard.start + n_local))
    blocks = positions // size
    mine = everyone[positions] - shard.start
    keys = blocks * consts.first_key_levels + state.codes[mine, 0]
    # stable: CuPy's argsort is a radix sort; NumPy's is asked to be
    order[...] = mine[xp.argsort(keys) if xp is not np else np.argsort(keys, kind="stable")]
    n_blocks = -(-shard.n_cells // size)
    ends = xp.cumsum(xp.bincount(blocks, minlength=n_blocks))
    return [0, *(int(v) for v in (ends if xp is np else ends.get()))]


def _spans(offsets: list[int], span: int) -> list[tuple[int, int]]:
    """Consecutive runs of blocks [first, last) of at most ``span`` cells (at least one block)."""
    runs, first = [], 0
    for last in range(1, len(offsets)):
        if offsets[last] - offsets[first] > span and last - 1 > first:
            runs.append((first, last - 1))
            first = last - 1
    runs.append((first, len(offsets) - 1))
    return runs


def _update_blocks(
    xp: Any,
    state: ClusteringState,
    consts: ClusteringConstants,
    offsets: list[int],
    first: int,
    last: int,
) -> None:
    """The updates of blocks [first, last), whose similarities are in ``work.similarity``.

    One GPU: kernel launches on fixed buffers only, so the sequence can be recorded and replayed.
    Sharded: O is summed over ranks after every block, so each penalty sees all cells.
    """
    work, scale, order = state.work, 2.0 / consts.sigma, state.work.order
    n_blocks = len(offsets) - 1
    if first == 0:  # the first block's old mass leaves O here; each update removes the next one's
        block_update(xp, None, None, state.codes, order[: offsets[1]], 0, state.assignments,
                     None, state.observed, scale)  # fmt: skip
    for b in range(first, last):
        start, stop, then = offsets[b], offsets[b + 1], offsets[min(b + 2, n_blocks)]
        observed = total_observed(xp, state, consts, out=work.observed_total)
        log_penalty_table(
            xp, observed, consts.level_share, consts.theta, consts.first_key_levels,
            consts.flavor, out=work.penalty,
        )  # fmt: skip
        base = offsets[first]
        block_update(
            xp, work.similarity[start - base : stop - base], work.penalty, state.codes,
            order[start:then], stop - start, state.assignments, state.row_entropy,
            state.observed, scale,
        )  # fmt: skip


def inner_converged(history: list[float], tol: float) -> bool:
    """Signed windowed test: stop when J_{t-3} - J_t < tol * |J_{t-3} + J_{t-2} + J_{t-1}|."""
    if len(history) <= WINDOW:
        return False
    previous = sum(history[-WINDOW - 1 : -1])
    current = sum(history[-WINDOW:])
    return previous - current < tol * abs(previous)


def cluster(
    xp: Any,
    state: ClusteringState,
    consts: ClusteringConstants,
    round_index: int,
    max_iter: int,
    tol: float,
    to_host: Callable[[Any], Any],
    on_iteration: Callable[[int, ObjectiveParts], None],
) -> tuple[int, bool, ObjectiveParts]:
    """Run the clustering step of one round; returns (iterations, inner test fired, last objective)."""
    history: list[float] = []
    parts = None
    for t in range(max_iter):
        seed = iteration_seed(consts.random_state, round_index, t)
        parts = to_parts(to_host(_iterate(xp, state, consts, seed)))
        on_iteration(t, parts)
        history.append(parts.total)
        if inner_converged(history, tol):
            return t + 1, True, parts
    return max_iter, False, parts
