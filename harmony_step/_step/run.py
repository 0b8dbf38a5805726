"""One run of the step: check the paths, read, integrate, measure, hash, write atomically.

Two threads work beside the run: one hashes the input for the summary, and, for a full output,
one copies the input into the output's temporary file while Harmony computes, so that writing is
left with adding the results to the copy.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from harmony_step._errors import Terminated
from harmony_step._integrate import integrate
from harmony_step._params import HarmonyParams
from harmony_step._provenance import format_seconds
from harmony_step._step.files import (
    REPORT_BYTES_ESTIMATE,
    StagedOutputs,
    add_results,
    check_free_space,
    check_paths,
    copy_input,
    estimated_h5ad_bytes,
    interruptions_deferred,
    read_harmony_inputs,
    sha256_file,
    write_small_h5ad,
    write_text,
)
from harmony_step._step.progress import PROGRESS_LOGGER
from harmony_step._step.request import StepRequest
from harmony_step._threads import available_cpus, cpu_threads
from harmony_step._version import __version__

progress_log = logging.getLogger(PROGRESS_LOGGER)


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """How a run ended: convergence, rounds, and wall time per phase in seconds.

    ``objective_rose_last_round``: the last round raised the objective; with ``converged``, the
    loop stopped on that rise rather than on a settled objective.
    """

    converged: bool
    n_rounds: int
    seconds: dict[str, float]
    objective_rose_last_round: bool = False


@contextmanager
def _phase(seconds: dict[str, float], name: str, started: float | None = None) -> Iterator[None]:
    """Time the block into ``seconds[name]``; log its start and end (one line each in a log file).

    The start record carries ``harmony_phase`` (the progress bar shows the phase; a log leaves it
    out); the end line, written when the phase succeeds, gives the phase's seconds and, with
    ``started``, the time since the run began.
    """
    start = time.perf_counter()
    progress_log.info(name, extra={"harmony_phase": name})
    try:
        yield
    finally:
        end = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + end - start
    since = "" if started is None else f" (elapsed {end - started:.1f} s)"
    progress_log.info(f"{name}: {end - start:.2f} s{since}", extra={"harmony_phase_done": name})


class _Background:
    """``work(*args)`` run on a thread while the run goes on; :meth:`result` waits for it.

    :attr:`seconds` is the time the thread took, and :attr:`waited` the time :meth:`result`
    blocked; an error of the thread is raised by :meth:`result`.
    """

    def __init__(self, work: Callable[..., Any], *args: Any, name: str) -> None:
        self.seconds = 0.0
        self.waited = 0.0
        self._value: Any = None
        self._error: BaseException | None = None
        # Waited on instead of Thread.join: a join interrupted by a signal's exception can leave
        # the thread marked as finished while it still runs (CPython 3.11, 3.12).
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(work, args), name=f"harmony-step-{name}", daemon=True
        )
        self._thread.start()

    def _run(self, work: Callable[..., Any], args: tuple[Any, ...]) -> None:
        start = time.perf_counter()
        try:
            self._value = work(*args)
        except BaseException as err:  # re-raised in the caller's thread
            self._error = err
        finally:
            self.seconds = time.perf_counter() - start
            self._done.set()

    def join(self) -> None:
        """Wait for the thread without raising its error."""
        self._done.wait()

    def result(self) -> Any:
        start = time.perf_counter()
        self._done.wait()
        self.waited = time.perf_counter() - start
        if self._error is not None:
            raise self._error
        return self._value


class _BackgroundHash(_Background):
    """SHA-256 of a file computed on a thread; hashlib releases the GIL while it digests, so the
    hash overlaps the read, the compute and the metrics."""

    def __init__(self, path: Path) -> None:
        super().__init__(sha256_file, path, name="hash")

    def result(self) -> str:
        digest = super().result()
        assert isinstance(digest, str)
        return digest


def _peak_host_mib() -> int:
    """High-water mark of this process's resident memory in MiB (ru_maxrss is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_step(
    request: StepRequest, params: HarmonyParams, *, started: float | None = None
) -> StepOutcome:
    """Carry out one run; every output appears together at the end, or none does.

    Parameters
    ----------
    request
        The files and options.
    params
        The checked Harmony parameters (:meth:`HarmonyParams.resolve`); not checked again.
    started
        ``time.perf_counter()`` when the run was asked for, so that the logged total time includes
        the start-up (default: now).

    Raises
    ------
    FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError
        The input is missing or an output cannot be written (before any work).
    OSError
        ``ENOSPC`` when the outputs' file systems lack the estimated space (before the compute);
        :class:`~harmony_step._step.files.OutputWriteError`, naming the output, when a write fails.
    MissingBasisError, MissingColumnError
        The basis or a column is not in the input (each a ``KeyError`` and a ``ValueError``).
    ValueError
        A malformed input (:class:`~harmony_step._step.files.H5adError`), missing labels, or what
        :func:`harmony_step.harmony_integrate` rejects.
    """
    started = time.perf_counter() if started is None else started
    seconds: dict[str, float] = {}
    check_paths(request.input, request.outputs())
    if params.n_gpus > 1:  # before reading, which takes minutes for the inputs that need it
        from harmony_step._distributed import check_set_up

        check_set_up(params.n_gpus)
    # The input's hash is needed only for the summary; it is computed alongside everything else.
    input_hash = _BackgroundHash(request.input) if request.summary else None
    with _phase(seconds, "read", started):
        adata = read_harmony_inputs(
            request.input, params.basis, request.columns, cell_names=request.embedding_only
        )
    _check_labels(adata, request.label_key)
    _check_free_space(request, adata, params)
    before = adata.obsm[params.basis]
    threads = request.threads or available_cpus()
    staged = StagedOutputs()
    copy, stop_copy = None, threading.Event()
    try:
        if not request.embedding_only:  # the input's bytes go to the output while Harmony runs
            # Held back until ``copy`` is set, so a SIGTERM here still waits for the thread before
            # removing its file (a thread left running would create the file again).
            with interruptions_deferred():
                copy = _Background(
                    copy_input, request.input, staged.temporary(request.output), stop_copy,
                    name="copy",
                )  # fmt: skip
        with _phase(seconds, "compute", started), cpu_threads(threads):
            integrate(adata, request.keys, params)
        harmony = adata.uns["harmony"]
        with _phase(seconds, "metrics", started), threadpool_limits(threads):
            harmony["metrics"] = _integration_metrics(
                request, adata, before, params, harmony, threads
            )
        with _phase(seconds, "hash", started):  # the wait for the background hash, if any
            input_sha256 = input_hash.result() if input_hash is not None else ""
    except BaseException:
        with interruptions_deferred():  # a second SIGTERM must not cut the clean-up short
            if copy is not None:
                stop_copy.set()  # it ends within one step of the copy
                copy.join()  # no thread may write a temporary file while it is removed
            staged.discard()
        raise
    if input_hash is not None:
        seconds["hash_thread"] = input_hash.seconds
    try:
        _write_outputs(
            staged, request, adata, params, copy, stop_copy, input_sha256, seconds, started
        )  # fmt: skip
        return _report_outcome(request, harmony, seconds, copy, started)
    except (Terminated, KeyboardInterrupt) as stop:
        stop.outputs_written = staged.committed  # for the command's last line
        raise


