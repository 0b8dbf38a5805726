"""Where the time goes: wraps the engine's main functions with device-synchronising timers.

python benchmarks/profile_phases.py --cells 1000000 --dtype float64
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_benchmarks import PARAMS, synthetic

import harmony_step
from harmony_step import _integrate
from harmony_step._backend import Backend
from harmony_step._core import clustering, correction, init, loop

TIMED = {
    init: [
        "initial_centroids",
        "kmeans_plus_plus",
        "lloyd",
        "soft_assignments",
        "stratified_sample",
    ],
    clustering: [
        "_iterate",
        "block_update",
        "log_penalty_table",
        "cell_order",
        "group_blocks_by_level",
    ],
    correction: ["level_moments", "apply_correction", "coefficients", "cross_counts"],
    loop: [
        "_initialise",
        "_correct",
        "cross_sums",
        "level_sums",
        "row_normalize",
        "load_embedding",
    ],
    _integrate: ["run_harmony", "_checked_inputs", "build_provenance", "select_backend"],
}


def instrument(totals, counts, sync):
    for module, names in TIMED.items():
        for name in names:
            original = getattr(module, name)
            label = f"{module.__name__.rsplit('.', 1)[-1]}.{name}"

            def timed(*args, _f=original, _n=label, **kwargs):
                sync()
                start = time.perf_counter()
                out = _f(*args, **kwargs)
                sync()
                totals[_n] += time.perf_counter() - start
                counts[_n] += 1
                return out

            setattr(module, name, timed)
    original_to_host = Backend.to_host

    def to_host(self, array):
        sync()
        start = time.perf_counter()
        out = original_to_host(self, array)
        totals["Backend.to_host"] += time.perf_counter() - start
        counts["Backend.to_host"] += 1
        return out

    Backend.to_host = to_host


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    import cupy

    # The per-phase seconds of each run come as a "Harmony timings" line of the progress logger.
    logging.basicConfig(format="%(message)s")
    logging.getLogger("harmony_step.progress").setLevel(logging.INFO)
    totals, counts = collections.defaultdict(float), collections.Counter()
    data = synthetic(args.cells)
    for attempt in range(args.repeat):
        adata = data.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            harmony_step.harmony_integrate(
                adata, "batch", dtype=np.dtype(args.dtype).type, device="gpu", **PARAMS
            )
            wall = time.perf_counter() - start
        print(f"run {attempt}: {wall:.3f} s")
        if attempt == 0:
            instrument(totals, counts, cupy.cuda.Device().synchronize)
    for name, total in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(
            f"{name:35s} {counts[name]:6d} calls {total:8.3f} s  {1e3 * total / counts[name]:8.3f} ms/call"
        )


if __name__ == "__main__":
    main()
