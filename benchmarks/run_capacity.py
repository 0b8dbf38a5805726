"""Capacity: the largest inputs, where rapids-singlecell runs out of GPU memory and harmony-step does not.

Same synthetic data and explicit parameters as ``run_benchmarks.py``; each implementation runs
once per size (kernels compiled beforehand on a small input). An out-of-memory error is recorded
as such, with the pool's high-water mark at the time.

    python benchmarks/run_capacity.py --cells 35000000 --dtype float64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_benchmarks import PeakTracker, run_ours, run_rsc, synthetic


def attempt(name, runner, data, dtype, tracker) -> dict:
    import cupy

    adata = data.copy()
    tracker.reset()
    start = time.perf_counter()
    try:
        info = runner(adata, dtype)
        cupy.cuda.Device().synchronize()
        info["status"] = "ok"
    except cupy.cuda.memory.OutOfMemoryError as err:
        info = {"status": f"out of memory: {str(err).splitlines()[0]}"}
    info.update(
        seconds=time.perf_counter() - start, peak_gpu_bytes=tracker.peak, implementation=name
    )
    del adata
    tracker.reset()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[35_000_000])
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    import cupy

    dtype = np.dtype(args.dtype).type
    tracker = PeakTracker()
    warm = synthetic(600_000, seed=1)
    run_ours(warm.copy(), dtype)
    run_rsc(warm.copy(), dtype)
    total = cupy.cuda.runtime.memGetInfo()[1]
    rows = []
    for n_cells in args.cells:
        data = synthetic(n_cells)
        for name, runner in (("harmony-step", run_ours), ("rapids-singlecell", run_rsc)):
            row = {
                "cells": n_cells,
                "dtype": args.dtype,
                **attempt(name, runner, data, dtype, tracker),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del data
    lines = [
        f"GPU memory {total / 2**30:.1f} GiB; harmony2, the parameters of run_benchmarks.py.",
        "",
        "| cells | dtype | implementation | outcome | seconds | peak GPU GiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['cells']:,} | {r['dtype']} | {r['implementation']} | {r['status']} | "
            f"{r['seconds']:.2f} | {r['peak_gpu_bytes'] / 2**30:.2f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "capacity.json").write_text(json.dumps(rows, indent=2))
    (args.out / "capacity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
