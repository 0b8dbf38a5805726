"""Rank 0's entry: spread one run over ``params.n_gpus`` GPUs and return the whole result.

On one machine (the usual case: the API, the command, a Snakemake or Slurm job with several GPUs
and one task), the calling process is rank 0 on GPU 0 and starts one worker process per further
GPU (:mod:`harmony_step._distributed.processes`). Under ``srun`` with one task per GPU
(:mod:`harmony_step._distributed.srun`), the tasks are the processes and nothing is started.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from harmony_step._backend import Backend, GPUUnavailableError
from harmony_step._batches import BatchDesign
from harmony_step._core.result import HarmonyResult
from harmony_step._distributed import srun
from harmony_step._distributed.comm import PeerLostError, connect
from harmony_step._distributed.environment import (
    check_gpu_count,
    check_nccl,
    free_port,
    rendezvous_timeout,
    visible_gpus,
    worker_environment,
)
from harmony_step._distributed.processes import WorkerProcesses, worker_command
from harmony_step._distributed.protocol import lead
from harmony_step._distributed.slurm import current_task
from harmony_step._errors import MultiGPUError, WorkerFailedError
from harmony_step._params import HarmonyParams

progress_log = logging.getLogger("harmony_step.progress")

LOOPBACK = "127.0.0.1"
_FAILURE_GRACE_S = 2.0
"""After rank 0's run raised, how long to wait for the watcher to report a dead worker (whose death
is then the error reported)."""
_FINISH_TIMEOUT_S = 60.0
"""How long the workers may take to exit after delivering their rows."""

CommandFor = Callable[[int, int, str, int, float], Sequence[str]]


def run_sharded(
    embedding: np.ndarray, design: BatchDesign, params: HarmonyParams, backend: Backend
) -> HarmonyResult:
    """:func:`harmony_step._core.run_harmony` spread over ``params.n_gpus`` GPUs.

    ``embedding`` is the whole (n_cells, n_pcs) host array; the result holds the corrected rows
    of every GPU in the global order, the records of the run (the same on every GPU) and the
    largest peak of any GPU's memory pool.

    Raises
    ------
    GPUUnavailableError
        The backend is the CPU (``device='auto'`` found no usable GPU).
    ValueError
        Fewer cells than GPUs; under ``srun``, ``n_gpus`` differs from the number of tasks.
    TooFewGPUsError, NCCLUnavailableError
        Checked before any process starts.
    WorkerFailedError
        A worker died or raised; the others were stopped and no collective hangs.
    RendezvousTimeoutError, MultiGPUError
        The processes did not all join, or this process is not task 0 of an ``srun`` step.
    """
    if not backend.is_gpu:
        raise GPUUnavailableError(
            f"n_gpus={params.n_gpus} needs GPUs, but this run would be on the CPU: "
            f"{backend.reason}. Use n_gpus=1 to run on the CPU."
        )
    if embedding.shape[0] < params.n_gpus:
        raise ValueError(
            f"The 'n_gpus' parameter must be at most the number of cells "
            f"({embedding.shape[0]}). Got {params.n_gpus} instead."
        )
    session = srun.active_session()
    if session is not None:
        return session.run(embedding, design, params, backend)
    task = current_task(os.environ)
    if task is not None:
        if task.rank != 0:
            raise MultiGPUError(
                f"This process is srun task {task.rank}: only task 0 calls harmony_integrate with "
                "n_gpus > 1; start the other tasks as "
                "`python -m harmony_step._distributed.worker --slurm`."
            )
        with srun.leader_session(task, params.n_gpus, own_process=False) as session:
            return session.run(embedding, design, params, backend)
    return run_on_this_node(embedding, design, params, backend)


def check_set_up(n_gpus: int) -> None:
    """What a run over ``n_gpus`` GPUs of this machine needs, checked before any input is read
    (a large input takes minutes to read): enough GPUs visible and NCCL present. Under ``srun``
    each task sees only its own GPU, and the tasks' set-up is checked when they meet instead.

    Raises TooFewGPUsError or NCCLUnavailableError, as :func:`run_sharded` would.
    """
    if srun.active_session() is not None or current_task(os.environ) is not None:
        return
    check_gpu_count(n_gpus, visible_gpus())
    check_nccl()


def run_on_this_node(
    embedding: np.ndarray,
    design: BatchDesign,
    params: HarmonyParams,
    backend: Backend,
    *,
    command_for: CommandFor | None = None,
) -> HarmonyResult:
    """Rank 0 on GPU 0 of this machine, with one worker process per further GPU (started with
    ``command_for(rank, size, host, port, timeout)``, by default :func:`worker_command`)."""
    command_for = worker_command if command_for is None else command_for
    size = params.n_gpus
    check_gpu_count(size, visible_gpus())
    check_nccl()
    import cupy

    timeout = rendezvous_timeout(os.environ)
    port = free_port(LOOPBACK)
    progress_log.info(
        f"spreading {embedding.shape[0]:,} cells over {size} GPUs: starting {size - 1} "
        "worker process(es)"
    )
    clock = time.perf_counter()
    commands = {rank: command_for(rank, size, LOOPBACK, port, timeout) for rank in range(1, size)}
    with cupy.cuda.Device(0), WorkerProcesses(commands, worker_environment(os.environ)) as workers:
        comm = connect(
            size, 0, LOOPBACK, port, device=0, timeout=timeout, failure=workers.failure,
            own_process=False,
        )  # fmt: skip
        try:
            workers.on_failure(comm.abort)
            started = time.perf_counter() - clock
            try:
                result = lead(comm, embedding, design, params, backend)
            except BaseException as err:
                failure = _worker_failure_behind(err, comm.aborted, workers)
                comm.abort()
                if failure is not None:
                    raise failure from err
                raise
            # Every rank frees its communicator now, at the same time (NCCL's clean shut-down
            # may wait for the other ranks), and then the workers exit.
            workers.expect_exit()
            comm.close()
            workers.finish(_FINISH_TIMEOUT_S)
        finally:
            comm.close()
    result.timings["start_workers"] = started
    return result


def _worker_failure_behind(
    error: BaseException, aborted: bool, workers: WorkerProcesses
) -> WorkerFailedError | None:
    """The worker failure that ``error`` of rank 0 is a consequence of, if any.

    Rank 0's own bad input (ValueError, TypeError, KeyError) and its own GPU running out of
    memory are reported as they are, unless the run had already been aborted; any other error
    (NCCL's, CUDA's, a collective cut short) waits briefly for the watcher to name the worker
    that died.
    """
    if aborted or isinstance(error, PeerLostError):
        return workers.wait_for_failure(_FAILURE_GRACE_S)
    if not isinstance(error, Exception):  # KeyboardInterrupt, the command's SIGTERM
        return workers.failure()
    if isinstance(error, ValueError | TypeError | KeyError) or _is_out_of_memory(error):
        return None
    return workers.wait_for_failure(_FAILURE_GRACE_S)


def _is_out_of_memory(error: BaseException) -> bool:
    return any(cls.__name__ == "OutOfMemoryError" for cls in type(error).__mro__)
