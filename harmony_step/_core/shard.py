"""One rank's share of the cells when a run is spread over several GPUs (one process per GPU).

Every coupling between cells in Harmony is a small sum: the counts O (B x K), the centroid sums
R^T Z (K x d), the objective's parts and the correction's per-cluster systems. A rank holds a
contiguous range of the cells; those sums are added over ranks (``comm.all_sum``) and everything
else stays local. O is exact fixed point, so its sum over ranks does not depend on the reduction
order and the clustering step follows the one-GPU run exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol


class Communicator(Protocol):
    """Collectives over the ranks of one run (NCCL in ``harmony_step._distributed``)."""

    rank: int
    size: int

    def all_sum(self, array: Any) -> None:
        """Replace ``array`` (a device array) by its sum over ranks, the same bits on every rank."""

    def broadcast(self, array: Any, root: int = 0) -> None:
        """Replace ``array`` on every rank by root's."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """This rank's cells: global rows ``[start, start + n_local)`` of ``n_cells``."""

    comm: Communicator
    start: int
    n_cells: int