def _write_outputs(
    staged: StagedOutputs,
    request: StepRequest,
    adata: Any,
    params: HarmonyParams,
    copy: _Background | None,
    stop_copy: threading.Event,
    input_sha256: str,
    seconds: dict[str, float],
    started: float,
) -> None:
    """Every output into its temporary file, then all of them into place together."""
    harmony = adata.uns["harmony"]
    with staged:
        try:
            with _phase(seconds, "write", started):
                _write_h5ad(staged, request, adata, params, copy)
                _write_reports(staged, request, harmony)
                if request.summary:
                    _write_summary(staged, request, adata, params, input_sha256)
        except BaseException:
            stop_copy.set()  # a copy still running ends within one step
            raise
        finally:
            if copy is not None:
                with interruptions_deferred():  # the wait must end before the file is removed
                    copy.join()
        staged.commit()


def _report_outcome(
    request: StepRequest,
    harmony: Mapping[str, Any],
    seconds: dict[str, float],
    copy: _Background | None,
    started: float,
) -> StepOutcome:
    """Log the timings and the outcome (the log only: the files stay byte-identical across
    reruns)."""
    if copy is not None:
        seconds["copy_thread"] = copy.seconds
    seconds["total"] = time.perf_counter() - started
    progress_log.info(
        f"timings: {format_seconds(seconds)}; peak host memory {_peak_host_mib()} MiB"
    )
    outcome = StepOutcome(
        bool(harmony["converged"]),
        int(harmony["n_rounds"]),
        seconds,
        bool(harmony["objective_rose_last_round"]),
    )
    state = "converged" if outcome.converged else "did not converge"
    if outcome.objective_rose_last_round:
        state += " (the objective rose in the last round)"
    progress_log.info(
        f"done: {state} after {outcome.n_rounds} round(s) in {seconds['total']:.1f} s; "
        f"wrote {request.output}"
    )
    return outcome


