"""The core spread over ranks: each rank holds a contiguous range of cells, sums go over ranks.

The ranks here are threads of one process on NumPy, joined by an in-process sum in rank order, so
the sharded algorithm itself (block order, leave-block-out counts, the sampled k-means input, the
correction's sums) is checked on any machine. NCCL runs on several GPUs are in test_multigpu.py.
"""

from __future__ import annotations

import threading
import warnings

import anndata as ad
import numpy as np
import pytest

from harmony_step._backend import select_backend
from harmony_step._core import run_harmony
from harmony_step._core.shard import Shard
from harmony_step._integrate import _checked_inputs
from harmony_step._params import HarmonyConvergenceWarning, HarmonyParams
from tests.reference import relative_frobenius


class ThreadGroup:
    """Collectives among ``size`` threads: each sum is taken in rank order, so it is deterministic."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._barrier = threading.Barrier(size, timeout=120)
        self._slots: list = [None] * size

    def member(self, rank: int) -> ThreadRank:
        return ThreadRank(self, rank)

    def exchange(self, rank: int, array: np.ndarray) -> list[np.ndarray]:
        self._slots[rank] = array.copy()
        self._barrier.wait()
        values = list(self._slots)
        self._barrier.wait()
        return values


class ThreadRank:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.size = group, rank, group.size

    def all_sum(self, array: np.ndarray) -> None:
        values = self.group.exchange(self.rank, array)
        total = values[0].copy()
        for value in values[1:]:
            total += value
        array[...] = total

    def broadcast(self, array: np.ndarray, root: int = 0) -> None:
        array[...] = self.group.exchange(self.rank, array)[root]


def params(**values) -> HarmonyParams:
    return HarmonyParams.resolve([("", {"device": "cpu", **values})], stacklevel=2)


def run_sharded(embedding, design, chosen: HarmonyParams, size: int):
    """Every rank's result, rank order; the ranks hold near-equal contiguous row ranges."""
    group = ThreadGroup(size)
    n = embedding.shape[0]
    bounds = [r * n // size for r in range(size + 1)]
    results: list = [None] * size
    errors: list = []

    def work(rank: int) -> None:
        try:
            shard = Shard(group.member(rank), bounds[rank], n)
            rows = embedding[bounds[rank] : bounds[rank + 1]]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", HarmonyConvergenceWarning)
                results[rank] = run_harmony(rows, design, chosen, select_backend("cpu"), shard)
        except BaseException as err:  # reported by the main thread
            errors.append(err)
            group._barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def run_whole(embedding, design, chosen):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HarmonyConvergenceWarning)
        return run_harmony(embedding, design, chosen, select_backend("cpu"))


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("flavor", ["harmony2", "harmony1"])
def test_sharded_run_follows_the_whole_run(data_dir, ranks, flavor):
    adata = ad.read_h5ad(data_dir / "pbmc_3500" / "pbmc_3500.h5ad")
    chosen = params(flavor=flavor, max_iter_harmony=3)
    embedding, design = _checked_inputs(adata, "donor", chosen)
    whole = run_whole(embedding, design, chosen)
    parts = run_sharded(embedding, design, chosen, ranks)
    joined = np.concatenate([p.embedding for p in parts])
    assert relative_frobenius(joined, whole.embedding) <= 1e-10
    for part in parts:
        assert [r.inner_iterations for r in part.rounds] == [
            r.inner_iterations for r in whole.rounds
        ]
        assert part.rounds[-1].objective.total == pytest.approx(
            whole.rounds[-1].objective.total, rel=1e-10
        )
    again = run_sharded(embedding, design, chosen, ranks)
    assert np.array_equal(np.concatenate([p.embedding for p in again]), joined)


def test_sharded_run_with_two_keys(data_dir):
    adata = ad.read_h5ad(data_dir / "pbmc_3500" / "pbmc_3500.h5ad")
    rng = np.random.default_rng(0)
    adata.obs["lane"] = np.asarray(["a", "b", "c"])[rng.integers(0, 3, adata.n_obs)]
    chosen = params(max_iter_harmony=2)
    embedding, design = _checked_inputs(adata, ["donor", "lane"], chosen)
    whole = run_whole(embedding, design, chosen)
    joined = np.concatenate([p.embedding for p in run_sharded(embedding, design, chosen, 2)])
    assert relative_frobenius(joined, whole.embedding) <= 1e-10


def test_a_drawn_seed_is_rank_0s_on_every_rank(data_dir):
    adata = ad.read_h5ad(data_dir / "pbmc_3500" / "pbmc_3500.h5ad")
    chosen = params(max_iter_harmony=2, random_state=None)
    embedding, design = _checked_inputs(adata, "donor", chosen)
    parts = run_sharded(embedding, design, chosen, 3)
    seeds = {part.random_state for part in parts}
    assert len(seeds) == 1
    whole = run_whole(embedding, design, params(max_iter_harmony=2, random_state=seeds.pop()))
    joined = np.concatenate([p.embedding for p in parts])
    assert relative_frobenius(joined, whole.embedding) <= 1e-10
