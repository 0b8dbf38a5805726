"""The processes of a run under ``srun``, one task per GPU, possibly on several nodes
(:mod:`harmony_step._distributed.slurm` says how the tasks find each other).

Task 0 does the file I/O and drives the run; the ``harmony-step run`` command joins the run's
communicator before it reads the input (:func:`leader_session`), so the other tasks, which
started at the same moment, wait for the read rather than for a rendezvous that has not begun,
and learn at once when task 0 fails before the run (a stop message; they exit 0 and task 0's exit
status is the step's). The other tasks serve one run each (:func:`serve_task`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

import numpy as np

from harmony_step._backend import Backend, select_backend
from harmony_step._batches import BatchDesign
from harmony_step._core.result import HarmonyResult
from harmony_step._distributed.comm import NcclComm, connect
from harmony_step._distributed.environment import check_nccl, rendezvous_timeout, visible_gpus
from harmony_step._distributed.protocol import broadcast_message, lead, serve, stop_message
from harmony_step._distributed.slurm import SlurmTask, current_task, local_device
from harmony_step._errors import MultiGPUError
from harmony_step._params import HarmonyParams

progress_log = logging.getLogger("harmony_step.progress")


def command_task() -> SlurmTask | None:
    """This process as one task of a multi-task ``srun`` step, or None."""
    return current_task(os.environ)


def _check_size(task: SlurmTask, n_gpus: int) -> None:
    if n_gpus != task.size:
        raise ValueError(
            f"n_gpus={n_gpus} (--gpus) must equal the number of tasks srun started "
            f"({task.size}, SLURM_STEP_NUM_TASKS): start one task per GPU, for example "
            f"srun --ntasks={n_gpus} --gpus-per-task=1 harmony-step run --gpus {n_gpus} ..."
        )


def join(task: SlurmTask, n_gpus: int, *, own_process: bool = True) -> NcclComm:
    """Make this task's GPU current and join the run's communicator.

    Raises
    ------
    ValueError
        ``n_gpus`` differs from the number of tasks.
    TooFewGPUsError
        The task sees no GPU, or fewer than its index on its node.
    NCCLUnavailableError, RendezvousTimeoutError, MultiGPUError
        As :func:`~harmony_step._distributed.comm.connect`.
    """
    _check_size(task, n_gpus)
    device = local_device(task, visible_gpus())
    check_nccl()
    import cupy

    cupy.cuda.Device(device).use()
    return connect(
        task.size,
        task.rank,
        task.host,
        task.port,
        device=device,
        timeout=rendezvous_timeout(os.environ),
        own_process=own_process,
    )


class Session:
    """Task 0's communicator, joined before the input is read, for one run."""

    def __init__(self, comm: NcclComm) -> None:
        self.comm = comm
        self.used = False

    def run(
        self, embedding: np.ndarray, design: BatchDesign, params: HarmonyParams, backend: Backend
    ) -> HarmonyResult:
        if params.n_gpus != self.comm.size:
            raise ValueError(
                f"n_gpus={params.n_gpus} differs from the {self.comm.size} tasks of this srun step."
            )
        if self.used:
            raise MultiGPUError("An srun step serves one run; start another step for the next.")
        self.used = True
        result = lead(self.comm, embedding, design, params, backend)
        # Freed now, as the other tasks free theirs after the run (NCCL's clean shut-down may
        # wait for every rank), not after task 0 has written its outputs.
        self.comm.close()
        return result


_active: Session | None = None


def active_session() -> Session | None:
    """The session of :func:`leader_session` this process is in, if any."""
    return _active


@contextlib.contextmanager
def leader_session(task: SlurmTask, n_gpus: int, *, own_process: bool = True) -> Iterator[Session]:
    """Task 0: join the run now; a run inside the block (through ``harmony_integrate`` or the
    step) uses it. On leaving, the other tasks are told to stop when no run took place, and the
    communicator is aborted when one failed."""
    global _active
    comm = join(task, n_gpus, own_process=own_process)
    session = Session(comm)
    _active = session
    try:
        yield session
    except BaseException as err:
        if session.used:
            comm.abort()
        else:
            _tell_to_stop(comm, f"task 0 failed before the run: {type(err).__name__}: {err}")
        raise
    else:
        if not session.used:
            _tell_to_stop(comm, "task 0 finished without a run")
    finally:
        _active = None
        comm.close()


def _tell_to_stop(comm: NcclComm, reason: str) -> None:
    try:
        broadcast_message(comm, stop_message(" ".join(reason.split())[:2000]))
    except Exception as err:  # the original error matters more
        progress_log.warning(f"could not tell the other srun tasks to stop: {err}")
        comm.abort()


def serve_task(task: SlurmTask, n_gpus: int | None = None) -> None:
    """A task other than 0: join, serve one run (or stop when told), leave. Quiet: task 0 logs
    the run and reports its warnings.

    Raises
    ------
    ValueError
        This is task 0, or ``n_gpus`` differs from the number of tasks.
    TooFewGPUsError, NCCLUnavailableError, RendezvousTimeoutError, MultiGPUError
        As :func:`join`.
    """
    if task.rank == 0:
        raise ValueError("Task 0 drives the run: run harmony-step (or the Python program) there.")
    comm = join(task, task.size if n_gpus is None else n_gpus)
    logger = logging.getLogger("harmony_step.progress")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reason = serve(comm, select_backend("gpu"))
        if reason is not None:
            progress_log.warning(f"srun task {task.rank}: no run ({reason})")
    except BaseException:
        comm.abort()
        raise
    finally:
        logger.setLevel(level)
        comm.close()