def _check_labels(adata: Any, label_key: str | None) -> None:
    if label_key is None:
        return
    missing = int(adata.obs[label_key].isna().sum())
    if missing:
        raise ValueError(
            f"Label key {label_key!r} has {missing} missing value(s); fill them or drop those cells, "
            "or leave out --label-key."
        )


def _check_free_space(request: StepRequest, adata: Any, params: HarmonyParams) -> None:
    """Refuse to start when the outputs will not fit (see :func:`~harmony_step._step.files.check_free_space`)."""
    basis = adata.obsm[params.basis]
    n_cells, n_pcs = basis.shape
    needs: dict[Path, int] = {path: REPORT_BYTES_ESTIMATE for path in request.outputs().values()}
    needs[request.output] = estimated_h5ad_bytes(
        request.input, n_cells, n_pcs, params.numpy_dtype.itemsize,
        embedding_only=request.embedding_only, basis_itemsize=basis.dtype.itemsize,
    )  # fmt: skip
    check_free_space(needs)


def _integration_metrics(
    request: StepRequest,
    adata: Any,
    before: Any,
    params: HarmonyParams,
    harmony: Mapping[str, Any],
    threads: int,
) -> dict[str, Any]:
    """Metrics before and after correction; empty before/after when metrics_cells is 0."""
    from harmony_step._step.metrics import metrics_before_after

    if request.metrics_cells == 0:
        return {"before": {}, "after": {}, "settings": {"skipped": "--metrics-cells 0"}}
    batch_key = request.keys[0]
    xp = _metrics_namespace(harmony)
    return metrics_before_after(
        before,
        adata.obsm[params.adjusted_basis],
        adata.obs[batch_key],
        adata.obs[request.label_key] if request.label_key else None,
        batch_key=batch_key,
        label_key=request.label_key,
        seed=int(harmony["resolved"]["random_state"]),
        sample_size=request.metrics_cells,
        xp=xp,
        threads=threads,
    )


def _metrics_namespace(harmony: Mapping[str, Any]) -> Any:
    """CuPy when the run used the GPU (the metrics then run there too), else NumPy."""
    import numpy as np

    if harmony["resolved"].get("device") != "gpu":
        return np
    import cupy

    return cupy


def _write_h5ad(
    staged: StagedOutputs,
    request: StepRequest,
    adata: Any,
    params: HarmonyParams,
    copy: _Background | None,
) -> None:
    """The output h5ad: only the results, or the results added to the copy of the input."""
    if copy is None:
        write_small_h5ad(staged.temporary(request.output), adata)
        return
    adjusted = params.adjusted_basis
    target = copy.result()  # the copy made while Harmony ran; a failed copy raises here
    add_results(target, {adjusted: adata.obsm[adjusted]}, {"harmony": adata.uns["harmony"]})


def _write_reports(staged: StagedOutputs, request: StepRequest, harmony: Mapping[str, Any]) -> None:
    from harmony_step._step.reports import convergence_tsv, plot_convergence

    if request.convergence:
        write_text(staged.temporary(request.convergence), convergence_tsv(harmony))
    if request.plot:
        plot_convergence(harmony, staged.temporary(request.plot))


def _write_summary(
    staged: StagedOutputs,
    request: StepRequest,
    adata: Any,
    params: HarmonyParams,
    input_sha256: str,
) -> None:
    from harmony_step._step.reports import build_summary, summary_json

    assert request.summary is not None
    harmony = adata.uns["harmony"]
    summary = build_summary(
        harmony,
        parameters=params.to_dict(),
        metrics=harmony["metrics"],
        input_sha256=input_sha256,
        extra={
            "harmony_step_version": __version__,
            "command": list(request.command),
            "input": str(request.input),
            "output": str(request.output),
            "embedding_only": bool(request.embedding_only),
            "keys": list(request.keys),
            "label_key": request.label_key,
            "n_cells": int(adata.n_obs),
            "n_pcs": int(adata.obsm[params.basis].shape[1]),
        },
    )
    write_text(staged.temporary(request.summary), summary_json(summary))
