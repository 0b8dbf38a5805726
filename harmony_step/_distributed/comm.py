"""One rank's communicator: NCCL through CuPy's ``cupyx.distributed``, one process per GPU.

:func:`connect` joins the run's process group (``cupyx.distributed.init_process_group``: rank 0
serves a small TCP store that hands the NCCL id to the others) and gives up after a timeout, or
as soon as the caller learns that another process has died. :class:`NcclComm` offers what the
core's :class:`~harmony_step._core.shard.Communicator` needs (``rank``, ``size``, ``all_sum``,
``broadcast``), the point-to-point transfers of the data path, :meth:`NcclComm.abort`, which any
thread may call to end a collective that waits for a dead peer, and :meth:`NcclComm.close`, which
stops rank 0's TCP store explicitly (its server is a child process that would otherwise keep
rank 0's process from exiting).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from harmony_step._distributed.environment import TIMEOUT_VARIABLE, keep_nvls_off
from harmony_step._errors import MultiGPUError, RendezvousTimeoutError

_POLL_S = 0.05
# cupyx's store client gives up after 25 s of refused connections; a rank that started long before
# rank 0 (srun: while rank 0 reads its input) tries again until its own deadline.
_STORE_DOWN = "TCPStore is not available"
_RETRY_PAUSE_S = 0.5


class PeerLostError(MultiGPUError):
    """A collective was cut short because the run was aborted (another process failed)."""


class NcclComm:
    """The communicator of one rank over NCCL, on the CUDA device that was current at :func:`connect`.

    Float sums are formed in a fixed order (all-gather, then rank 0's part + rank 1's + ...), so
    every rank gets the same bits on every run whatever algorithm NCCL picks; integer sums are
    exact in any order and use NCCL's all-reduce directly.
    """

    def __init__(self, backend: Any, rank: int, size: int) -> None:
        import cupy

        self._backend = backend
        self.rank = rank
        self.size = size
        self.xp = cupy
        self._lock = threading.Lock()
        self._aborted = False
        self._closed = False

    # --- what the core uses ----------------------------------------------------------------

    def all_sum(self, array: Any) -> None:
        """Replace ``array`` (a contiguous CuPy array: int64, float32 or float64) by its sum over
        ranks, the same bits on every rank."""
        self._raise_if_aborted()
        if array.dtype.kind in "iu":
            self._backend.all_reduce(array, array, "sum")
        else:
            gathered = self.xp.empty((self.size, *array.shape), dtype=array.dtype)
            self._backend.all_gather(array, gathered, array.size)
            array[...] = gathered[0]
            for rank in range(1, self.size):
                array += gathered[rank]
        self._raise_if_aborted()

    def broadcast(self, array: Any, root: int = 0) -> None:
        """Replace ``array`` (a contiguous CuPy array) on every rank by root's."""
        self._raise_if_aborted()
        self._backend.broadcast(array, root)
        self._raise_if_aborted()

    # --- the data path ------------------------------------------------------------------------

    def send(self, array: Any, peer: int) -> None:
        self._raise_if_aborted()
        self._backend.send(array, peer)
        self._raise_if_aborted()

    def recv(self, array: Any, peer: int) -> None:
        self._raise_if_aborted()
        self._backend.recv(array, peer)
        self._raise_if_aborted()

    def device_bytes(self, n_bytes: int) -> Any:
        """A device buffer of ``n_bytes`` bytes (uint8)."""
        return self.xp.empty(n_bytes, dtype=self.xp.uint8)

    def upload(self, device: Any, host: np.ndarray) -> None:
        """Copy the host bytes ``host`` into the device buffer ``device`` of the same size."""
        device.set(host)

    def download(self, device: Any, host: np.ndarray) -> None:
        """Copy the device buffer ``device`` into the host array ``host`` of the same size."""
        device.get(out=host)

    def release_cached(self) -> None:
        """Give the transfer buffers back to the device (they would stay in CuPy's pool)."""
        self.xp.cuda.get_current_stream().synchronize()
        self.xp.get_default_memory_pool().free_all_blocks()

    # --- ending --------------------------------------------------------------------------------

    @property
    def aborted(self) -> bool:
        return self._aborted

    def abort(self) -> None:
        """End this rank's part of the run now; callable from any thread.

        ``ncclCommAbort`` stops the kernels of pending collectives (one waiting for a dead peer
        returns) and frees the communicator; every later call raises :class:`PeerLostError`.
        """
        with self._lock:
            if self._aborted or self._closed:
                self._aborted = True
                return
            self._aborted = True
        nccl = getattr(self._backend, "_comm", None)
        if nccl is not None:
            nccl.abort()

    def close(self) -> None:
        """Free the NCCL communicator (after a clean end) and stop rank 0's TCP store."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            aborted = self._aborted
        try:
            nccl = getattr(self._backend, "_comm", None)
            if nccl is not None and not aborted:
                nccl.destroy()
        finally:
            if self.rank == 0:
                self._backend.stop()

    def _raise_if_aborted(self) -> None:
        if self._aborted:
            raise PeerLostError(
                f"GPU rank {self.rank}: the run was stopped because another of its processes failed."
            )


class _Attempt:
    """``cupyx.distributed.init_process_group`` on a thread of its own, so the caller can stop
    waiting for it; the thread makes ``device`` current first (NCCL binds the device that is
    current in the thread creating the communicator)."""

    def __init__(self, size: int, rank: int, host: str, port: int, device: int) -> None:
        self.backend: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run,
            args=(size, rank, host, port, device),
            name=f"harmony-step-rendezvous-{rank}",
            daemon=True,
        )
        self._thread.start()

    def _run(self, size: int, rank: int, host: str, port: int, device: int) -> None:
        try:
            import cupy
            from cupyx.distributed import init_process_group

            with cupy.cuda.Device(device):
                self.backend = init_process_group(size, rank, backend="nccl", host=host, port=port)
        except BaseException as err:  # reported by the waiting thread
            self.error = err

    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, seconds: float) -> None:
        self._thread.join(seconds)


def _store_servers() -> set[Any]:
    """The TCP store server processes cupyx.distributed runs as children of this process."""
    return {
        child
        for child in multiprocessing.active_children()
        if type(child).__module__.startswith("cupyx.distributed")
    }


def _stop_new_store_servers(before: set[Any]) -> None:
    """Stop a store server started by an attempt that is being given up (rank 0)."""
    for child in _store_servers() - before:
        child.terminate()
        child.join(5)


def _leave_mpi_uninitialised() -> None:
    """cupyx.distributed imports mpi4py when installed, and importing ``mpi4py.MPI`` initialises
    MPI, which the TCP rendezvous does not use (and which, in a process not started by an MPI
    launcher, can be slow or fail). Only for processes this package started itself."""
    if "mpi4py.MPI" in sys.modules:
        return
    try:
        import mpi4py
    except ImportError:
        return
    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False


def connect(
    size: int,
    rank: int,
    host: str,
    port: int,
    *,
    device: int,
    timeout: float,
    failure: Callable[[], BaseException | None] = lambda: None,
    own_process: bool = True,
) -> NcclComm:
    """Join the process group of a run as ``rank`` of ``size`` (rank 0 serves the rendezvous on
    ``host:port``) and return the communicator, bound to CUDA device ``device``.

    Parameters
    ----------
    failure
        Asked while waiting: an exception to raise instead of waiting on (a worker that died),
        or None.
    own_process
        The process was started by this package (a worker, or the command under ``srun``), so
        process-wide settings may be changed for it (MPI is left uninitialised).

    Raises
    ------
    RendezvousTimeoutError
        Not every rank joined within ``timeout`` seconds.
    MultiGPUError
        The rendezvous or NCCL's set-up failed (for example the port is taken).
    BaseException
        Whatever ``failure`` returned.
    """
    keep_nvls_off(os.environ)
    if own_process:
        _leave_mpi_uninitialised()
    deadline = time.monotonic() + timeout
    while True:
        before = _store_servers() if rank == 0 else set()
        attempt = _Attempt(size, rank, host, port, device)
        while attempt.running():
            attempt.wait(_POLL_S)
            problem = failure()
            if problem is not None:
                _stop_new_store_servers(before)
                raise problem
            if time.monotonic() > deadline:
                _stop_new_store_servers(before)
                raise RendezvousTimeoutError(
                    f"GPU rank {rank} of {size}: not every process of the run joined within "
                    f"{timeout:g} s (rendezvous {host}:{port}). Check that all {size} processes "
                    f"started (under srun: one task per GPU, all with the same --gpus), or wait "
                    f"longer with {TIMEOUT_VARIABLE}=SECONDS."
                )
        error = attempt.error
        if error is None:
            if getattr(attempt.backend, "_comm", None) is None:
                raise MultiGPUError(
                    "This CuPy's cupyx.distributed keeps no NCCL communicator where harmony-step "
                    "expects it (NCCLBackend._comm); use CuPy 13 or 14."
                )
            return NcclComm(attempt.backend, rank, size)
        if rank > 0 and _STORE_DOWN in str(error) and time.monotonic() + _RETRY_PAUSE_S < deadline:
            time.sleep(_RETRY_PAUSE_S)
            continue
        _stop_new_store_servers(before)
        where = "start the rendezvous server" if rank == 0 else "reach the rendezvous server"
        raise MultiGPUError(
            f"GPU rank {rank} of {size} could not {where} at {host}:{port} or set up NCCL: "
            f"{type(error).__name__}: {error}"
            + (". The port may be in use by another program." if _STORE_DOWN in str(error) else "")
        ) from error
