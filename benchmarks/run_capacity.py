"""Capacity: the largest inputs, where rapids-singlecell runs out of GPU memory and harmony-step does not.

Same synthetic data and explicit parameters as ``run_benchmarks.py``; each implementation runs
once per size (kernels compiled beforehand on a small input). An out-of-memory error is recorded
as such, with the pool's high-water mark at the time. ``--pool-limit-gib`` caps CuPy's memory
pool for harmony-step's runs, as a smaller GPU would (for example 72 GiB of an 80 GB card);
harmony-step then keeps its input rows in host memory if the cap cannot hold them. Rows are
merged into ``capacity.json`` by (cells, dtype, implementation, limit).

    python benchmarks/run_capacity.py --cells 35000000 --dtype float64
    python benchmarks/run_capacity.py --cells 100000000 --dtype float32 --pool-limit-gib 72 --no-peer
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
    parser.add_argument("--pool-limit-gib", type=float, default=0.0, help="cap for harmony-step")
    parser.add_argument("--no-peer", action="store_true", help="run harmony-step only")
    args = parser.parse_args()
    import cupy

    dtype = np.dtype(args.dtype).type
    tracker = PeakTracker()
    warm = synthetic(600_000, seed=1)
    run_ours(warm.copy(), dtype)
    run_rsc(warm.copy(), dtype)
    total = cupy.cuda.runtime.memGetInfo()[1]
    limit = int(args.pool_limit_gib * 2**30)
    path = args.out / "capacity.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    runners = [("harmony-step", run_ours, limit)]
    if not args.no_peer:
        runners.append(("rapids-singlecell", run_rsc, 0))
    for n_cells in args.cells:
        data = synthetic(n_cells)
        for name, runner, cap in runners:
            cupy.get_default_memory_pool().free_all_blocks()
            cupy.get_default_memory_pool().set_limit(size=cap)
            try:
                row = {
                    "cells": n_cells, "dtype": args.dtype, "pool_limit_bytes": cap,
                    "gpu": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                    "gpu_memory_bytes": total, **attempt(name, runner, data, dtype, tracker),
                }  # fmt: skip
            finally:
                cupy.get_default_memory_pool().set_limit(size=0)
            same = ("cells", "dtype", "implementation", "pool_limit_bytes")
            rows = [r for r in rows if any(r.get(k) != row[k] for k in same)] + [row]
            print(json.dumps(row), flush=True)
        del data
    lines = [
        "harmony2, the parameters of run_benchmarks.py. Pool limit: a cap on CuPy's memory pool "
        "for that run (none: the whole GPU).",
        "",
        "| GPU | cells | dtype | implementation | pool limit GiB | outcome | seconds | peak GPU GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: (r["dtype"], r["cells"], r["implementation"])):
        cap = r.get("pool_limit_bytes", 0)
        lines.append(
            f"| {r['gpu']} | {r['cells']:,} | {r['dtype']} | {r['implementation']} | "
            f"{f'{cap / 2**30:.0f}' if cap else 'none'} | {r['status']} | {r['seconds']:.2f} | "
            f"{r['peak_gpu_bytes'] / 2**30:.2f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    (args.out / "capacity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
