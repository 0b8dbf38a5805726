"""Outer loop (docs/algorithm.md §9): initialise, then alternate clustering and correction."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from harmony_step._backend import Backend
from harmony_step._batches import BatchDesign
from harmony_step._core.clustering import (
    ClusteringConstants,
    ClusteringState,
    all_ranks,
    cluster,
    objective,
    total_observed,
)
from harmony_step._core.correction import (
    CorrectionInputs,
    LevelIndex,
    apply_correction,
    coefficients,
    cross_counts,
    level_moments,
    resolve_method,
    ridge_and_active,
)
from harmony_step._core.init import initial_centroids, soft_assignments
from harmony_step._core.objective import entropy_sum, to_parts
from harmony_step._core.raw import RawRows, keep_on_device
from harmony_step._core.result import HarmonyResult, IterationRecord, RoundRecord
from harmony_step._core.setup import Problem, load_embedding, make_problem
from harmony_step._core.shard import Shard
from harmony_step._core.sums import chunk_rows, counts, cross_sums, level_sums, row_normalize
from harmony_step._params import HarmonyConvergenceWarning, HarmonyParams, warn_at_caller
from harmony_step._threads import cpu_threads

progress_log = logging.getLogger("harmony_step.progress")


def _seed(random_state: int | None) -> int:
    """The integer seed of the run; None draws one from OS entropy (recorded in the result)."""
    if random_state is not None:
        return random_state
    return int(np.random.SeedSequence().generate_state(1)[0])


class _Clock:
    """Wall-clock phases; the caller synchronises the device before reading it."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def add(self, phase: str, since: float) -> float:
        now = self.elapsed()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - since
        return now


def run_harmony(
    embedding: np.ndarray,
    design: BatchDesign,
    params: HarmonyParams,
    backend: Backend,
    shard: Shard | None = None,
) -> HarmonyResult:
    """Harmony on a validated (n_cells, n_pcs) embedding of the working dtype; returns the corrected copy.

    On the CPU it runs with the thread count of an enclosing ``cpu_threads`` block, or on every CPU
    the process may use (``harmony_step._threads``).

    With ``shard`` (one rank of a run spread over several GPUs), ``embedding`` holds this rank's
    rows ``[shard.start, shard.start + n)`` of ``shard.n_cells`` and ``design`` all cells; the
    result's embedding is this rank's corrected rows, and every other field is the same on all
    ranks.
    """
    if backend.is_gpu:
        return _run(embedding, design, params, backend, shard)
    with cpu_threads():
        return _run(embedding, design, params, backend, shard)


def _shared_seed(xp: Any, random_state: int | None, shard: Shard | None) -> int:
    """The run's seed; a seed drawn from OS entropy is rank 0's on every rank."""
    seed = _seed(random_state)
    if shard is None or random_state is not None:
        return seed
    value = xp.asarray([seed], dtype=xp.int64)
    shard.comm.broadcast(value)
    return int((value if xp is np else value.get())[0])


def _run(
    embedding: np.ndarray,
    design: BatchDesign,
    params: HarmonyParams,
    backend: Backend,
    shard: Shard | None,
) -> HarmonyResult:
    clock = _Clock()
    xp = backend.xp
    rows = slice(0, embedding.shape[0]) if shard is None else (
        slice(shard.start, shard.start + embedding.shape[0]))  # fmt: skip
    n_cells = embedding.shape[0] if shard is None else shard.n_cells
    seed = _shared_seed(xp, params.random_state, shard)
    problem = make_problem(n_cells, embedding.shape[1], design, params, seed)
    method = resolve_method(
        params.correction_method, design.n_keys, problem.n_clusters, design.n_levels_total,
        params.numpy_dtype.itemsize,
    )  # fmt: skip
    host_output = backend.prepare_host_output(embedding.shape, params.numpy_dtype)
    keep = keep_on_device(
        xp, embedding.shape, problem.n_clusters, params.numpy_dtype, n_keys=design.n_keys,
        n_levels=design.n_levels_total,
    )  # fmt: skip
    x, z_hat = load_embedding(
        xp, embedding, params.numpy_dtype, f"adata.obsm[{params.basis!r}]", keep
    )
    raw = RawRows(xp, embedding, params.numpy_dtype, x)
    codes = backend.asarray(design.codes[rows])
    moments = (problem.n_clusters, embedding.shape[1], params.numpy_dtype)
    index = LevelIndex.build(xp, codes, design, rows, pieces_for=moments if raw.resident else None)
    consts = ClusteringConstants(
        theta=xp.asarray(problem.theta), level_share=xp.asarray(problem.level_share),
        first_key_levels=problem.first_key_levels, n_levels=design.n_levels_total,
        sigma=params.sigma, flavor=params.flavor, block_size=problem.block_size,
        random_state=problem.random_state, shard=shard,
    )  # fmt: skip
    backend.synchronize()
    mark = clock.add("setup", 0.0)

    state, init_parts = _initialise(xp, z_hat, codes, design, problem, consts, backend)
    backend.synchronize()
    mark = clock.add("init", mark)
    iterations = [IterationRecord(0, 0, init_parts, clock.elapsed())]
    rounds = [RoundRecord(0, 0, False, init_parts)]
    peak = backend.pool_bytes()
    converged = False
    for i in range(params.max_iter_harmony):
        n_iter, fired, parts = cluster(
            xp, state, consts, i, params.max_iter_clustering, params.tol_clustering, backend.to_host,
            lambda t, p, r=i + 1: iterations.append(IterationRecord(r, t + 1, p, clock.elapsed())),
        )  # fmt: skip
        rounds.append(RoundRecord(i + 1, n_iter, fired, parts))
        mark = clock.add("clustering", mark)
        _correct(xp, raw, state, index, problem, params, method, backend, consts)
        peak = max(peak, backend.pool_bytes())
        backend.synchronize()
        mark = clock.add("correction", mark)
        _report_round(params, rounds[-1])
        previous = rounds[-2].objective.total
        if previous - parts.total < params.tol_harmony * abs(previous):
            converged = True
            break
        if i + 1 < params.max_iter_harmony:
            row_normalize(xp, state.z_hat, out=state.z_hat)
            state.centroid_sums = all_ranks(consts, cross_sums(xp, state.assignments, state.z_hat))
    corrected = backend.to_host(state.z_hat, out=host_output)
    _report_outcome(params, converged, len(rounds) - 1)
    clock.phases["total"] = clock.elapsed()
    return HarmonyResult(
        embedding=corrected, iterations=iterations, rounds=rounds, converged=converged,
        n_clusters=problem.n_clusters, block_size=problem.block_size, correction_method=method,
        random_state=problem.random_state, timings=clock.phases, peak_pool_bytes=peak,
    )  # fmt: skip


