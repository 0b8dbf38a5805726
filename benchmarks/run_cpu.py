"""CPU benchmark: harmony-step's NumPy backend against harmonypy 2.1.0 on the same cores.

Data: ``realistic_data.generate(n_cells, seed=0)`` (64 unequal batches, 30 cell types, 50
dimensions; the model is in that module's docstring). Both implementations get harmonypy's
stopping values explicitly (:data:`PARAMS`: 10 rounds, 4 inner iterations, tolerances 1e-3 and
1e-2) and K = 100, and both run on ``--threads`` threads: harmony-step under
``harmony_step._threads.cpu_threads``, harmonypy with ``ncores`` and its BLAS limited by
threadpoolctl. harmonypy computes in float32 whatever its input; harmony-step runs in
``--dtype`` (float64 by default).

For each size both first run once on a small input (numba's compile and disk cache, first-touch
of memory), then twice alternating on the full input (ours, peer, ours, peer); the faster of the
two runs is reported. Seconds are those of the ``harmony_integrate`` / ``run_harmony`` call.
Reported besides time: harmony-step's phases (init, clustering, correction) of its faster run,
rounds of both, and quality of both outputs: ``batch_r2_within_type`` (the share of the variance
within a cell type that batch explains; lower is better mixed; see ``run_realistic.py``) and the
relative Frobenius distance between the two outputs.

Results are merged into ``cpu.json`` (rows replaced by machine, threads, cells and dtype) and
``cpu.md`` is rewritten from it after every size, so sizes and machines can be run separately:

    python benchmarks/run_cpu.py --cells 60000
    python benchmarks/run_cpu.py --cells 200000 1000000 --threads 16
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from commands import commit
from realistic_data import generate
from run_realistic import (
    TimingsCatcher,
    batch_r2_within_type,
    rel_frobenius,
    subsample,
)

import harmony_step
from harmony_step._threads import available_cpus, cpu_threads

PARAMS = dict(
    max_iter_harmony=10, max_iter_clustering=4, tol_clustering=1e-3, tol_harmony=1e-2,
    sigma=0.1, theta=2.0, n_clusters=100, block_proportion=0.05, random_state=0,
)  # fmt: skip
"""harmonypy 2.1.0's defaults, passed to both (under harmonypy's names for harmonypy)."""

WARMUP_CELLS = 20_000
RESULTS = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_ours(data, dtype: str, threads: int) -> dict:
    adata = data.to_anndata()
    logger = logging.getLogger("harmony_step.progress")
    catcher, level = TimingsCatcher(), logger.level
    logger.addHandler(catcher)
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(), cpu_threads(threads):
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            harmony_step.harmony_integrate(
                adata, "batch", device="cpu", flavor="harmony2", dtype=dtype, **PARAMS
            )
            seconds = time.perf_counter() - start
    finally:
        logger.removeHandler(catcher)
        logger.setLevel(level)
    record = adata.uns["harmony"]
    return {
        "seconds": seconds,
        "phases": dict(catcher.timings),
        "rounds": int(record["n_rounds"]),
        "converged": bool(record["converged"]),
        "embedding": adata.obsm["X_pca_harmony"],
    }


def run_peer(data, threads: int) -> dict:
    import harmonypy
    import pandas as pd
    from threadpoolctl import threadpool_limits

    meta = pd.DataFrame({"batch": data.batch})
    with threadpool_limits(threads):
        start = time.perf_counter()
        result = harmonypy.run_harmony(
            data.embedding, meta, "batch", theta=PARAMS["theta"], sigma=PARAMS["sigma"],
            nclust=PARAMS["n_clusters"], block_size=PARAMS["block_proportion"],
            max_iter_harmony=PARAMS["max_iter_harmony"],
            max_iter_kmeans=PARAMS["max_iter_clustering"],
            epsilon_cluster=PARAMS["tol_clustering"], epsilon_harmony=PARAMS["tol_harmony"],
            random_state=PARAMS["random_state"], ncores=threads, verbose=False,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "rounds": len(result.kmeans_rounds),
        "embedding": np.asarray(result.Z_corr),
    }


def machine(threads: int) -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    from threadpoolctl import threadpool_info

    blas = [
        f"{p['internal_api']} {p['version']}" for p in threadpool_info() if p["user_api"] == "blas"
    ]
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "cpus_available": available_cpus(),
        "threads": threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": version("numba"),
        "blas": ", ".join(sorted(set(blas))),
        "harmony_step": harmony_step.__version__,
        "harmonypy": version("harmonypy"),
    }


def measure(cells: int, dtype: str, threads: int) -> dict:
    log(f"{cells:,} cells: generating")
    data = generate(cells, seed=0)
    log(f"{cells:,} cells: warm-up on {min(cells, WARMUP_CELLS):,} cells")
    small = generate(min(cells, WARMUP_CELLS), seed=1)
    run_ours(small, dtype, threads)
    run_peer(small, threads)
    ours, peer = [], []
    for attempt in (1, 2):
        ours.append(run_ours(data, dtype, threads))
        log(f"{cells:,} cells: harmony-step run {attempt}: {ours[-1]['seconds']:.2f} s "
            f"({', '.join(f'{k} {v:.2f}' for k, v in ours[-1]['phases'].items())})")  # fmt: skip
        peer.append(run_peer(data, threads))
        log(f"{cells:,} cells: harmonypy run {attempt}: {peer[-1]['seconds']:.2f} s")
    best_ours = min(ours, key=lambda r: r["seconds"])
    best_peer = min(peer, key=lambda r: r["seconds"])
    rows = subsample(cells, 200_000, seed=2)
    return {
        "cells": cells,
        "dtype": dtype,
        "threads": threads,
        "ours_seconds": best_ours["seconds"],
        "peer_seconds": best_peer["seconds"],
        "ratio": best_ours["seconds"] / best_peer["seconds"],
        "ours_runs": [r["seconds"] for r in ours],
        "peer_runs": [r["seconds"] for r in peer],
        "ours_phases": best_ours["phases"],
        "ours_rounds": best_ours["rounds"],
        "ours_converged": best_ours["converged"],
        "peer_rounds": best_peer["rounds"],
        "batch_r2_input": batch_r2_within_type(
            data.embedding[rows], data.batch[rows], data.cell_type[rows]
        ),
        "batch_r2_ours": batch_r2_within_type(
            best_ours["embedding"][rows], data.batch[rows], data.cell_type[rows]
        ),
        "batch_r2_peer": batch_r2_within_type(
            best_peer["embedding"][rows], data.batch[rows], data.cell_type[rows]
        ),
        "rel_frobenius_vs_peer": rel_frobenius(best_ours["embedding"], best_peer["embedding"]),
    }


def merge(path: Path, meta: dict, row: dict, key: tuple[str, ...] = ("dtype", "cells")) -> dict:
    """The results in ``path`` with ``row`` added under this machine and thread count, replacing
    the row with the same ``key`` values; rows sorted by ``key``."""
    results = json.loads(path.read_text()) if path.exists() else {"machines": {}}
    name = f"{meta['cpu_model']}, {meta['threads']} threads"
    entry = results["machines"].setdefault(name, {"machine": meta, "rows": []})
    entry["machine"] = meta

    def values(r: dict) -> tuple:
        return tuple(r[k] for k in key)

    entry["rows"] = [r for r in entry["rows"] if values(r) != values(row)]
    entry["rows"].append({**row, "date": datetime.date.today().isoformat(), "commit": commit()})
    entry["rows"].sort(key=values)
    return results


def machine_heading(name: str, m: dict, peer: str = "") -> list[str]:
    """The Markdown heading of one machine's rows and its software versions."""
    return [
        "",
        f"## {name}",
        "",
        f"{m['cpus_available']} CPUs available of {m['logical_cpus']}; Python {m['python']}, "
        f"NumPy {m['numpy']} ({m['blas']}), numba {m['numba']}, harmony-step "
        f"{m['harmony_step']}{peer}.",
        "",
    ]


