"""The pseudo-random cell order of each clustering iteration (docs/algorithm.md §10).

Keys are a PCG-RXS-M-XS hash of (cell index XOR seed) in 32-bit arithmetic, as rapids-singlecell
forms them, so the block order matches it exactly. The hash is a bijection of 32-bit words, so keys
of distinct cells never tie and the sort order does not depend on sort stability.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from harmony_step._core import kernels

_ROUND_STRIDE = 1_000_003


def iteration_seed(random_state: int, round_index: int, iteration: int) -> int:
    """s_{i,t} = (random_state + 1000003 i + t) mod 2^32."""
    return (random_state + _ROUND_STRIDE * round_index + iteration) % (1 << 32)


_PCG_BODY = """
    const unsigned int state = ((unsigned int)i ^ seed) * 747796405u + 2891336453u;
    const unsigned int word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    key = (word >> 22u) ^ word;
"""

_GROUP_BODY = "key = (K)(i / block_size) * n_levels + (K)codes[order[i] * n_keys];"


@functools.cache
def _elementwise(name: str) -> Any:
    import cupy

    if name == "pcg":
        return cupy.ElementwiseKernel("uint32 seed", "uint32 key", _PCG_BODY, "harmony_pcg_keys")
    return cupy.ElementwiseKernel(
        "raw int64 order, raw int32 codes, int64 n_keys, int64 block_size, int64 n_levels", "K key",
        _GROUP_BODY, "harmony_block_level_keys",
    )  # fmt: skip


def pcg_keys(xp: Any, n: int, seed: int) -> Any:
    """Hash keys of cells 0..n-1 for ``seed``, uint32, on the array namespace ``xp``."""
    if xp is not np:  # the same arithmetic as below, in one kernel
        keys = xp.empty(n, dtype=xp.uint32)
        _elementwise("pcg")(np.uint32(seed), keys)
        return keys
    state = np.arange(n, dtype=np.uint32) ^ np.uint32(seed)
    state = state * np.uint32(747796405) + np.uint32(2891336453)
    word = ((state >> ((state >> np.uint32(28)) + np.uint32(4))) ^ state) * np.uint32(277803737)
    return (word >> np.uint32(22)) ^ word


def cell_order(xp: Any, n: int, seed: int) -> Any:
    """Cells sorted by their hash key: the visiting order of one clustering iteration (int64)."""
    if xp is np:
        return kernels.cpu().cell_order(n, seed)
    return xp.argsort(pcg_keys(xp, n, seed))


def group_blocks_by_level(xp: Any, order: Any, codes: Any, n_levels: int, block_size: int) -> Any:
    """``order`` with the cells of each block regrouped by key-0 level (``codes[:, 0]``).

    The cells of one block are updated together, so their order within the block changes
    nothing in the algorithm; grouped by their key-0 level, a block's mass adds up in registers
    (``kernels.block_update``). The sort is stable (CuPy's always is), so the order is defined.
    """
    if xp is np:
        return kernels.cpu().group_blocks_by_level(order, codes[:, 0], n_levels, block_size)
    n_blocks = -(-order.shape[0] // block_size)
    key_dtype = np.int32 if n_blocks * n_levels < 2**31 else np.int64
    keys = xp.empty(order.shape[0], dtype=key_dtype)
    _elementwise("group")(order, codes, codes.shape[1], block_size, n_levels, keys)
    return order[xp.argsort(keys)]


def _group_blocks_reference(order, codes, n_levels, block_size):
    """``group_blocks_by_level`` in NumPy: a stable argsort of (block, key-0 level)."""
    n_blocks = -(-order.shape[0] // block_size)
    key_dtype = np.int32 if n_blocks * n_levels < 2**31 else np.int64
    block = np.arange(order.shape[0], dtype=key_dtype) // block_size
    keys = block * n_levels + codes[order, 0].astype(key_dtype)
    return order[np.argsort(keys, kind="stable")]
