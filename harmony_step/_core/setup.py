"""Set-up quantities derived once from the input (docs/algorithm.md §3): K, block size, theta, Pr."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from harmony_step._batches import BatchDesign
from harmony_step._params import HarmonyParams


def default_n_clusters(n_cells: int) -> int:
    """K = min(N, max(2, floor(min(100, N / 30)))) (floor as rapids-singlecell; capped at N)."""
    return min(n_cells, max(2, math.floor(min(100.0, n_cells / 30.0))))


def block_size(n_cells: int, block_proportion: float) -> int:
    """Cells per block update; at least one so tiny inputs run."""
    return max(1, math.floor(n_cells * block_proportion))


def expand_theta(theta: float | tuple[float, ...], design: BatchDesign) -> np.ndarray:
    """theta as one value per level, shape (n_levels_total,).

    A scalar applies to every level, ``n_keys`` values apply per key, ``n_levels_total`` values per
    level. Any other length is an error naming both admissible lengths.
    """
    n_keys, n_levels = design.n_keys, design.n_levels_total
    values = np.atleast_1d(np.asarray(theta, dtype=np.float64))
    if values.size == 1 and not isinstance(theta, tuple):
        return np.full(n_levels, values[0])
    if values.size == n_levels:
        return values.copy()
    if values.size == n_keys:
        return np.repeat(values, design.n_levels)
    raise ValueError(
        f"The 'theta' parameter must be a scalar, one value per key ({n_keys}) or one per batch "
        f"level ({n_levels}). Got {values.size} values instead."
    )


def discount_theta(
    theta: np.ndarray, level_counts: np.ndarray, n_clusters: int, tau: float
) -> np.ndarray:
    """theta_b * (1 - exp(-(N_b / (K tau))^2)), the small-batch discount of the paper; tau = 0 is off."""
    if tau == 0:
        return theta
    return theta * (1.0 - np.exp(-((level_counts / (n_clusters * tau)) ** 2)))


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything about the input that the iterations need, on the host."""

    n_cells: int
    n_pcs: int
    n_clusters: int
    block_size: int
    theta: np.ndarray  # (B,) float64, discounted
    level_counts: np.ndarray  # (B,) int64
    level_share: np.ndarray  # Pr_b = N_b / N, (B,) float64
    first_key_levels: int  # levels of key 0: their O rows sum to the cluster sizes
    random_state: int


def make_problem(
    n_cells: int, n_pcs: int, design: BatchDesign, params: HarmonyParams, seed: int
) -> Problem:
    n_clusters = params.n_clusters if params.n_clusters is not None else default_n_clusters(n_cells)
    counts = design.level_counts()
    theta = discount_theta(expand_theta(params.theta, design), counts, n_clusters, params.tau)
    return Problem(
        n_cells=n_cells,
        n_pcs=n_pcs,
        n_clusters=n_clusters,
        block_size=block_size(n_cells, params.block_proportion),
        theta=theta,
        level_counts=counts,
        level_share=counts / n_cells,
        first_key_levels=design.n_levels[0],
        random_state=seed,
    )


# Rows moved to the device per step when loading the embedding: bounds the staging copy.
LOAD_ROWS = 1 << 18


def largest_safe_value(dtype: np.dtype, n_pcs: int) -> float:
    """The largest magnitude whose squares, summed over a row of ``n_pcs`` values, stay finite.

    Row normalisation sums squares in the working dtype; beyond this a row's norm overflows to
    Inf and the row silently becomes zero. The limit is half the magnitude whose squares would sum
    to exactly the dtype's largest value: at that magnitude itself the rounding of the sum can
    overflow.
    """
    return float(np.sqrt(np.finfo(dtype).max / n_pcs)) / 2


def load_embedding(
    xp: Any, host: np.ndarray, dtype: np.dtype, name: str, keep: bool = True
) -> tuple[Any, Any]:
    """(X, Z_hat) on the device in the working dtype, Z_hat = X with rows scaled to unit norm; X
    is None unless ``keep``. Rejects NaN/Inf, values the dtype cannot hold and values whose
    squares overflow it (:func:`largest_safe_value`).

    Rows travel as stored and are cast on the device in slices, so neither a host copy nor a
    full-size staging array is needed, and the input is still checked before any work. On the CPU
    a float32 or float64 input is cast, checked and normalised in one pass on the run's threads.
    """
    x = xp.empty(host.shape, dtype=dtype) if keep else None
    z_hat = xp.empty(host.shape, dtype=dtype)
    if xp is np and host.dtype in (np.float32, np.float64) and host.size:
        from harmony_step._core import kernels

        # one threaded pass: no cast copy, and all the run's threads touch the new pages first
        largest = kernels.cpu().load_rows(host, kernels.NORM_FLOOR, z_hat, x)
    else:
        largest = _load_in_slices(xp, host, x, z_hat)
    if not np.isfinite(float(largest)):
        # A value is NaN or Inf in the input, or beyond the dtype's range once cast.
        bad = ~np.isfinite(host)
        if bad.any():
            rows = np.flatnonzero(bad.any(axis=1))
            raise ValueError(
                f"{name} has {int(bad.sum())} non-finite value(s) (NaN or Inf) in {rows.size} "
                f"cell(s), first at row {int(rows[0])}. Remove or impute them before running "
                "Harmony."
            )
        raise ValueError(
            f"{name} has values beyond the range of {dtype.name}. Use dtype=numpy.float64 or rescale."
        )
    limit = largest_safe_value(dtype, host.shape[1])
    if float(largest) > limit:
        wider = " or use dtype=numpy.float64" if dtype.itemsize < 8 else ""
        raise ValueError(
            f"{name} has values up to {float(largest):.3g}, above {limit:.3g}, the largest "
            f"magnitude whose squares {dtype.name} can sum over {host.shape[1]} columns; such "
            f"rows would become zero. Rescale the embedding{wider}."
        )
    return x, z_hat


def _load_in_slices(xp: Any, host: np.ndarray, x: Any, z_hat: Any) -> Any:
    """Fill ``x`` (if not None) and ``z_hat`` from ``host`` one slice of rows at a time; returns
    max |cast value|, NaN or Inf when a cast value is not finite."""
    from harmony_step._core.sums import largest_magnitude, row_normalize

    largest = xp.zeros((), dtype=z_hat.dtype)
    for start in range(0, host.shape[0], LOAD_ROWS):
        rows = slice(start, start + LOAD_ROWS)
        part = xp.asarray(host[rows])
        with np.errstate(over="ignore"):
            cast = part.astype(z_hat.dtype, copy=False)
        if x is not None:
            x[rows] = cast
        largest = xp.maximum(largest, largest_magnitude(xp, cast))
        with np.errstate(over="ignore", invalid="ignore"):  # bad values are reported by the caller
            row_normalize(xp, cast, out=z_hat[rows])
    return largest
