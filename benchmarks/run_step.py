"""End-to-end benchmark of ``harmony-step run``: each phase of the step against the floor.

Input: ``realistic_data.generate(cells, seed)`` (50 dimensions, 64 batches, 30 cell types) in
``obsm['X_pca']`` and ``obs``, plus a sparse counts matrix in ``X`` (CSR, float32 values and int32
column indices, ``--counts-gb`` on disk before compression; 2.2 GB by default, as a typical
million-cell file), written as one h5ad file.

The floor is what any step built on anndata must spend: ``anndata.read_h5ad`` plus ``write_h5ad``
of the same file (measured in this process, after the imports, with the file in the page cache as
it is for the runs) plus the Harmony compute (the step's own ``compute`` phase on that device).

For each device (``--device gpu cpu``) the command first runs once on a small file (20,000
cells), so that CuPy's kernel cache and numba's compiled kernels are on disk as they are on a
machine in use; then, for each output mode (the full copy and ``--embedding-only``), it runs
``--repeat`` times on the GPU and ``--cpu-repeat`` times on the CPU, a fresh process each time,
as in a workflow. The fastest run is reported with the seconds of each phase from the
``timings:`` line the step logs (read, compute, metrics, hash: the wait for the background hash,
write, total; hash_thread and copy_thread: the time of the threads that hash the input and copy
it to a full output while Harmony runs, overlapped) and its wall time. The metrics before
correction are computed on the same input and sample on both devices, so their largest
difference between the GPU and the CPU runs is reported too (it must stay below 1e-6).

Writes ``step.json`` and ``step.md`` (with the table for the README) into ``--out``; runs of the
same input made by an earlier call for other devices or modes are kept, so the devices can be run
in separate calls::

    python benchmarks/run_step.py                                   # 1M cells, GPU and CPU
    python benchmarks/run_step.py --device cpu --cells 100000 --counts-gb 0.22 --out /tmp/step
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from commands import commit, run_timed  # noqa: E402

N_GENES = 20_000
PHASES = ("read", "compute", "metrics", "hash", "write", "total")
THREADS = ("hash_thread", "copy_thread")
WARM_UP_CELLS = 20_000
_TIMINGS = re.compile(r"harmony-step: timings: (.*?); peak host memory (\d+) MiB")


def build_input(path: Path, n_cells: int, seed: int, counts_gb: float) -> dict:
    """Write the benchmark's h5ad file; returns what it holds."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    from realistic_data import generate

    small = generate(n_cells, seed=seed).to_anndata()
    per_cell = max(1, min(N_GENES, round(counts_gb * 1e9 / 8 / n_cells)))  # 4 + 4 bytes per entry
    stride = N_GENES // per_cell
    rng = np.random.default_rng(seed + 1)
    indices = np.empty(n_cells * per_cell, dtype=np.int32)
    data = np.empty(n_cells * per_cell, dtype=np.float32)
    offsets = (np.arange(per_cell, dtype=np.int32) * stride)[None, :]
    rows = 1 << 16
    for start in range(0, n_cells, rows):
        stop = min(n_cells, start + rows)
        block = slice(start * per_cell, stop * per_cell)
        # one gene per stride window: distinct and sorted within each cell, as CSR requires
        jitter = rng.integers(0, stride, size=(stop - start, per_cell), dtype=np.int32)
        indices[block] = (offsets + jitter).ravel()
        data[block] = rng.integers(1, 30, size=(stop - start) * per_cell).astype(np.float32)
    indptr = np.arange(0, n_cells * per_cell + 1, per_cell, dtype=np.int64)
    adata = ad.AnnData(
        X=sp.csr_matrix((data, indices, indptr), shape=(n_cells, N_GENES)),
        obs=small.obs,
        var=pd.DataFrame(index=[f"gene{j}" for j in range(N_GENES)]),
        obsm=dict(small.obsm),
    )
    adata.write_h5ad(path)
    return {
        "cells": n_cells,
        "genes": N_GENES,
        "counts_per_cell": per_cell,
        "x_bytes": int(data.nbytes + indices.nbytes + indptr.nbytes),
        "file_bytes": path.stat().st_size,
    }


def floor_io(path: Path, folder: Path) -> dict[str, float]:
    """Seconds of anndata's read and write of the whole file (imports excluded)."""
    import anndata as ad

    start = time.perf_counter()
    adata = ad.read_h5ad(path)
    read = time.perf_counter() - start
    copy = folder / "floor_copy.h5ad"
    start = time.perf_counter()
    adata.write_h5ad(copy)
    write = time.perf_counter() - start
    copy.unlink()
    return {"read": read, "write": write}


