"""Where the CPU initialisation's time goes: stratified sample, k-means++, Lloyd, soft assignments.

Runs the initialisation alone (one round of one inner iteration, K = 100) on
``realistic_data.generate(cells)`` on ``--threads`` CPU threads, once to compile and cache the
kernels and once under cProfile, and prints the cumulative seconds of the initialisation's steps
and the functions that took longest in their own code (serial NumPy calls show up there).

    python benchmarks/profile_init.py --cells 200000 --threads 16 --dtype float32
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from realistic_data import generate

import harmony_step
from harmony_step._threads import cpu_threads

STEPS = (
    "_initialise",
    "initial_centroids",
    "stratified_sample",
    "kmeans_plus_plus",
    "lloyd",
    "soft_assignments",
    "level_sums",
    "cross_sums",
    "entropy_sum",
    "objective",
)


def run_once(adata, dtype: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", harmony_step.HarmonyConvergenceWarning)
        harmony_step.harmony_integrate(
            adata, "batch", dtype=np.dtype(dtype), device="cpu", n_clusters=100,
            max_iter_harmony=1, max_iter_clustering=1,
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    adata = generate(args.cells, seed=0).to_anndata()
    with cpu_threads(args.threads) as threads:
        run_once(adata, args.dtype)  # compile and cache the kernels
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.runcall(run_once, adata, args.dtype)
        wall = time.perf_counter() - start
    stats = pstats.Stats(profile)
    print(f"{args.cells:,} cells, {args.dtype}, {threads} threads: {wall:.3f} s in all")
    for (filename, _, name), row in sorted(stats.stats.items(), key=lambda item: -item[1][3]):
        if name in STEPS and "harmony_step" in filename:
            where = f"{Path(filename).stem}.{name}"
            print(f"  {where:30s} {row[3]:8.3f} s cumulative, {row[1]} call(s)")
    own = io.StringIO()
    pstats.Stats(profile, stream=own).sort_stats("tottime").print_stats(12)
    print(own.getvalue())


if __name__ == "__main__":
    main()
