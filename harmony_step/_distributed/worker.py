"""``python -m harmony_step._distributed.worker``: the process of one further GPU of a run.

On one machine, rank 0 (the process that called ``harmony_integrate`` or ``harmony-step run``)
starts one worker per further GPU with the rendezvous on its command line::

    python -m harmony_step._distributed.worker --rank 1 --size 2 --host 127.0.0.1 --port 41234 \\
        --device 1 --timeout 300 --watch-stdin

Under ``srun`` (one task per GPU), tasks 1 and up of a Python program that calls
``harmony_integrate(..., n_gpus=N)`` on task 0 run ``python -m harmony_step._distributed.worker
--slurm``; everything then comes from Slurm's environment. (The ``harmony-step run`` command does
this by itself on every task but task 0.)

A worker receives the job, its batch codes and its rows from rank 0, runs its share, sends its
corrected rows back and exits 0. When it fails it writes its traceback and, last, one line
``harmony-step worker error: TYPE: MESSAGE`` on stderr and exits 1; with ``--watch-stdin`` it
exits 3 as soon as its stdin closes (rank 0 is gone).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Sequence

from harmony_step._distributed.environment import (
    TIMEOUT_VARIABLE,
    keep_nvls_off,
    rendezvous_timeout,
)
from harmony_step._distributed.processes import ERROR_MARK, exit_when_closed

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LEADER_GONE = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """The command line of a worker (with ``slurm``, rank to device are unused: 0 and '')."""

    slurm: bool
    rank: int = 0
    size: int = 0
    host: str = ""
    port: int = 0
    device: int = 0
    timeout: float | None = None
    watch_stdin: bool = False


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m harmony_step._distributed.worker",
        description="The process of one further GPU of a Harmony run spread over several GPUs.",
    )
    parser.add_argument(
        "--slurm",
        action="store_true",
        help="take rank, size, GPU and rendezvous from srun's environment (--rank, --size, "
        "--host, --port and --device are then refused)",
    )
    parser.add_argument("--rank", type=int, help="this process's rank, 1 to size - 1")
    parser.add_argument("--size", type=int, help="processes (GPUs) of the run, 2 or more")
    parser.add_argument("--host", help="address of rank 0's rendezvous")
    parser.add_argument("--port", type=int, help="port of rank 0's rendezvous")
    parser.add_argument("--device", type=int, help="CUDA device of this process (default: rank)")
    parser.add_argument(
        "--timeout",
        type=float,
        help=f"seconds to wait for the other processes (default: ${TIMEOUT_VARIABLE} or 300)",
    )
    parser.add_argument(
        "--watch-stdin",
        action="store_true",
        help="exit when stdin closes (the process that started this one is gone)",
    )
    return parser


def parse_args(argv: Sequence[str]) -> WorkerOptions:
    """The checked options; a bad command line exits with status 2 and one line on stderr."""
    parser = _parser()
    args = parser.parse_args(list(argv))
    given = [
        name
        for name in ("rank", "size", "host", "port", "device")
        if getattr(args, name) is not None
    ]
    if args.slurm:
        if given:
            parser.error(f"--slurm takes everything from srun's environment; drop --{given[0]}")
        return WorkerOptions(slurm=True, timeout=args.timeout, watch_stdin=args.watch_stdin)
    missing = [
        f"--{name}" for name in ("rank", "size", "host", "port") if getattr(args, name) is None
    ]
    if missing:
        parser.error(f"give {', '.join(missing)} (or --slurm under srun)")
    if args.size < 2:
        parser.error(f"--size must be 2 or more; got {args.size}")
    if not 1 <= args.rank < args.size:
        parser.error(
            f"--rank must be in [1, {args.size - 1}] (rank 0 starts the workers); got {args.rank}"
        )
    if not 0 < args.port < 65536:
        parser.error(f"--port must be a TCP port (1 to 65535); got {args.port}")
    device = args.rank if args.device is None else args.device
    if device < 0:
        parser.error(f"--device must be >= 0; got {device}")
    if args.timeout is not None and not args.timeout > 0:
        parser.error(f"--timeout must be > 0 seconds; got {args.timeout}")
    return WorkerOptions(
        slurm=False, rank=args.rank, size=args.size, host=args.host, port=args.port,
        device=device, timeout=args.timeout, watch_stdin=args.watch_stdin,
    )  # fmt: skip


def _serve_on_this_node(options: WorkerOptions) -> None:
    import cupy

    from harmony_step._backend import select_backend
    from harmony_step._distributed.comm import connect
    from harmony_step._distributed.environment import check_nccl
    from harmony_step._distributed.protocol import serve

    check_nccl()
    cupy.cuda.Device(options.device).use()
    timeout = options.timeout if options.timeout is not None else rendezvous_timeout(os.environ)
    comm = connect(
        options.size, options.rank, options.host, options.port,
        device=options.device, timeout=timeout,
    )  # fmt: skip
    try:
        serve(comm, select_backend("gpu"))
    except BaseException:
        comm.abort()
        raise
    finally:
        comm.close()


def _serve_slurm_task(options: WorkerOptions) -> None:
    from harmony_step._distributed.slurm import current_task
    from harmony_step._distributed.srun import serve_task

    if options.timeout is not None:
        os.environ["HARMONY_STEP_RENDEZVOUS_TIMEOUT"] = f"{options.timeout:g}"
    task = current_task(os.environ)
    if task is None:
        raise ValueError(
            "--slurm: this process is not one task of a multi-task srun step "
            "(SLURM_STEP_NUM_TASKS and SLURM_PROCID are missing, or there is one task)."
        )
    serve_task(task)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker; returns its exit status."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    keep_nvls_off(os.environ)
    if options.watch_stdin:
        exit_when_closed(sys.stdin.buffer, lambda: os._exit(EXIT_LEADER_GONE))
    # Rank 0 logs the rounds and reports the warnings of the run; a worker says only what failed.
    logging.getLogger("harmony_step.progress").setLevel(logging.WARNING)
    warnings.simplefilter("ignore")
    try:
        if options.slurm:
            _serve_slurm_task(options)
        else:
            _serve_on_this_node(options)
    except BaseException as err:
        traceback.print_exc()
        message = " ".join(str(err).split()) or "(no message)"
        sys.stderr.write(f"{ERROR_MARK}{type(err).__name__}: {message}\n")
        sys.stderr.flush()
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without the interpreter's finalisation: its teardown of CuPy's and NCCL's state after
    # the communicator is gone can abort the process (seen as SIGABRT after a finished run), and
    # nothing is left to clean up once the rows are delivered and the status is known.
    os._exit(status)