def run_command(
    path: Path, folder: Path, device: str, embedding_only: bool, metrics_cells: int | None = None
) -> dict:
    """One ``harmony-step run`` in a fresh process; its phases, wall time and log.
    ``metrics_cells`` is passed as ``--metrics-cells`` (None: the command's default)."""
    output = folder / f"out-{device}.h5ad"
    command = [
        sys.executable, "-m", "harmony_step", "run", "--input", str(path),
        "--output", str(output), "--key", "batch", "--label-key", "cell_type",
        "--summary", str(folder / f"summary-{device}.json"),
        "--convergence", str(folder / f"convergence-{device}.tsv"), "--device", device,
    ]  # fmt: skip
    if embedding_only:
        command.append("--embedding-only")
    if metrics_cells is not None:
        command += ["--metrics-cells", str(metrics_cells)]
    done, wall = run_timed(command)
    match = _TIMINGS.search(done.stderr)
    if match is None:
        raise RuntimeError(f"no timings line in the log:\n{done.stderr}")
    phases = {name: float(value) for name, value in re.findall(r"(\w+) ([\d.e+-]+) s", match[1])}
    summary = json.loads((folder / f"summary-{device}.json").read_text())
    output_bytes = output.stat().st_size
    output.unlink()
    return {
        "phases": phases,
        "wall_s": wall,
        "peak_host_mib": int(match[2]),
        "output_bytes": output_bytes,
        "rounds": summary.get("n_rounds"),
        "metrics_cells": _metrics_cells(summary),
        "converged": summary.get("converged"),
        "metrics": summary.get("metrics"),
        "log": done.stderr.replace(str(folder), "<workdir>").splitlines(),
    }


