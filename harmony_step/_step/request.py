"""What one run of the step is asked to do: the files to read and write and the options."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from harmony_step._step.metrics import SAMPLE_SIZE


def _path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)


@dataclasses.dataclass(frozen=True)
class StepRequest:
    """The files and options of one run; the Harmony parameters travel separately, checked.

    Parameters
    ----------
    input
        The h5ad file to read (never modified).
    output
        The h5ad file to write: a copy of ``input`` with the result added, or only the result
        with ``embedding_only``.
    keys
        ``obs`` columns with the batch of each cell, one per batch variable.
    label_key
        Optional ``obs`` column with cell types, for the label metrics.
    convergence, summary, plot
        Optional report files: convergence table (TSV), run summary (JSON), plot (PNG).
    embedding_only
        Write only ``obs`` (index and key columns), ``obsm`` (basis and adjusted basis) and
        ``uns['harmony']`` instead of a copy of the input.
    metrics_cells
        Most cells the integration metrics use (larger inputs are subsampled); 0 skips them.
    threads
        CPU threads of the CPU backend and the metrics; ``None``: the CPUs the process may use
        (``harmony_step._threads.available_cpus``).
    command
        The command line that asked for the run, recorded in the summary.
    """

    input: Path
    output: Path
    keys: tuple[str, ...]
    label_key: str | None = None
    convergence: Path | None = None
    summary: Path | None = None
    plot: Path | None = None
    embedding_only: bool = False
    metrics_cells: int = SAMPLE_SIZE
    threads: int | None = None
    command: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("input", "output", "convergence", "summary", "plot"):
            object.__setattr__(self, name, _path(getattr(self, name)))
        object.__setattr__(self, "keys", tuple(self.keys))
        object.__setattr__(self, "command", tuple(self.command))
        if self.metrics_cells < 0:
            raise ValueError(f"--metrics-cells must be >= 0. Got {self.metrics_cells} instead.")
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise ValueError(f"--threads must be >= 1. Got {self.threads} instead.")

    def outputs(self) -> dict[str, Path]:
        """Every file the run writes, by role, in the order they are written."""
        roles = {
            "output": self.output,
            "convergence table": self.convergence,
            "plot": self.plot,
            "summary": self.summary,
        }
        return {role: path for role, path in roles.items() if path is not None}

    @property
    def columns(self) -> list[str]:
        """The ``obs`` columns to read: the keys, then the label column."""
        return [*self.keys, *([self.label_key] if self.label_key else [])]
