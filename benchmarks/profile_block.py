"""Cost of each operation of one block update at a given size (device-synchronised timings).

python benchmarks/profile_block.py --cells 10000000 --dtype float64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harmony_step._core.kernels import log_penalty_table, penalized_softmax
from harmony_step._core.sums import one_hot


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=10_000_000)
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--pcs", type=int, default=50)
    parser.add_argument("--levels", type=int, default=8)
    args = parser.parse_args()
    import cupy
    from cupyx.profiler import benchmark

    n, k, d, b = args.cells, args.clusters, args.pcs, args.levels
    dtype = np.dtype(args.dtype)
    rng = cupy.random.default_rng(0)
    z = rng.standard_normal((n, d), dtype=np.float64).astype(dtype)
    r = rng.random((n, k), dtype=np.float64).astype(dtype)
    codes = rng.integers(0, b, (n, 1)).astype(cupy.int32)
    cells = cupy.argsort(rng.random(n))[: n // 20]
    y = rng.standard_normal((k, d), dtype=np.float64).astype(dtype)
    observed = cupy.full((b, k), 100.0)
    share, theta = cupy.full(b, 1.0 / b), cupy.full(b, 2.0)
    z_block, r_old = z[cells], r[cells]
    phi = one_hot(cupy, codes[cells], b, cupy.float64)
    r64 = r_old.astype(cupy.float64)
    sim = z_block @ y.T
    pen = log_penalty_table(cupy, observed, share, theta, b, "harmony2")
    ops = {
        "cell_order argsort": lambda: cupy.argsort(
            cupy.arange(n, dtype=cupy.uint32) * cupy.uint32(747796405)
        ),
        "gather z_block": lambda: z[cells],
        "gather R rows": lambda: r[cells],
        "gather codes": lambda: codes[cells],
        "one_hot": lambda: one_hot(cupy, codes[cells], b, cupy.float64),
        "R rows astype f64": lambda: r_old.astype(cupy.float64, copy=False),
        "phi.T @ R64 (O update)": lambda: phi.T @ r64,
        "penalty table": lambda: log_penalty_table(cupy, observed, share, theta, b, "harmony2"),
        "z_block @ Y.T": lambda: z_block @ y.T,
        "penalized_softmax": lambda: penalized_softmax(
            cupy, sim, pen, codes[cells], cells, r, 20.0
        ),
        "R64.T @ z64 (centroid sums)": lambda: r64.T @ z_block.astype(cupy.float64, copy=False),
        "R64.T @ phi": lambda: r64.T @ phi,
        "concat z|phi then one GEMM": lambda: (
            r64.T @ cupy.concatenate([z_block.astype(cupy.float64, copy=False), phi], axis=1)
        ),
    }
    print(f"block of {cells.size:,} rows from {n:,} cells, K={k}, d={d}, B={b}, {dtype}")
    for name, fn in ops.items():
        result = benchmark(fn, n_repeat=10, n_warmup=2)
        print(
            f"{name:32s} {1e3 * float(np.mean(result.gpu_times)):8.3f} ms gpu  {1e3 * float(np.mean(result.cpu_times)):8.3f} ms cpu"
        )


if __name__ == "__main__":
    main()
