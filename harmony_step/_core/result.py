"""What a Harmony run returns: the corrected embedding and its convergence history."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ObjectiveParts:
    """The objective J = kmeans + entropy + diversity (docs/algorithm.md §6), in float64."""

    kmeans: float
    entropy: float
    diversity: float

    @property
    def total(self) -> float:
        return self.kmeans + self.entropy + self.diversity


@dataclasses.dataclass(frozen=True)
class IterationRecord:
    """One clustering iteration (round 0, iteration 0 is the initialisation)."""

    round: int
    iteration: int
    objective: ObjectiveParts
    seconds: float  # since the start of the run


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    """One outer round: its last clustering record, how many iterations, and whether the inner test fired."""

    round: int
    inner_iterations: int
    inner_converged: bool
    objective: ObjectiveParts


@dataclasses.dataclass
class HarmonyResult:
    """Output of :func:`harmony_step._core.run_harmony`."""

    embedding: np.ndarray  # (n_cells, n_pcs), host, working dtype
    iterations: list[IterationRecord]
    rounds: list[RoundRecord]  # starts with the initialisation record (round 0)
    converged: bool
    n_clusters: int
    block_size: int
    correction_method: str
    random_state: int
    timings: dict[str, float]
    peak_pool_bytes: int = 0
