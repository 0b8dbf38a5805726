"""The pseudo-random cell order of each clustering iteration (docs/algorithm.md §10).

Keys are a PCG-RXS-M-XS hash of (cell index XOR seed) in 32-bit arithmetic, as rapids-singlecell
forms them, so the block order matches it exactly. The hash is a bijection of 32-bit words, so keys
of distinct cells never tie and the sort order does not depend on sort stability.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_ROUND_STRIDE = 1_000_003


def iteration_seed(random_state: int, round_index: int, iteration: int) -> int:
    """s_{i,t} = (random_state + 1000003 i + t) mod 2^32."""
    return (random_state + _ROUND_STRIDE * round_index + iteration) % (1 << 32)


def pcg_keys(xp: Any, n: int, seed: int) -> Any:
    """Hash keys of cells 0..n-1 for ``seed``, uint32, on the array namespace ``xp``."""
    state = xp.arange(n, dtype=xp.uint32) ^ xp.uint32(seed)
    state = state * xp.uint32(747796405) + xp.uint32(2891336453)
    word = ((state >> ((state >> xp.uint32(28)) + xp.uint32(4))) ^ state) * xp.uint32(277803737)
    return (word >> xp.uint32(22)) ^ word


def cell_order(xp: Any, n: int, seed: int) -> Any:
    """Cells sorted by their hash key: the visiting order of one clustering iteration (int64)."""
    keys = pcg_keys(xp, n, seed)
    if xp is np:
        return np.argsort(keys, kind="stable")
    return xp.argsort(keys)


def group_blocks_by_level(xp: Any, order: Any, levels: Any, n_levels: int, block_size: int) -> Any:
    """``order`` with the cells of each block regrouped by level, blocks and levels in order.

    The cells of one block are updated together, so their order within the block changes
    nothing in the algorithm; grouped by their key-0 level, a block's mass adds up in registers
    (``kernels.block_update``). The sort is stable (CuPy's always is), so the order is defined.
    """
    n_blocks = -(-order.shape[0] // block_size)
    key_dtype = xp.int32 if n_blocks * n_levels < 2**31 else xp.int64
    block = xp.arange(order.shape[0], dtype=key_dtype) // block_size
    keys = block * n_levels + levels[order].astype(key_dtype)
    if xp is np:
        return order[np.argsort(keys, kind="stable")]
    return order[xp.argsort(keys)]
