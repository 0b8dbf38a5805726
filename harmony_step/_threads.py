"""CPU threads of the NumPy backend.

The numba kernels run on ``n`` threads, and so do the BLAS products, cut into fixed chunks of rows
on ``n`` threads of one Python thread pool (:func:`run_chunks`) while the BLAS library itself is
held at one thread (``harmony_step._core.cpu_kernels``, the metrics): a threaded BLAS changes its rounding with its thread count,
and its spinning threads would compete with numba's.

By default Harmony uses the CPUs this process may run on: Slurm's ``SLURM_CPUS_PER_TASK`` when it
is set, else the process's CPU affinity (``os.sched_getaffinity``: taskset, cgroups, Slurm's
binding), never more. ``cpu_threads(n)`` sets another count for a block of code; the
``harmony-step run --threads`` flag uses it. Results do not depend on the thread count
(``harmony_step._core.cpu_kernels``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

_requested: int | None = None


def prepare_numba() -> None:
    """Settings that must precede numba's first parallel loop (which starts its threads).

    numba's OpenMP threads busy-wait for new work after each parallel loop by default. Between the
    loops the BLAS library's threads run, and on a machine shared with other jobs the spinning
    threads take their cores: on two busy cores a run took three to four times as long. Sleeping
    threads cost microseconds per loop instead. A value the user set wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cpus() -> int:
    """CPUs this process may use: ``SLURM_CPUS_PER_TASK`` if set (at most the affinity), else the
    affinity, else ``os.cpu_count()``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return min(int(slurm), cpus)
    return cpus


def check_threads(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"The thread count must be an integer of at least 1. Got {value!r} instead."
        )
    return value


@contextlib.contextmanager
def cpu_threads(n: int | None = None) -> Iterator[int]:
    """Run the enclosed code with ``n`` CPU threads (numba and BLAS); ``None`` keeps an enclosing
    ``cpu_threads`` count, or else uses :func:`available_cpus`. Yields the count in force."""
    global _requested
    count = check_threads(n) if n is not None else (_requested or available_cpus())
    previous = _requested
    _requested = count
    try:
        with _limits(count):
            yield count
    finally:
        _requested = previous


# BLAS's thread count is one setting for the whole process, while runs may overlap in several
# threads: the limit is taken when the first run starts and given back when the last one ends, so a
# run that finishes first cannot lift it under another (whose products would then round otherwise).
# threadpoolctl >= 3.8 lets only one thread at a time set OpenBLAS's count and ignores the others
# silently, so each change here first takes that role for the calling thread.
_blas_lock = threading.Lock()
_blas_users = 0
_blas_limit: Any = None


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Hold BLAS at one thread for the enclosed code, whatever limit encloses it (the caller's own
    ``threadpool_limits`` included), and put back the limit found; it takes the role threadpoolctl
    gives one thread at a time, as :func:`cpu_threads` does."""
    from threadpoolctl import threadpool_limits

    with _blas_lock:
        _take_blas_control()
        limit = threadpool_limits(limits=1, user_api="blas")
    try:
        yield
    finally:
        with _blas_lock:
            _take_blas_control()
            limit.restore_original_limits()
            _take_blas_control()


@contextlib.contextmanager
def _limits(count: int) -> Iterator[None]:
    prepare_numba()
    import numba

    # numba's count is per thread; it cannot exceed its pool (NUMBA_NUM_THREADS, all CPUs).
    previous = numba.get_num_threads()
    numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
    _hold_blas_limit()
    try:
        yield
    finally:
        _release_blas_limit()
        numba.set_num_threads(previous)


def _hold_blas_limit() -> None:
    global _blas_users, _blas_limit
    from threadpoolctl import threadpool_limits

    with _blas_lock:
        if _blas_users == 0:
            _take_blas_control()
            _blas_limit = threadpool_limits(limits=1, user_api="blas")
        _blas_users += 1


def _release_blas_limit() -> None:
    global _blas_users, _blas_limit
    with _blas_lock:
        _blas_users -= 1
        if _blas_users == 0:
            _take_blas_control()
            _blas_limit.restore_original_limits()
            _blas_limit = None
            _take_blas_control()  # and leave the role free for the caller's own limits


def _take_blas_control() -> None:
    from threadpoolctl import OpenBLASController

    # threadpoolctl >= 3.8 keeps a controlling thread; earlier versions let any thread set the
    # count, so there is nothing to take.
    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """One pool for the process: it starts threads as tasks need them, at most one per CPU."""
    return concurrent.futures.ThreadPoolExecutor(
        os.cpu_count() or 1, thread_name_prefix="harmony-step"
    )


def run_chunks(task: Callable[[int], None], n_chunks: int, workers: int) -> None:
    """``task(i)`` for every chunk ``i`` on up to ``workers`` threads of one shared pool: worker
    ``w`` takes chunks ``w, w + workers, ...`` (one submission per worker, so the GIL-held
    bookkeeping does not grow with the number of chunks). Waits for all of them, so that none
    still writes when one failed, then raises the first error."""
    workers = min(workers, n_chunks)
    if workers <= 1:
        for i in range(n_chunks):
            task(i)
        return

    def share(first: int) -> None:
        for i in range(first, n_chunks, workers):
            task(i)

    futures = [_pool().submit(share, w) for w in range(workers)]
    concurrent.futures.wait(futures)
    for future in futures:
        future.result()