def _metrics_cells(summary: dict) -> int | None:
    """The metrics' sample size of a run (0 where they were skipped; None in older summaries)."""
    settings = summary.get("metrics", {}).get("settings", {})
    return 0 if "skipped" in settings else settings.get("sample_size")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("anndata", "h5py", "numpy", "scikit-learn", "cupy-cuda12x", "cupy-cuda13x"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


def _gpu_name() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def markdown(result: dict) -> str:
    info = result["input"]
    floor_io_s = result["floor_io"]["read"] + result["floor_io"]["write"]
    repeats = ", ".join(f"{device} {n}" for device, n in result["repeat"].items())
    lines = [
        "# `harmony-step run` end to end, phase by phase",
        "",
        f"{info['cells']:,} cells x 50 PCs, X: CSR counts {info['x_bytes'] / 1e9:.2f} GB "
        f"({info['counts_per_cell']} per cell), file {info['file_bytes'] / 1e9:.2f} GB. "
        f"Host: {result['host']['cpus']} CPUs"
        + (f", {result['host']['gpu']}" if result["host"].get("gpu") else "")
        + f"; {result['date']} (commit {result.get('commit', 'not recorded')}).",
        "",
        f"anndata read + write of the whole file: {result['floor_io']['read']:.2f} s + "
        f"{result['floor_io']['write']:.2f} s. Floor = that + the Harmony compute on the device. "
        f"Fastest of {repeats} run(s) after a warm-up run; seconds from the step's `timings:` log "
        "line (hash: the wait for the background hash).",
        "",
        "README table:",
        "",
        "| device | output | read | compute | metrics | hash (waited) | write | total | floor "
        "| total / floor | metrics share | metrics cells |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["runs"]:
        p = row["phases"]
        floor = floor_io_s + p["compute"]
        cells = [f"{p.get(name, 0.0):.2f}" for name in PHASES]
        lines.append(
            f"| {row['device']} | {row['mode']} | "
            + " | ".join(cells)
            + f" | {floor:.2f} | {p['total'] / floor:.2f}x "
            f"| {100 * p['metrics'] / p['total']:.1f} % | {row.get('metrics_cells', '-')} |"
        )
    lines += [
        "",
        "Overlapped threads (seconds of their own), wall time of the process and its peak memory:",
        "",
        "| device | output | hash thread | copy thread | wall | peak host MiB | totals of all runs |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in result["runs"]:
        p = row["phases"]
        threads = " | ".join(f"{p[name]:.2f}" if name in p else "-" for name in THREADS)
        totals = ", ".join(f"{t:.2f}" for t in row["all_totals"])
        lines.append(
            f"| {row['device']} | {row['mode']} | {threads} | {row['wall_s']:.2f} "
            f"| {row['peak_host_mib']} | {totals} |"
        )
    agreement = before_metrics_agreement(result["runs"])
    if agreement is not None:
        lines += [
            "",
            "Metrics before correction (same input, same sample), GPU against CPU: largest "
            f"difference {agreement:.1e}.",
        ]
    return "\n".join(lines) + "\n"


def before_metrics_agreement(runs: list[dict]) -> float | None:
    """Largest difference between the GPU's and the CPU's metrics of the uncorrected embedding."""
    by_device: dict[str, dict] = {}
    for run in runs:  # merged runs share the input and the metrics' sample size (_merged_runs)
        if run.get("metrics") and run["metrics"].get("before"):
            by_device.setdefault(run["device"], run["metrics"]["before"])
    if not {"gpu", "cpu"} <= set(by_device):
        return None
    gpu, cpu = by_device["gpu"], by_device["cpu"]
    differences = [abs(gpu[name] - cpu[name]) for name in gpu if gpu[name] is not None]
    return max(differences) if differences else None


def _merged_runs(path: Path, result: dict) -> list[dict]:
    """This call's runs plus the earlier ones in ``path`` for other (device, mode) pairs on the
    same input with the same metrics sample, so the devices can be run in separate calls."""
    if not path.is_file():
        return result["runs"]
    earlier = json.loads(path.read_text())
    if earlier.get("input") != result["input"]:
        return result["runs"]
    done = {(run["device"], run["mode"]) for run in result["runs"]}
    cells = {run.get("metrics_cells") for run in result["runs"]}
    kept = [
        run
        for run in earlier.get("runs", [])
        if (run["device"], run["mode"]) not in done and run.get("metrics_cells") in cells
    ]
    return sorted(kept + result["runs"], key=lambda run: (run["device"] != "gpu", run["mode"]))


def save(result: dict, out: Path) -> str:
    """Write ``step.json`` and ``step.md`` into ``out`` (with the earlier runs of other devices
    and modes on the same input); returns the markdown."""
    earlier = out / "step.json"
    if earlier.is_file():
        before = json.loads(earlier.read_text())
        if before.get("input") == result["input"] and isinstance(before.get("repeat"), dict):
            result["repeat"] = {**before["repeat"], **result["repeat"]}
    result["runs"] = _merged_runs(earlier, result)
    (out / "step.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (out / "step.md").write_text(text)
    return text


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--device", nargs="+", choices=["gpu", "cpu"], default=["gpu", "cpu"])
    parser.add_argument("--modes", nargs="+", choices=["full", "embedding-only"],
                        default=["full", "embedding-only"])  # fmt: skip
    parser.add_argument("--counts-gb", type=float, default=2.2, help="size of X's CSR arrays")
    parser.add_argument("--repeat", type=int, default=2, help="runs per mode on the GPU")
    parser.add_argument("--cpu-repeat", type=int, default=1, help="runs per mode on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metrics-cells", type=_count, default=None,
                        help="the command's --metrics-cells (default: its own default)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the input and outputs (default: a temporary folder)")  # fmt: skip
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    repeat = {"gpu": args.repeat, "cpu": args.cpu_repeat}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="harmony-step-bench.") as tmp:
        folder = Path(tmp)
        path = folder / "input.h5ad"
        start = time.perf_counter()
        info = build_input(path, args.cells, args.seed, args.counts_gb)
        print(f"built {path} ({info['file_bytes'] / 1e9:.2f} GB) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
        floor = floor_io(path, folder)
        print(f"anndata read {floor['read']:.2f} s, write {floor['write']:.2f} s", flush=True)
        warm_up_path = folder / "warm-up.h5ad"
        build_input(warm_up_path, WARM_UP_CELLS, args.seed, 0.01)
        base = {
            "date": datetime.date.today().isoformat(),
            "commit": commit(),
            "host": {
                "cpus": os.cpu_count(),
                "gpu": _gpu_name(),
                "platform": platform.platform(),
            },
            "versions": _versions(),
            "input": info,
            "repeat": {},
            "floor_io": floor,
        }
        runs: list[dict] = []
        for device in args.device:
            start = time.perf_counter()
            run_command(warm_up_path, folder, device, embedding_only=True)
            print(f"{device} warm-up run: {time.perf_counter() - start:.0f} s", flush=True)
            for mode in args.modes:
                tries = [
                    run_command(path, folder, device, mode == "embedding-only", args.metrics_cells)
                    for _ in range(repeat[device])
                ]
                best = min(tries, key=lambda run: run["phases"]["total"])
                best.update(
                    device=device, mode=mode, all_totals=[t["phases"]["total"] for t in tries]
                )
                runs.append(best)
                print(f"{device} {mode}: {best['phases']}", flush=True)
                base["repeat"][device] = repeat[device]
                # written after each mode, so that a call cut short keeps what it finished
                text = save({**base, "runs": list(runs)}, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
