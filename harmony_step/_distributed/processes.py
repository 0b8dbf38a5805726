"""The worker processes of a run on one machine: started by rank 0, watched from a thread.

Every worker is its own OS process, started with ``subprocess`` (``python -m
harmony_step._distributed.worker``): the rendezvous of ``cupyx.distributed`` cannot be handed to
``multiprocessing`` children (its TCP store does not pickle), and a fresh process holds no CUDA
state of its parent.

Failure handling, both ways:

* A worker that exits before rank 0 expects it (a crash, an exception, ``kill -9``, the
  out-of-memory killer) is seen by a watcher thread within :data:`_POLL_S` seconds. The thread
  records a :class:`~harmony_step._errors.WorkerFailedError` naming the rank, its exit status and
  its last error lines, calls the failure callback (rank 0 aborts its NCCL communicator there, so
  a collective waiting for the dead peer returns) and stops the other workers.
* Each worker's stdin is a pipe that rank 0 never writes to. When rank 0's process ends, however
  it ends, the pipe closes and the worker exits (:func:`exit_when_closed`), so no worker outlives
  rank 0 and none waits for it forever.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import IO

from harmony_step._errors import WorkerFailedError

WORKER_MODULE = "harmony_step._distributed.worker"
ERROR_MARK = "harmony-step worker error: "
"""Start of the last line a worker writes on stderr when it fails with an exception:
``ERROR_MARK + "TypeName: message"``."""
TAIL_LINES = 20
_POLL_S = 0.05
_STOP_GRACE_S = 5.0

progress_log = logging.getLogger("harmony_step.progress")


def worker_command(rank: int, size: int, host: str, port: int, timeout: float) -> list[str]:
    """The command line of the worker of ``rank`` on this machine (GPU ``rank``)."""
    return [
        sys.executable, "-m", WORKER_MODULE, "--rank", str(rank), "--size", str(size),
        "--host", host, "--port", str(port), "--device", str(rank), "--timeout", f"{timeout:g}",
        "--watch-stdin",
    ]  # fmt: skip


def exit_when_closed(stream: IO[bytes], leave: Callable[[], None]) -> threading.Thread:
    """Call ``leave`` (which should end the process) once ``stream`` reaches its end; a thread."""

    def watch() -> None:
        try:
            while stream.read(4096):
                pass
        except (OSError, ValueError):
            pass
        leave()

    thread = threading.Thread(target=watch, name="harmony-step-leader-watch", daemon=True)
    thread.start()
    return thread


def describe_exit(rank: int, pid: int, returncode: int, tail: Sequence[str]) -> WorkerFailedError:
    """The error that a worker's early exit becomes on rank 0."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        how = f"was killed by signal {-returncode} ({name})"
        if -returncode == signal.SIGKILL:
            how += " (sent by a user, the scheduler, or the system's out-of-memory killer)"
    else:
        how = f"exited with status {returncode}"
    reported = [line for line in tail if line.startswith(ERROR_MARK)]
    error_type = None
    if reported:
        error = reported[-1][len(ERROR_MARK) :]
        error_type = error.partition(":")[0].strip() or None
        text = f"GPU rank {rank} (process {pid}) {how} after an error: {error}"
    else:
        text = f"GPU rank {rank} (process {pid}) {how} during the run"
        lines = [line.strip() for line in tail if line.strip()][-3:]
        if lines:
            text += f"; its last error output: {' | '.join(lines)}"
    return WorkerFailedError(
        text + ". The run was stopped on every GPU.",
        rank=rank,
        returncode=returncode,
        error_type=error_type,
        stderr_tail="\n".join(tail),
    )


class _Worker:
    def __init__(self, rank: int, process: subprocess.Popen) -> None:
        self.rank = rank
        self.process = process
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.reader = threading.Thread(
            target=self._read, name=f"harmony-step-worker-{rank}-stderr", daemon=True
        )
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            self.tail.append(raw.decode("utf-8", errors="replace").rstrip())


