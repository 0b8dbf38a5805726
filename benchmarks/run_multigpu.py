"""Scaling over GPUs: one harmony-step run on 1 and on 2 (or more) GPUs, realistic data.

Data: ``realistic_data.generate(cells, seed)`` (the model of ``run_realistic.py``: 64 unequal
batches, 30 cell types, 50 dimensions, float32), the same explicit parameters as
``run_realistic.py`` (:data:`run_realistic.PARAMS`, flavor harmony2 unless ``--flavor``). For
each size the data is generated once; for each dtype the GPU counts run in increasing order, the
one-GPU run first, so that every run on more GPUs is compared with it.

Per row (``benchmarks/results/multigpu.json``, rows replaced by gpus, cells, dtype and flavor):

* ``seconds``: wall time of one run of the engine under ``harmony_integrate`` (its AnnData
  bookkeeping left out; worker start, rendezvous, moving the rows to the GPUs, the algorithm and
  collecting the result included), after a warm-up run on ``--warmup-cells`` cells with the same
  GPU count (kernel compilation, library loading);
* ``peak_gpu_bytes``: the largest CuPy pool size any GPU of the run reached
  (the run's ``peak_pool_bytes``, the maximum over ranks);
* ``rel_diff_vs_one_gpu``: ``||E_G - E_1||_F / ||E_1||_F`` against the one-GPU run of the same
  size and dtype (None where there is none);
* ``error``: None, or the one-line error of a run that failed (a one-GPU run out of memory is how
  the capacity runs show what a single GPU cannot hold);
* besides: rounds, inner iterations, convergence, the logged phase timings (with
  ``distribute``, ``collect`` and ``start_workers`` on several GPUs).

Every row is written as soon as it is measured, with ``multigpu.md`` (a README-ready table) and
``multigpu.png`` (seconds against cells, 1 and 2 GPUs, and rapids-singlecell on one GPU from
``realistic.json`` where it has rows of the same dtype and flavor).

    python benchmarks/run_multigpu.py --cells 10000000 50000000          # speed-up, 1 and 2 GPUs
    python benchmarks/run_multigpu.py --cells 150000000 --gpus 2         # capacity
    python benchmarks/run_multigpu.py --report-only                      # table and plot again
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from realistic_data import generate
from run_realistic import PARAMS, rel_frobenius

import harmony_step

OURS, PEER = "harmony-step", "rapids-singlecell"
BATCH_KEY = "batch"
KEY_FIELDS = ("gpus", "cells", "dtype", "flavor")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- one run ----------------------------------------------------------------------------------


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:600]


def run(data, gpus: int, dtype: str, flavor: str) -> tuple[dict, np.ndarray | None]:
    """One run of the engine under ``harmony_integrate`` on the generated arrays (no AnnData: at
    10^8 cells building one takes minutes, all of it in string cell names); the row's fields and
    the corrected embedding (None on error)."""
    import pandas as pd

    from harmony_step._backend import select_backend
    from harmony_step._batches import encode_batches
    from harmony_step._core import run_harmony
    from harmony_step._distributed import run_sharded
    from harmony_step._params import HarmonyParams

    values = {k: v for k, v in PARAMS.items() if k != "colsum_algo"}
    values.update(flavor=flavor, dtype=np.dtype(dtype).type, device="gpu", n_gpus=gpus)
    params = HarmonyParams.resolve([("", values)], stacklevel=2)
    obs = pd.DataFrame({BATCH_KEY: pd.Categorical.from_codes(data.batch, data.batch_names())})
    design = encode_batches(obs, (BATCH_KEY,))
    backend = select_backend("gpu")
    gc.collect()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = run_sharded if gpus > 1 else run_harmony
            result = engine(data.embedding, design, params, backend)
    except Exception as err:
        seconds = time.perf_counter() - start
        _release_gpu_memory()
        return {"seconds": seconds, "error": one_line(err), "timings": {}}, None
    seconds = time.perf_counter() - start
    _release_gpu_memory()
    return {
        "seconds": seconds,
        "peak_gpu_bytes": int(result.peak_pool_bytes),
        "error": None,
        "rounds": len(result.rounds) - 1,
        "inner_iterations": int(sum(r.inner_iterations for r in result.rounds[1:])),
        "converged": bool(result.converged),
        "n_clusters": int(result.n_clusters),
        "timings": {k: float(v) for k, v in result.timings.items()},
    }, result.embedding


def _release_gpu_memory() -> None:
    try:
        import cupy
    except ImportError:
        return
    cupy.cuda.Device().synchronize()
    cupy.get_default_memory_pool().free_all_blocks()


# --- results ----------------------------------------------------------------------------------


def machine() -> dict:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    try:
        from cupy.cuda import nccl

        nccl_version = int(nccl.get_version()) if nccl.available else None
    except Exception:
        nccl_version = None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device_name": name,
        "gpus_visible": int(cupy.cuda.runtime.getDeviceCount()),
        "gpu_memory_bytes": int(cupy.cuda.runtime.memGetInfo()[1]),
        "cuda_runtime": int(cupy.cuda.runtime.runtimeGetVersion()),
        "cupy": cupy.__version__,
        "nccl": nccl_version,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "harmony_step": harmony_step.__version__,
        "host_cpus": os.cpu_count(),
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
    }


def load(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"meta": {}, "rows": []}


def merge(path: Path, meta: dict, row: dict) -> dict:
    results = load(path)
    if meta:
        results["meta"] = meta
    key = tuple(row[k] for k in KEY_FIELDS)
    rows = [r for r in results.get("rows", []) if tuple(r[k] for k in KEY_FIELDS) != key]
    rows.append(row)
    rows.sort(key=lambda r: (r["flavor"], r["dtype"], r["cells"], r["gpus"]))
    results["rows"] = rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return results


def peer_rows(path: Path | None) -> list[dict]:
    """rapids-singlecell's rows of ``realistic.json`` (one GPU), if the file exists."""
    if path is None or not path.exists():
        return []
    rows = json.loads(path.read_text()).get("rows", [])
    return [r for r in rows if r.get("implementation") == PEER and r.get("seconds")]


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict, peers: list[dict]) -> str:
    """README-ready Markdown: seconds and peak memory per GPU count, speed-up, agreement."""
    meta, rows = results.get("meta", {}), results.get("rows", [])
    counts = sorted({r["gpus"] for r in rows})
    by = {(r["cells"], r["dtype"], r["flavor"], r["gpus"]): r for r in rows}
    configs = sorted({(r["cells"], r["dtype"], r["flavor"]) for r in rows})
    peer = {(r["cells"], r["dtype"], r["flavor"]): r for r in peers}
    gib = 1 << 30
    header = ["cells", "dtype", "flavor"]
    header += [f"{g} GPU{'s' if g > 1 else ''} s" for g in counts]
    header += [f"speed-up {g} GPUs" for g in counts if g > 1]
    header += [f"GiB per GPU, {g}" for g in counts]
    header += [f"rel. diff {g} vs 1" for g in counts if g > 1]
    header += ["rapids-singlecell 1 GPU s"]
    lines = [
        f"{meta.get('gpus_visible', '-')} x {meta.get('device_name', '-')}, CuPy "
        f"{meta.get('cupy', '-')}, NCCL {meta.get('nccl', '-')}, harmony-step "
        f"{meta.get('harmony_step', '-')}; {str(meta.get('date', '-'))[:10]}. Data from "
        "`benchmarks/realistic_data.py`, parameters of `benchmarks/run_realistic.py`. Seconds: "
        "one run of the engine under `harmony_integrate` (its AnnData bookkeeping left out) after "
        "a warm-up, worker start and data movement included; GiB: the largest CuPy pool of any "
        "GPU of the run; rel. diff: relative Frobenius distance to the one-GPU result.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    notes = []
    for cells, dtype, flavor in configs:
        cell = [f"{cells:,}", dtype, flavor]
        base = by.get((cells, dtype, flavor, 1))
        for g in counts:
            row = by.get((cells, dtype, flavor, g))
            if row is None:
                cell.append("-")
            elif row["error"]:
                cell.append("failed")
                notes.append(f"{cells:,} cells, {dtype}, {g} GPU(s): {row['error']}")
            else:
                cell.append(f"{row['seconds']:.2f}")
        for g in counts:
            if g == 1:
                continue
            row = by.get((cells, dtype, flavor, g))
            ok = base and row and not base["error"] and not row["error"]
            cell.append(_fmt(base["seconds"] / row["seconds"] if ok else None, ".2f"))
        for g in counts:
            row = by.get((cells, dtype, flavor, g))
            peak = row.get("peak_gpu_bytes") if row and not row["error"] else None
            cell.append(_fmt(peak / gib if peak else None, ".1f"))
        for g in counts:
            if g == 1:
                continue
            row = by.get((cells, dtype, flavor, g))
            cell.append(_fmt(row.get("rel_diff_vs_one_gpu") if row else None, ".1e"))
        other = peer.get((cells, dtype, flavor))
        cell.append(_fmt(other["seconds"] if other else None, ".2f"))
        lines.append("| " + " | ".join(cell) + " |")
    if notes:
        lines += ["", "Failed runs:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def plot(results: dict, peers: list[dict], path: Path) -> None:
    """Seconds against cells (log-log): harmony-step per GPU count, rapids-singlecell on one GPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.get("rows", []) if not r["error"]]
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    series = sorted({(r["dtype"], r["flavor"], r["gpus"]) for r in rows})
    for dtype, flavor, gpus in series:
        points = sorted(
            (r["cells"], r["seconds"])
            for r in rows
            if (r["dtype"], r["flavor"], r["gpus"]) == (dtype, flavor, gpus)
        )
        label = f"harmony-step, {gpus} GPU{'s' if gpus > 1 else ''} ({dtype})"
        axis.plot(*zip(*points, strict=True), marker="o", label=label)
    kinds = {(dtype, flavor) for dtype, flavor, _ in series}
    for dtype, flavor in sorted(kinds):
        points = sorted(
            (r["cells"], r["seconds"])
            for r in peers
            if (r["dtype"], r["flavor"]) == (dtype, flavor)
        )
        if points:
            axis.plot(
                *zip(*points, strict=True), marker="s", linestyle="--",
                label=f"rapids-singlecell, 1 GPU ({dtype})",
            )  # fmt: skip
    for gpus in sorted({r["gpus"] for r in results.get("rows", []) if r["error"]}):
        cells = [r["cells"] for r in results["rows"] if r["error"] and r["gpus"] == gpus]
        # at the top of the plot: x in data coordinates, y in axes coordinates
        axis.plot(
            cells, [0.97] * len(cells), marker="x", linestyle="none", color="grey",
            transform=axis.get_xaxis_transform(),
            label=f"harmony-step, {gpus} GPU{'s' if gpus > 1 else ''}: failed (see table)",
        )  # fmt: skip
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("cells")
    axis.set_ylabel("seconds (harmony_integrate)")
    meta = results.get("meta", {})
    axis.set_title(f"Harmony on {meta.get('device_name', 'GPUs')}, realistic data", fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    if series:
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    plt.close(figure)


def write_report(results: dict, peers: list[dict], out: Path) -> None:
    (out / "multigpu.md").write_text("## Scaling over GPUs\n\n" + table(results, peers))
    plot(results, peers, out / "multigpu.png")


# --- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000_000, 50_000_000])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--flavor", default="harmony2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-cells", type=int, default=500_000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--peer-results",
        type=Path,
        default=Path("benchmarks/results/realistic.json"),
        help="rapids-singlecell rows to plot beside ours (realistic.json); 'none' for none",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the table and plot from the JSON"
    )
    args = parser.parse_args()
    path = args.out / "multigpu.json"
    peers = peer_rows(None if str(args.peer_results) == "none" else args.peer_results)
    if args.report_only:
        write_report(load(path), peers, args.out)
        log(f"wrote {args.out / 'multigpu.md'} and {args.out / 'multigpu.png'}")
        return

    meta = machine()
    counts = sorted(set(args.gpus))
    log(f"{meta['gpus_visible']} x {meta['device_name']}; runs on {counts} GPU(s)")
    warm = generate(args.warmup_cells, args.seed + 1)
    for gpus in counts:
        for dtype in args.dtypes:
            row, _ = run(warm, gpus, dtype, args.flavor)
            log(f"warm-up {gpus} GPU(s) {dtype}: {row['seconds']:.2f} s {row['error'] or ''}")
    del warm

    for cells in args.cells:
        start = time.perf_counter()
        data = generate(cells, args.seed)
        log(f"{cells:,} cells generated in {time.perf_counter() - start:.1f} s")
        for dtype in args.dtypes:
            reference = None
            for gpus in counts:
                fields, corrected = run(data, gpus, dtype, args.flavor)
                if gpus == 1:
                    reference = corrected
                    rel = 0.0 if corrected is not None else None
                elif corrected is not None and reference is not None:
                    rel = rel_frobenius(corrected, reference)
                else:
                    rel = None
                row = {
                    "gpus": gpus, "cells": cells, "dtype": dtype, "flavor": args.flavor,
                    "seconds": fields["seconds"], "peak_gpu_bytes": fields.get("peak_gpu_bytes"),
                    "rel_diff_vs_one_gpu": rel, "error": fields["error"],
                    **{k: v for k, v in fields.items() if k not in ("seconds", "error")},
                    "device": meta["device_name"], "date": meta["date"],
                }  # fmt: skip
                results = merge(path, meta, row)
                write_report(results, peers, args.out)
                peak = row["peak_gpu_bytes"]
                log(
                    f"{cells:,} cells, {dtype}, {gpus} GPU(s): {row['seconds']:.2f} s, peak "
                    f"{_fmt(peak / 2**30 if peak else None, '.1f')} GiB per GPU, rel. diff vs 1 "
                    f"GPU {_fmt(rel, '.1e')}{', ' + row['error'] if row['error'] else ''}"
                )
                del corrected
            del reference
        del data
        gc.collect()
    log(f"results in {path}, {args.out / 'multigpu.md'}, {args.out / 'multigpu.png'}")


if __name__ == "__main__":
    main()