def table(results: dict) -> str:
    lines = [
        "# CPU benchmark: harmony-step against harmonypy 2.1.0",
        "",
        "Written by `benchmarks/run_cpu.py` (its docstring describes the method): realistic "
        "synthetic data (64 batches, 50 dimensions), harmonypy's stopping values for both (10 "
        "rounds, 4 inner iterations, tolerances 1e-3 and 1e-2), K = 100, the same threads for "
        "both, the faster of two alternating runs. Ratio = harmony-step / harmonypy (below 1: "
        "harmony-step is faster). batch R² = share of within-type variance explained by batch "
        "(input, harmony-step, harmonypy). harmonypy computes in single precision whatever its "
        "input (every value of its output is a float32 value), so harmony-step's float32 rows "
        "compare like with like; its float64 rows do twice the memory traffic.",
    ]
    for name, entry in results["machines"].items():
        m = entry["machine"]
        lines += machine_heading(name, m, f", harmonypy {m['harmonypy']}")
        lines += [
            "| cells | dtype | harmony-step s | harmonypy s | ratio | init / clustering / "
            "correction s | rounds (ours / harmonypy) | batch R² input / ours / harmonypy | "
            "rel. Frobenius vs harmonypy | measured (commit) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in entry["rows"]:
            p = r["ours_phases"]
            lines.append(
                f"| {r['cells']:,} | {r['dtype']} | {r['ours_seconds']:.2f} | "
                f"{r['peer_seconds']:.2f} | {r['ratio']:.2f} | {p['init']:.2f} / "
                f"{p['clustering']:.2f} / {p['correction']:.2f} | {r['ours_rounds']} / "
                f"{r['peer_rounds']} | {r['batch_r2_input']:.3f} / {r['batch_r2_ours']:.3f} / "
                f"{r['batch_r2_peer']:.3f} | {r['rel_frobenius_vs_peer']:.3f} | "
                f"{r['date']} ({r.get('commit', 'not recorded')}) |"
            )
    return "\n".join(lines) + "\n"


def arguments(description: str, cells: list[int]) -> argparse.ArgumentParser:
    """The options every CPU benchmark takes: ``--cells``, ``--threads`` and ``--out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cells", type=int, nargs="+", default=cells)
    parser.add_argument(
        "--threads", type=int, default=None, help="default: the CPUs this process may use"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def start(args: argparse.Namespace) -> tuple[int, dict]:
    """The thread count and the machine's description (logged); creates ``--out``."""
    threads = args.threads or available_cpus()
    meta = machine(threads)
    log(f"machine: {json.dumps(meta)}")
    args.out.mkdir(parents=True, exist_ok=True)
    return threads, meta


def main() -> None:
    parser = arguments(__doc__.split("\n")[0], [60_000, 200_000, 1_000_000])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    args = parser.parse_args()
    threads, meta = start(args)
    for cells in args.cells:
        row = measure(cells, args.dtype, threads)
        log(
            f"{cells:,} cells: harmony-step {row['ours_seconds']:.2f} s, harmonypy "
            f"{row['peer_seconds']:.2f} s, ratio {row['ratio']:.2f}"
        )
        results = merge(args.out / "cpu.json", meta, row)
        (args.out / "cpu.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "cpu.md").write_text(table(results))
    log(f"wrote {args.out / 'cpu.json'} and {args.out / 'cpu.md'}")


if __name__ == "__main__":
    main()
