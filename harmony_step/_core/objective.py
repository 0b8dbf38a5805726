"""The Harmony objective and the diversity penalty (docs/algorithm.md §5 and §6), per flavor."""

from __future__ import annotations

from typing import Any

import numpy as np

from harmony_step._core import kernels
from harmony_step._core.kernels import ENTROPY_EPS
from harmony_step._core.result import ObjectiveParts


def expected_counts(xp: Any, observed: Any, level_share: Any, first_key_levels: int) -> Any:
    """E_bk = Pr_b * n_k, with n_k read off key 0's rows of O (each cell has one level per key)."""
    cluster_sizes = observed[:first_key_levels].sum(axis=0)
    return level_share[:, None] * cluster_sizes[None, :]


def log_penalty(xp: Any, observed: Any, expected: Any, theta: Any, flavor: str) -> Any:
    """log P_bk: theta_b [log(E+1) - log(O+1)] (harmony1) or theta_b [log(E+1) - log(O+E+1)] (harmony2)."""
    denominator = observed if flavor == "harmony1" else observed + expected
    return theta[:, None] * (xp.log1p(expected) - xp.log1p(denominator))


def diversity_term(
    xp: Any, observed: Any, expected: Any, theta: Any, sigma: float, flavor: str
) -> Any:
    """sigma * sum_bk theta_b O_bk log rho_bk: the negative of the penalty, weighted by O."""
    return -sigma * (observed * log_penalty(xp, observed, expected, theta, flavor)).sum()


def kmeans_term(xp: Any, centroids: Any, centroid_sums: Any, total_mass: Any) -> Any:
    """sum_ik R_ik 2(1 - z_i.y_k) = 2 (sum_ik R_ik - sum_k y_k . (R^T Z)_k), without forming S."""
    return 2.0 * (total_mass - (centroids * centroid_sums).sum())


def entropy_sum(xp: Any, assignments: Any) -> Any:
    """sum R log(R + eps) over the given rows, in float64 (not yet multiplied by sigma)."""
    if xp is np:
        return kernels.cpu().entropy_sum(assignments)
    assignments64 = assignments.astype(xp.float64)
    return (assignments64 * xp.log(assignments64 + ENTROPY_EPS)).sum()


def to_parts(host_values: Any) -> ObjectiveParts:
    kmeans, entropy, diversity = (float(v) for v in host_values)
    return ObjectiveParts(kmeans=kmeans, entropy=entropy, diversity=diversity)
