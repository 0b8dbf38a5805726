"""Initialisation (docs/algorithm.md §4): stratified sample, k-means++ and Lloyd, then soft assignments.

The k-means runs in float64 on the sampled rows whatever the working dtype; it is a small share of
the work and makes the starting centroids independent of the dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from harmony_step._core import kernels
from harmony_step._core.permutation import pcg_keys
from harmony_step._core.shard import Shard
from harmony_step._core.sums import chunk_rows, matmul, one_hot, row_normalize

SAMPLES_PER_CLUSTER = 5000
LLOYD_ITERATIONS = 25
# Rows per distance chunk of the GPU's k-means: bounds scratch to KMEANS_CHUNK * K * 8 bytes.
KMEANS_CHUNK = 1 << 17


def sample_size(n_cells: int, n_clusters: int, n_strata: int) -> int:
    return max(min(n_cells, SAMPLES_PER_CLUSTER * n_clusters), n_strata)


def stratified_sample(xp: Any, strata: np.ndarray, size: int, seed: int) -> Any:
    """Cell indices: one per non-empty stratum, the rest in proportion to (stratum size - 1).

    Allocation by largest remainders (ties to the smaller stratum index); within a stratum the
    cells taken are those with the smallest hash keys, a uniform choice without replacement.
    """
    n = strata.shape[0]
    if size >= n:
        return xp.arange(n)
    sizes = np.bincount(strata)
    present = np.flatnonzero(sizes)
    spare = sizes[present] - 1
    extra = size - present.size
    quota = extra * spare / max(int(spare.sum()), 1)
    take = np.floor(quota).astype(np.int64)
    remainder_order = np.lexsort((present, -(quota - take)))
    take[remainder_order[: extra - int(take.sum())]] += 1
    counts = np.zeros_like(sizes)
    counts[present] = take + 1
    # Order cells by (stratum, hash key); keep the first counts[s] of each stratum.
    keys = pcg_keys(xp, n, seed).astype(xp.uint64)
    combined = (xp.asarray(strata).astype(xp.uint64) << xp.uint64(32)) | keys
    order = xp.argsort(combined)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = xp.arange(n) - xp.asarray(starts)[xp.asarray(strata)[order]]
    keep = rank < xp.asarray(counts)[xp.asarray(strata)[order]]
    return xp.sort(order[keep])


def kmeans_plus_plus(xp: Any, points: Any, k: int, rng: np.random.Generator) -> Any:
    """k-means++ seeding on ``points`` (n, d) float64; returns (k, d) centres.

    The uniforms are drawn up front so the loop never waits for the device. Squared distances to
    the newest centre are computed directly (no cancellation). When every remaining distance is
    zero the lowest-index unchosen point is taken.
    """
    n = points.shape[0]
    first = int(rng.integers(n))
    if xp is np:
        return points[kernels.cpu().kmeans_plus_plus(points, first, rng.random(max(k - 1, 0)))]
    draws = xp.asarray(rng.random(max(k - 1, 0)))
    chosen = xp.zeros(k, dtype=xp.int64)
    chosen[0] = first
    taken = xp.zeros(n, dtype=bool)
    taken[first] = True
    nearest = _nearest_update(xp, points, first, xp.full(n, xp.inf))
    for j in range(1, k):
        cumulative = xp.cumsum(nearest)
        total = cumulative[-1:]
        found = xp.minimum(
            xp.searchsorted(cumulative, draws[j - 1 : j] * total, side="right"), n - 1
        )
        index = xp.where(
            total > 0, found, xp.argmin(taken)
        )  # argmin of a bool mask: first unchosen
        chosen[j : j + 1] = index
        taken[index] = True
        nearest = _nearest_update(xp, points, index, nearest)
    return points[chosen].copy()


def _nearest_update(xp: Any, points: Any, index: Any, nearest: Any) -> Any:
    """min(nearest, |points - points[index]|^2), the distances computed directly."""
    return xp.minimum(nearest, ((points - points[index]) ** 2).sum(axis=1))


@dataclasses.dataclass(frozen=True)
class Screen:
    """The k-means points in float32 and their norms, for ranking centres in float32 on the CPU."""

    points32: np.ndarray  # (n, d) float32
    norms: np.ndarray  # (n,) float64

    @classmethod
    def of(cls, points: np.ndarray) -> Screen:
        screen = cls(np.empty(points.shape, dtype=np.float32), np.empty(points.shape[0]))
        kernels.cpu().screen_rows(points, screen.points32, screen.norms)
        return screen


def _assign(xp: Any, points: Any, centres: Any, screen: Screen | None = None) -> tuple[Any, Any]:
    """Nearest centre of each point and the squared distance to it, recomputed directly."""
    labels = xp.empty(points.shape[0], dtype=xp.int64)
    centre_sq = (centres * centres).sum(axis=1)
    if xp is np:
        # The ranking products in float32 (several times BLAS's float64 speed); rows where float32
        # could pick another centre than float64 are ranked again in float64 (``assign_chunk``).
        cpu, screen = kernels.cpu(), screen or Screen.of(points)
        distance = np.empty(points.shape[0])
        centres_t32 = centres.T.astype(np.float32, order="C")
        largest = np.sqrt(centre_sq.max(initial=0.0))
        slack = (points.shape[1] + 2) * (
            cpu.SCREEN_RELATIVE_ERROR * largest * screen.norms + cpu.SCREEN_ABSOLUTE_ERROR
        )
        cpu.assign_nearest(
            screen.points32, centres_t32, centre_sq, points, centres, slack, labels, distance
        )
        return labels, distance
    for start in range(0, points.shape[0], KMEANS_CHUNK):
        block = points[start : start + KMEANS_CHUNK]
        # |c|^2 - 2 x.c ranks centres like |x - c|^2 (|x|^2 is the same for all of them).
        labels[start : start + KMEANS_CHUNK] = xp.argmin(
            centre_sq[None, :] - 2.0 * block @ centres.T, axis=1
        )
    distance = ((points - centres[labels]) ** 2).sum(axis=1)
    return labels, distance


def lloyd(xp: Any, points: Any, centres: Any) -> Any:
    """At most 25 Lloyd iterations; empty clusters re-seeded with the farthest points."""
    k = centres.shape[0]
    labels = None
    screen = Screen.of(points) if xp is np else None
    for _ in range(LLOYD_ITERATIONS):
        new_labels, distance = _assign(xp, points, centres, screen)
        counts = xp.bincount(new_labels, minlength=k)
        empty = xp.flatnonzero(counts == 0)
        if labels is not None and empty.size == 0 and bool(xp.array_equal(new_labels, labels)):
            break
        labels = new_labels
        centres = _cluster_sums(xp, points, labels, k) / xp.maximum(counts, 1)[:, None]
        if empty.size:
            farthest = xp.argsort(-distance)[: empty.size]
            centres[empty] = points[farthest]
    return centres


def _cluster_sums(xp: Any, points: Any, labels: Any, k: int) -> Any:
    """Sum of the points of each cluster, (k, d) float64."""
    if xp is np:
        return kernels.cpu().cluster_sums(points, labels, k)
    sums = xp.zeros((k, points.shape[1]), dtype=xp.float64)
    for start in range(0, points.shape[0], KMEANS_CHUNK):
        stop = start + KMEANS_CHUNK
        sums += one_hot(xp, labels[start:stop, None], k, xp.float64).T @ points[start:stop]
    return sums


def soft_assignments(xp: Any, z_hat: Any, centroids: Any, sigma: float, out: Any) -> None:
    """R_ik proportional to exp(-(2/sigma)(1 - z_i.y_k)), written into ``out`` chunk by chunk:
    the similarities land in ``out`` and become R there, so no chunk of scratch is filled and
    copied."""
    scale = 2.0 / sigma
    step = chunk_rows(z_hat.shape[0])
    for start in range(0, z_hat.shape[0], step):
        rows = out[start : start + step]
        matmul(xp, z_hat[start : start + step], centroids.T, out=rows)
        softmax_rows(xp, rows, scale)


def softmax_rows(xp: Any, similarity: Any, scale: float, penalty: Any = None) -> Any:
    """Row softmax of scale * (similarity - 1) + penalty, in place on ``similarity``, max-shifted."""
    if xp is np and penalty is None:
        return kernels.cpu().softmax_rows(similarity, scale)
    logits = similarity
    logits -= 1
    logits *= scale
    if penalty is not None:
        logits += penalty
    logits -= logits.max(axis=1, keepdims=True)
    xp.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def initial_centroids(
    xp: Any,
    z_hat: Any,
    strata: np.ndarray,
    n_clusters: int,
    random_state: int,
    shard: Shard | None = None,
) -> Any:
    """Unit centroids (K, d) in the working dtype from k-means on a stratified sample.

    ``strata`` covers all cells. On a sharded run ``z_hat`` holds this rank's rows: the sampled
    rows are collected from every rank, rank 0 runs the k-means and its centroids are shared.
    """
    rng = np.random.default_rng(random_state)
    n_strata = int(np.count_nonzero(np.bincount(strata)))
    size = sample_size(strata.shape[0], n_clusters, n_strata)
    sample = stratified_sample(xp, strata, size, int(rng.integers(1 << 32)))
    if shard is None:
        points = _widened_rows(xp, z_hat, sample)
        centres = lloyd(xp, points, kmeans_plus_plus(xp, points, n_clusters, rng))
        return row_normalize(xp, centres).astype(z_hat.dtype)
    points = _sampled_rows(xp, z_hat, sample, shard)
    if shard.comm.rank == 0:
        centres = lloyd(xp, points, kmeans_plus_plus(xp, points, n_clusters, rng))
    else:
        centres = xp.empty((n_clusters, z_hat.shape[1]), dtype=xp.float64)
    shard.comm.broadcast(centres)
    return row_normalize(xp, centres).astype(z_hat.dtype)


def _widened_rows(xp: Any, z_hat: Any, sample: Any) -> Any:
    """Rows ``sample`` of Z_hat in float64; on the CPU widened as they are gathered, on the run's
    threads (half the cells at 1M cells and K = 100: a copy and a cast cost 0.4 s on two cores)."""
    if xp is np:
        out = np.empty((sample.shape[0], z_hat.shape[1]))
        return kernels.gather_rows(xp, z_hat, sample.astype(np.int64, copy=False), out)
    return z_hat[sample].astype(xp.float64, copy=False)  # the indexing made a copy


def _sampled_rows(xp: Any, z_hat: Any, sample: Any, shard: Shard) -> Any:
    """Rows ``sample`` (global indices) of the sharded Z_hat, in float64, on every rank.

    Each rank fills the rows it holds and leaves zeros elsewhere; the sum over ranks is exact.
    """
    points = xp.zeros((sample.shape[0], z_hat.shape[1]), dtype=xp.float64)
    local = xp.flatnonzero((sample >= shard.start) & (sample < shard.start + z_hat.shape[0]))
    points[local] = z_hat[sample[local] - shard.start]
    shard.comm.all_sum(points)
    return points