class WorkerProcesses:
    """Worker processes by rank, with the watcher thread (see the module documentation).

    Use as a context manager: leaving it stops every worker still running.
    """

    def __init__(self, commands: Mapping[int, Sequence[str]], env: Mapping[str, str]) -> None:
        self._lock = threading.Lock()
        self._failure: WorkerFailedError | None = None
        self._failed = threading.Event()
        self._on_failure: Callable[[], None] | None = None
        self._expect_exit = False
        self._stopped = threading.Event()
        self._workers: list[_Worker] = []
        try:
            for rank, command in sorted(commands.items()):
                process = subprocess.Popen(
                    list(command),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env=dict(env),
                )
                self._workers.append(_Worker(rank, process))
        except BaseException:
            self.stop()
            raise
        self._watcher = threading.Thread(
            target=self._watch, name="harmony-step-worker-watch", daemon=True
        )
        self._watcher.start()

    def __enter__(self) -> WorkerProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pids(self) -> dict[int, int]:
        return {worker.rank: worker.process.pid for worker in self._workers}

    def failure(self) -> WorkerFailedError | None:
        """The first worker failure seen, or None."""
        return self._failure

    def wait_for_failure(self, seconds: float) -> WorkerFailedError | None:
        """The first worker failure, waiting up to ``seconds`` for the watcher to see one."""
        self._failed.wait(seconds)
        return self._failure

    def on_failure(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once, from the watcher thread) when a worker fails; at once if one
        already has."""
        with self._lock:
            self._on_failure = callback
            failed = self._failure is not None
        if failed:
            callback()

    def expect_exit(self) -> None:
        """From now on a worker's exit is the end of its part, not a failure."""
        self._expect_exit = True

    def finish(self, timeout: float) -> None:
        """Wait for the workers to exit after a complete run; stop any that do not in time.

        A worker that exits with an error now has already delivered its rows: it is logged, not
        raised.
        """
        self.expect_exit()
        for worker in self._workers:
            try:
                code = worker.process.wait(timeout)
            except subprocess.TimeoutExpired:
                progress_log.warning(
                    f"GPU rank {worker.rank} did not exit {timeout:g} s after the run; stopped."
                )
                continue
            if code != 0:
                worker.reader.join(1.0)
                problem = describe_exit(worker.rank, worker.process.pid, code, list(worker.tail))
                progress_log.warning(f"after delivering its rows, {problem}")
        self.stop()

    def stop(self) -> None:
        """Stop every worker still running (close its stdin, then SIGTERM, then SIGKILL); idempotent."""
        self._stopped.set()
        for worker in self._workers:
            _close_quietly(worker.process.stdin)
        for worker in self._workers:
            if worker.process.poll() is None:
                worker.process.terminate()
        for worker in self._workers:
            try:
                worker.process.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.reader.join(1.0)
            _close_quietly(worker.process.stderr)

    def _watch(self) -> None:
        while not self._stopped.is_set():
            for worker in self._workers:
                code = worker.process.poll()
                if code is not None and not self._expect_exit and not self._stopped.is_set():
                    self._fail(worker, code)
                    return
            self._stopped.wait(_POLL_S)

    def _fail(self, worker: _Worker, code: int) -> None:
        worker.reader.join(1.0)  # its stderr closes with it: the tail is complete
        failure = describe_exit(worker.rank, worker.process.pid, code, list(worker.tail))
        with self._lock:
            if self._failure is None:
                self._failure = failure
            callback = self._on_failure
        self._failed.set()
        if callback is not None:
            try:
                callback()
            except Exception as err:  # the abort must not stop the clean-up below
                progress_log.warning(f"aborting the run after GPU rank {worker.rank} failed: {err}")
        for other in self._workers:
            if other is not worker and other.process.poll() is None:
                other.process.terminate()


def _close_quietly(stream: IO[bytes] | None) -> None:
    if stream is not None:
        with contextlib.suppress(OSError):
            stream.close()