def _initialise(
    xp: Any,
    z_hat: Any,
    codes: Any,
    design: BatchDesign,
    problem: Problem,
    consts: ClusteringConstants,
    backend: Backend,
):
    """Initial centroids and assignments, O, R^T Z_hat, and the initial objective."""
    n_local = z_hat.shape[0]
    strata = design.codes[:, 0] if design.n_keys == 1 else design.joint_codes()[0]
    centroids = initial_centroids(
        xp, z_hat, strata, problem.n_clusters, problem.random_state, consts.shard
    )
    assignments = xp.empty((n_local, problem.n_clusters), dtype=z_hat.dtype)
    soft_assignments(xp, z_hat, centroids, consts.sigma, out=assignments)
    state = ClusteringState(
        z_hat=z_hat, assignments=assignments, codes=codes,
        observed=level_sums(xp, codes, assignments, consts.n_levels),
        centroid_sums=all_ranks(consts, cross_sums(xp, assignments, z_hat)),
        row_entropy=xp.zeros(n_local, dtype=xp.float64),
    )  # fmt: skip
    step = chunk_rows(n_local)
    entropy = sum(entropy_sum(xp, assignments[s : s + step]) for s in range(0, n_local, step))
    entropy = all_ranks(consts, xp.asarray(entropy, dtype=xp.float64).reshape(1))
    parts = objective(xp, state, consts, centroids.astype(xp.float64), entropy)
    return state, to_parts(backend.to_host(parts))


def _correct(
    xp,
    raw: RawRows,
    state: ClusteringState,
    index: LevelIndex,
    problem: Problem,
    params: HarmonyParams,
    method: str,
    backend: Backend,
    consts: ClusteringConstants,
) -> None:
    """Fit the per-cluster ridge regressions on the raw input and write the corrected X into z_hat.

    On a sharded run the sums over cells (O, the level moments, the cross-level counts) are added
    over ranks, and rank 0's coefficients are used everywhere.
    """
    # O is exact fixed point, kept current by every block update.
    observed = backend.to_host(counts(xp, total_observed(xp, state, consts)))
    sizes = observed[: problem.first_key_levels].sum(axis=0)
    expected = problem.level_share[:, None] * sizes[None, :]
    ridge, active = ridge_and_active(observed, expected, problem.level_counts, params)
    moments = level_moments(xp, raw, state.assignments, state.codes, index)
    moments = backend.to_host(all_ranks(consts, moments))
    cross = None
    if method in ("original", "general"):
        cross = cross_counts(
            xp, state.assignments, observed, index, backend.to_host,
            lambda joint: all_ranks(consts, joint),
        )  # fmt: skip
    stats = CorrectionInputs(
        observed=observed, ridge=ridge, active=active, moments=moments,
        intercept=moments[: problem.first_key_levels].sum(axis=0), cluster_sizes=sizes, cross=cross,
    )  # fmt: skip
    weights = coefficients(method, stats, problem.n_cells)
    if consts.shard is not None:  # the same bits everywhere, whatever each host's BLAS does
        shared = xp.asarray(weights)
        consts.shard.comm.broadcast(shared)
        weights = backend.to_host(shared)
    apply_correction(xp, raw, state.assignments, weights, state.codes, index, out=state.z_hat)


def _report_round(params: HarmonyParams, record: RoundRecord) -> None:
    parts = record.objective
    line = (
        f"round {record.round}/{params.max_iter_harmony}: {record.inner_iterations} iterations"
        f"{' (converged)' if record.inner_converged else ''}, objective {parts.total:.6g} "
        f"(k-means {parts.kmeans:.6g}, entropy {parts.entropy:.6g}, diversity {parts.diversity:.6g})"
    )
    progress_log.info(
        line, extra={"harmony_round": record.round, "harmony_max_rounds": params.max_iter_harmony}
    )
    if params.verbose and not progress_log.handlers:  # the command shows the line already
        print(line)


def _report_outcome(params: HarmonyParams, converged: bool, n_rounds: int) -> None:
    if converged:
        message = f"Harmony converged in {n_rounds} rounds."
        progress_log.info(message)
        if params.verbose and not progress_log.handlers:
            print(message)
        return
    warn_at_caller(
        f"Harmony did not converge in max_iter_harmony={params.max_iter_harmony} rounds "
        f"(tol_harmony={params.tol_harmony}); raise max_iter_harmony for a settled result.",
        HarmonyConvergenceWarning,
    )
