"""CPU metrics benchmark: the LISI neighbour search, harmony-step's against scikit-learn's.

The step's mixing metrics (``harmony_step._step.metrics``) find, for a sample of 10,000 query
cells, the 89 nearest of all cells. On the CPU the candidates come from a single-precision tiled
search that checks its own rounding (``harmony_step._step.cpu_neighbours``; cells it cannot vouch
for are measured again exactly); this compares it with scikit-learn's brute-force float64 search
(``NearestNeighbors(algorithm="brute")``) followed by the same exact re-ranking, on the same
threads (scikit-learn's OpenMP threads limited with threadpoolctl).

Data: ``realistic_data.generate(n_cells, seed=0)``; query cells: ``metrics.sample_cells(n, 0)``.
Each search runs once on 20,000 cells to warm up (numba's compile and disk cache), then twice
alternating on the full input; the faster run of each is reported, with the number of query cells
the single-precision search could not vouch for and whether both give identical neighbours and
distances. Also reported: the whole metrics of one embedding (``integration_metrics``: iLISI,
cLISI, both silhouettes) with harmony-step's search.

    python benchmarks/run_metrics.py --cells 200000 1000000 --threads 16
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from realistic_data import generate
from run_cpu import arguments, log, machine_heading, merge, start
from threadpoolctl import threadpool_limits

from harmony_step._step import cpu_neighbours, metrics
from harmony_step._threads import cpu_threads

WARMUP_CELLS = 20_000


def search_ours(points: np.ndarray, query: np.ndarray, threads: int) -> tuple:
    return metrics.neighbours(points, query=query, threads=threads)


def search_sklearn(points: np.ndarray, query: np.ndarray, threads: int) -> tuple:
    from sklearn.neighbors import NearestNeighbors

    n_neighbors = int(3 * metrics.PERPLEXITY)
    knn = NearestNeighbors(n_neighbors=n_neighbors + metrics.CANDIDATE_MARGIN, algorithm="brute")
    candidates = knn.fit(points).kneighbors(points[query], return_distance=False)
    return metrics._nearest_candidates(points, query, candidates, n_neighbors, np, threads)


def searched_again(points: np.ndarray, query: np.ndarray, threads: int) -> int:
    """Query cells whose neighbourhood the single-precision candidates cannot vouch for."""
    n_neighbors = int(3 * metrics.PERPLEXITY)
    search = cpu_neighbours.TiledSearch(points, query, threads)
    _, _, unsure = cpu_neighbours._searched(
        search, n_neighbors + metrics.CANDIDATE_MARGIN, n_neighbors
    )
    return int(unsure.size)


def timed(search, points: np.ndarray, query: np.ndarray, threads: int) -> tuple[float, tuple]:
    with cpu_threads(threads), threadpool_limits(limits=threads, user_api="openmp"):
        start = time.perf_counter()
        found = search(points, query, threads)
        return time.perf_counter() - start, found


def measure(cells: int, threads: int) -> dict:
    log(f"{cells:,} cells: generating")
    data = generate(cells, seed=0)
    points = np.ascontiguousarray(data.embedding, dtype=np.float64)
    sample = metrics.sample_cells(cells, 0)
    query = np.arange(cells) if sample is None else sample
    small = generate(min(cells, WARMUP_CELLS), seed=1).embedding.astype(np.float64)
    for search in (search_ours, search_sklearn):
        timed(search, small, np.arange(0, len(small), 10), threads)
    ours, peer = [], []
    for attempt in (1, 2):
        ours.append(timed(search_ours, points, query, threads))
        peer.append(timed(search_sklearn, points, query, threads))
        log(f"{cells:,} cells, run {attempt}: ours {ours[-1][0]:.2f} s, "
            f"scikit-learn {peer[-1][0]:.2f} s")  # fmt: skip
    (ours_s, (d1, i1)), (peer_s, (d2, i2)) = (
        min(ours, key=lambda r: r[0]),
        min(peer, key=lambda r: r[0]),
    )
    with cpu_threads(threads):
        start = time.perf_counter()
        metrics.integration_metrics(points, data.batch, data.cell_type, sample, threads=threads)
        whole = time.perf_counter() - start
    return {
        "cells": cells,
        "query_cells": len(query),
        "threads": threads,
        "ours_seconds": ours_s,
        "sklearn_seconds": peer_s,
        "ratio": ours_s / peer_s,
        "ours_runs": [r[0] for r in ours],
        "sklearn_runs": [r[0] for r in peer],
        "identical": bool(np.array_equal(i1, i2) and np.array_equal(d1, d2)),
        "searched_again": searched_again(points, query, threads),
        "metrics_one_embedding_seconds": whole,
    }


def table(results: dict) -> str:
    lines = [
        "# CPU metrics: the LISI neighbour search against scikit-learn's",
        "",
        "Written by `benchmarks/run_metrics.py` (its docstring describes the method): realistic "
        "synthetic data (64 batches, 50 dimensions), 10,000 query cells, the 89 nearest of all "
        "cells each, the same threads for both, the faster of two alternating runs. Ratio = "
        "harmony-step / scikit-learn (below 1: harmony-step is faster). Searched again: query "
        "cells the single-precision search could not vouch for. Metrics: iLISI, cLISI and both "
        "silhouettes of one embedding (the step computes them before and after correction).",
    ]
    for name, entry in results["machines"].items():
        lines += machine_heading(name, entry["machine"])
        lines += [
            "| cells | harmony-step s | scikit-learn s | ratio | identical neighbours | "
            "searched again | metrics of one embedding s | measured (commit) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in entry["rows"]:
            lines.append(
                f"| {r['cells']:,} | {r['ours_seconds']:.2f} | {r['sklearn_seconds']:.2f} | "
                f"{r['ratio']:.2f} | {'yes' if r['identical'] else 'NO'} | "
                f"{r['searched_again']} of {r['query_cells']:,} | "
                f"{r['metrics_one_embedding_seconds']:.2f} | {r['date']} ({r['commit']}) |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = arguments(__doc__.split("\n")[0], [200_000, 1_000_000]).parse_args()
    threads, meta = start(args)
    for cells in args.cells:
        row = measure(cells, threads)
        log(f"{cells:,} cells: ours {row['ours_seconds']:.2f} s, scikit-learn "
            f"{row['sklearn_seconds']:.2f} s, ratio {row['ratio']:.2f}")  # fmt: skip
        results = merge(args.out / "metrics_cpu.json", meta, row, key=("cells",))
        (args.out / "metrics_cpu.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "metrics_cpu.md").write_text(table(results))
    log(f"wrote {args.out / 'metrics_cpu.json'} and {args.out / 'metrics_cpu.md'}")


if __name__ == "__main__":
    main()
