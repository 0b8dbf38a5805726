"""Run reports: the convergence table (TSV), the run summary (JSON) and the convergence plot (PNG).

Everything here reads the ``uns['harmony']`` block of a run (layout in
:mod:`harmony_step._provenance`) and returns text or draws into a file; :mod:`harmony_step._step.run`
decides where the files go and writes them atomically.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

CONVERGENCE_COLUMNS = (
    "round",
    "iteration",
    "objective",
    "kmeans",
    "entropy",
    "diversity",
)
"""Columns of the convergence table, one row per clustering iteration (round 0 = initialisation).

No timings: the table depends only on the input, parameters, seed and machine, so reruns write
the same bytes."""

OBJECTIVE_PARTS = ("kmeans", "entropy", "diversity")


# --- convergence table ---------------------------------------------------------------------------


def convergence_tsv(harmony_uns: Mapping[str, Any]) -> str:
    """The per-iteration convergence history as tab-separated text with a header line.

    Floats are written with ``repr`` (the shortest text that reads back to the same double).
    """
    table = harmony_uns["iterations"]
    columns = [np.asarray(table[name]) for name in CONVERGENCE_COLUMNS]
    lines = ["\t".join(CONVERGENCE_COLUMNS)]
    for row in zip(*columns, strict=True):
        lines.append("\t".join(_cell(value) for value in row))
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, np.integer | int):
        return str(int(value))
    return repr(float(value))


# --- summary -------------------------------------------------------------------------------------


def container_kind() -> str:
    """``"apptainer"``, ``"docker"`` (any OCI runtime: Docker, podman) or ``"none"``."""
    if os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"):
        return "apptainer"
    if Path("/.singularity.d").is_dir():
        return "apptainer"
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists():
        return "docker"
    return "none"


def environment() -> dict[str, str]:
    """Where the run happened: container kind, image name (``HARMONY_STEP_IMAGE``) and host name."""
    return {
        "container": container_kind(),
        "image": os.environ.get("HARMONY_STEP_IMAGE") or "none",
        "hostname": socket.gethostname(),
    }


def build_summary(
    harmony_uns: Mapping[str, Any],
    *,
    parameters: Mapping[str, Any],
    metrics: Mapping[str, Any],
    input_sha256: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run summary: convergence, parameters, device, versions, metrics, environment.

    It holds no timings (the step logs them), so reruns write the same bytes.

    Parameters
    ----------
    harmony_uns
        ``adata.uns['harmony']`` of the run.
    parameters
        The parameters used, after defaults, ``--params`` and flags were merged.
    metrics
        Integration metrics ``{"before": ..., "after": ..., "settings": ...}``.
    input_sha256
        Hex SHA-256 of the input file.
    extra
        Further top-level fields (paths, keys, the command line).
    """
    resolved = harmony_uns["resolved"]
    rounds = harmony_uns["rounds"]
    objective = np.asarray(harmony_uns["iterations"]["objective"])
    summary = {
        "converged": bool(harmony_uns["converged"]),
        "objective_rose_last_round": bool(harmony_uns.get("objective_rose_last_round", False)),
        "n_rounds": int(harmony_uns["n_rounds"]),
        # per outer round, without the initialisation record (round 0)
        "inner_iterations": [
            int(n)
            for r, n in zip(rounds["round"], rounds["inner_iterations"], strict=True)
            if int(r) > 0
        ],
        "final_objective": float(objective[-1]) if objective.size else None,
        "parameters": _plain(parameters),
        "resolved": _plain(resolved),
        "device": {
            "kind": str(resolved["device"]),
            "name": str(resolved["device_name"]),
            "reason": resolved.get("device_reason"),
        },
        "versions": _plain(harmony_uns["versions"]),
        "input_sha256": input_sha256,
        "peak_gpu_memory_bytes": int(harmony_uns["peak_gpu_memory_bytes"]),
        "metrics": _plain(metrics),
        "environment": environment(),
    }
    summary.update(_plain(extra or {}))
    return summary


def _plain(value: Any) -> Any:
    """JSON-ready copy: NumPy scalars and arrays become Python values, NaN becomes null."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary_json(summary: Mapping[str, Any]) -> str:
    """Indented JSON text; refuses NaN so the file stays standard JSON."""
    return json.dumps(_plain(summary), indent=2, allow_nan=False) + "\n"


# --- plot ----------------------------------------------------------------------------------------


def plot_convergence(
    harmony_uns: Mapping[str, Any], target: str | os.PathLike[str], *, title: str | None = None
) -> None:
    """Draw the objective per clustering iteration and its three parts into a PNG file.

    The top panel shows the objective with dotted lines where a new outer round starts, labelled
    with the round number wherever the labels fit side by side; the bottom panel its k-means,
    entropy and diversity parts. ``title`` replaces the default title (rounds and convergence).
    Uses the Agg canvas directly, so no display or global pyplot state is involved.
    """
    convergence_figure(harmony_uns, title=title).savefig(target, format="png")


def convergence_figure(harmony_uns: Mapping[str, Any], *, title: str | None = None) -> Any:
    """The Matplotlib figure of :func:`plot_convergence`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = harmony_uns["iterations"]
    step = np.arange(len(np.asarray(table["objective"])))
    rounds = np.asarray(table["round"])
    figure = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    top.plot(step, table["objective"], marker=".", color="black")
    top.set_ylabel("objective")
    top.set_title(title if title is not None else _title(harmony_uns))
    for part in OBJECTIVE_PARTS:
        bottom.plot(step, table[part], marker=".", label=part)
    bottom.set_ylabel("objective part")
    bottom.set_xlabel("clustering iteration (all rounds)")
    bottom.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small", frameon=False)
    starts = step[1:][np.diff(rounds) != 0]
    for axes in (top, bottom):
        for start in starts:
            axes.axvline(start - 0.5, color="grey", linestyle=":", linewidth=0.8)
    labels = [
        top.annotate(
            f"r{int(number)}",
            (start - 0.5, 0.98),
            xycoords=("data", "axes fraction"),
            xytext=(2, 0),
            textcoords="offset points",
            fontsize="x-small",
            color="grey",
            va="top",
        )
        for start, number in zip(starts, rounds[1:][np.diff(rounds) != 0], strict=True)
    ]
    _drop_overlapping(figure, labels)
    return figure


def _drop_overlapping(figure: Any, labels: list[Any]) -> None:
    """Hide each round label that would overlap the last one kept (short rounds sit close)."""
    if not labels:
        return
    figure.draw_without_rendering()  # final layout, so that the extents are those of the file
    renderer = figure.canvas.get_renderer()
    kept = None
    for label in labels:
        extent = label.get_window_extent(renderer)
        if kept is not None and extent.x0 < kept.x1 + 2:
            label.set_visible(False)
        else:
            kept = extent


def _title(harmony_uns: Mapping[str, Any]) -> str:
    converged = "converged" if bool(harmony_uns["converged"]) else "not converged"
    if bool(harmony_uns.get("objective_rose_last_round", False)):
        converged += " (objective rose in the last round)"
    return f"Harmony: {int(harmony_uns['n_rounds'])} rounds, {converged}"
