"""The clustering step (spec section 5): block-wise soft k-means with the diversity penalty.

Each iteration visits the cells in a pseudo-random order, in blocks. A block's mass is removed
from the observed counts O, the penalty is formed from these leave-block-out counts, the block's
assignments are recomputed and its mass is added back. The objective needs no N x K similarity
matrix: its k-means part is recovered from R^T Z (see ``objective.kmeans_term``), and R^T Z and the
entropy sum are accumulated block by block, because every cell is updated exactly once per iteration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from harmony_step._core.objective import diversity_term, expected_counts, kmeans_term, to_parts
from harmony_step._core.permutation import cell_order, iteration_seed
from harmony_step._core.result import ObjectiveParts
from harmony_step._core.sums import level_sums, one_hot, row_normalize
from harmony_step._kernels import log_penalty_table, penalized_softmax

# Inner convergence window (spec 7.1): compare sums of the last three objectives.
WINDOW = 3


@dataclasses.dataclass
class ClusteringState:
    """Device arrays carried between rounds. ``centroid_sums`` is R^T Z_hat for the current R and Z_hat."""

    z_hat: Any  # (N, d) working dtype
    assignments: Any  # R, (N, K) working dtype
    codes: Any  # (N, C) int32
    observed: Any  # O, (B, K) float64
    centroid_sums: Any  # (K, d) float64


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


def objective(
    xp: Any, state: ClusteringState, consts: ClusteringConstants, centroids: Any, entropy: Any
) -> Any:
    """(kmeans, entropy, diversity) as a float64 device vector, from carried sums."""
    observed = state.observed
    expected = expected_counts(xp, observed, consts.level_share, consts.first_key_levels)
    mass = observed[: consts.first_key_levels].sum()
    return xp.stack(
        [
            kmeans_term(xp, centroids, state.centroid_sums, mass),
            consts.sigma * entropy,
            diversity_term(xp, observed, expected, consts.theta, consts.sigma, consts.flavor),
        ]
    )


def _update_block(
    xp: Any, state: ClusteringState, consts: ClusteringConstants, cells: Any, centroids: Any
) -> tuple[Any, Any]:
    """Recompute the assignments of ``cells``; returns their R^T Z and per-row entropy sums."""
    z_block = state.z_hat[cells]
    codes = state.codes[cells]
    phi = one_hot(xp, codes, consts.n_levels, xp.float64)
    state.observed -= phi.T @ state.assignments[cells].astype(xp.float64, copy=False)
    penalty = log_penalty_table(
        xp, state.observed, consts.level_share, consts.theta, consts.first_key_levels, consts.flavor
    )
    new64, entropy = penalized_softmax(
        xp, z_block @ centroids.T, penalty, codes, cells, state.assignments, 2.0 / consts.sigma
    )
    state.observed += phi.T @ new64
    return new64.T @ z_block.astype(xp.float64, copy=False), entropy


def _iterate(xp: Any, state: ClusteringState, consts: ClusteringConstants, seed: int) -> Any:
    """One pass over all cells in blocks; returns the objective parts (device, float64)."""
    centroids64 = row_normalize(xp, state.centroid_sums)
    centroids = centroids64.astype(state.z_hat.dtype)
    order = cell_order(xp, state.z_hat.shape[0], seed)
    sums = xp.zeros_like(state.centroid_sums)
    entropies = []
    for start in range(0, order.shape[0], consts.block_size):
        block_sums, block_entropy = _update_block(
            xp, state, consts, order[start : start + consts.block_size], centroids
        )
        sums += block_sums
        entropies.append(block_entropy)
    state.centroid_sums = sums
    return objective(xp, state, consts, centroids64, xp.concatenate(entropies).sum())


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
    state.observed = level_sums(xp, state.codes, state.assignments, consts.n_levels)
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
