"""The input rows X: read again by every round's correction, so kept on the device when it fits,
else streamed from host memory in fixed row chunks.

X is as large as Z_hat, so leaving it in host memory lowers the device's high-water mark by
N d bytes of the working dtype (a quarter of it at K = 100, d = 50): 100M cells x 50 PCs in
float32 then fit in about 60 GiB. The price is one host-to-device pass over X per round.

Where X lives is decided from the device's total memory (or the memory pool's limit, if one is
set), never from what other processes leave free, so a rerun on the same machine takes the same
path and gives the same bits.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

# Rows per chunk of X, resident or streamed.
CHUNK_ROWS = 1 << 20
# Share of the device's free memory that the run may plan to fill (the rest: the pool's own
# rounding, cuBLAS workspaces, sort scratch).
USABLE_SHARE = 0.85


class RawRows:
    """X, (n, d) in the working dtype: ``device`` when resident, else chunks of ``host``."""

    def __init__(self, xp: Any, host: np.ndarray, dtype: np.dtype, device: Any = None) -> None:
        self.xp, self.host, self.dtype, self.device = xp, host, np.dtype(dtype), device

    @property
    def resident(self) -> bool:
        return self.device is not None

    @property
    def shape(self) -> tuple[int, int]:
        return self.host.shape

    def chunks(self) -> Iterator[tuple[slice, Any]]:
        """(rows, X[rows] on the device) for consecutive ``CHUNK_ROWS`` row ranges."""
        n = self.host.shape[0]
        for start in range(0, n, CHUNK_ROWS):
            rows = slice(start, min(start + CHUNK_ROWS, n))
            if self.resident:
                yield rows, self.device[rows]
            else:
                part = self.xp.asarray(self.host[rows])
                with np.errstate(over="ignore"):
                    yield rows, part.astype(self.dtype, copy=False)


def keep_on_device(
    xp: Any, shape: tuple[int, int], n_clusters: int, dtype: np.dtype, *, n_keys: int,
    n_levels: int,
) -> bool:  # fmt: skip
    """Whether X can stay on the device beside Z_hat, R and the loop's scratch.

    Planned bytes: X, Z_hat and R, the iteration's index arrays (about four N-long int64 arrays
    while the visiting order is sorted), the similarity span, and the correction's level pieces
    (5 bytes per slot: N slots per key, plus padding of at most N / 4 or 32 per level) with their
    scratch (at most 128 MiB, ``correction.group_pieces``), against ``USABLE_SHARE`` of the
    device's total memory or of the memory pool's limit if one is set. Always True on the CPU.
    """
    if xp is np:
        return True
    n_cells, n_pcs = shape
    itemsize = np.dtype(dtype).itemsize
    pieces = 5 * (n_keys * n_cells + max(n_cells // 4, 32 * n_levels))
    planned = n_cells * (2 * n_pcs + n_clusters) * itemsize + 4 * 8 * n_cells + pieces + (3 << 27)
    _, total = xp.cuda.runtime.memGetInfo()
    limit = xp.get_default_memory_pool().get_limit()
    return planned <= USABLE_SHARE * (min(limit, total) if limit else total)
