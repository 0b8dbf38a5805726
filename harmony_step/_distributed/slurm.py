"""Runs across nodes under Slurm: ``srun`` starts one task per GPU; rank, size, GPU and the
rendezvous address come from the environment Slurm gives each task.

    srun --ntasks=8 --gpus-per-task=1 --kill-on-bad-exit=1 \\
        harmony-step run --gpus 8 --input atlas.h5ad --output out.h5ad --key sample

Every task runs the same command. Task 0 (``SLURM_PROCID=0``) is rank 0: it reads the input,
writes the outputs and drives the run; the others never open a file, serve the run and exit.

* rank, size: ``SLURM_PROCID`` and ``SLURM_STEP_NUM_TASKS`` (set by ``srun`` for the tasks of a
  job step; a batch script that did not go through ``srun`` has no step, so it is not taken for
  one task of several);
* GPU: device 0 when Slurm bound one GPU to the task (``--gpus-per-task=1``), else
  ``SLURM_LOCALID``, the task's index on its node (``--gpus-per-node``);
* rendezvous: ``MASTER_ADDR`` if set, else the first host of the step's node list
  (``SLURM_STEP_NODELIST``, falling back to ``SLURM_JOB_NODELIST``), expanded with
  ``scontrol show hostnames`` where ``scontrol`` is available; port ``MASTER_PORT`` if set, else one
  derived from the job and step ids, so two runs on one node do not collide.

Rank 0 waits for the others as they wait for it, up to ``HARMONY_STEP_RENDEZVOUS_TIMEOUT``
seconds. A task that dies cannot be watched across nodes as rank 0 watches its own workers;
``--kill-on-bad-exit=1`` makes Slurm end the step when any task fails, so nothing waits on it.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping

from harmony_step._errors import TooFewGPUsError

PORT_BASE = 20000
PORT_SPAN = 20000


@dataclasses.dataclass(frozen=True)
class SlurmTask:
    """This process as one task of a multi-task ``srun`` step."""

    rank: int
    size: int
    local_rank: int
    host: str
    port: int


def _integer(environ: Mapping[str, str], name: str) -> int:
    text = environ[name]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer.") from None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as ``gpu[07-09,12],cpu01`` (here ``gpu07``),
    without asking ``scontrol``."""
    nodelist = nodelist.strip()
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist)
    if match is None or not nodelist:
        raise ValueError(f"Cannot read a host from the Slurm node list {nodelist!r}.")
    prefix, ranges, suffix = match.groups()
    if ranges is None:
        return prefix + suffix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first + suffix


def scontrol_first_host(nodelist: str) -> str:
    """The first host of ``nodelist`` as ``scontrol show hostnames`` expands it; :func:`first_host`
    where ``scontrol`` is not available."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return first_host(nodelist)
    try:
        expanded = subprocess.run(
            [scontrol, "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return first_host(nodelist)
    return expanded[0] if expanded else first_host(nodelist)


def default_port(environ: Mapping[str, str]) -> int:
    """A port for the rendezvous of this job step: from the job and step ids, in
    ``[PORT_BASE, PORT_BASE + PORT_SPAN)``."""
    job = int(environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or 0)
    step = int(environ.get("SLURM_STEP_ID") or environ.get("SLURM_STEPID") or 0)
    return PORT_BASE + (job * 16 + step) % PORT_SPAN


def current_task(
    environ: Mapping[str, str],
    expand_first_host: Callable[[str], str] = scontrol_first_host,
) -> SlurmTask | None:
    """This process as a task of an ``srun`` step of two or more tasks, or None (no Slurm, a
    batch script, or a one-task step such as the ones Snakemake's Slurm executor starts).

    Raises
    ------
    ValueError
        The Slurm variables are present but malformed or inconsistent.
    """
    if "SLURM_STEP_NUM_TASKS" not in environ or "SLURM_PROCID" not in environ:
        return None
    size = _integer(environ, "SLURM_STEP_NUM_TASKS")
    if size < 2:
        return None
    rank = _integer(environ, "SLURM_PROCID")
    if not 0 <= rank < size:
        raise ValueError(f"SLURM_PROCID={rank} is outside [0, SLURM_STEP_NUM_TASKS={size}).")
    local_rank = _integer(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
    host = environ.get("MASTER_ADDR", "").strip()
    if not host:
        nodelist = (
            environ.get("SLURM_STEP_NODELIST")
            or environ.get("SLURM_JOB_NODELIST")
            or environ.get("SLURM_NODELIST")
        )
        if not nodelist:
            raise ValueError(
                "Slurm gave no node list (SLURM_STEP_NODELIST, SLURM_JOB_NODELIST); set "
                "MASTER_ADDR to the host of task 0."
            )
        host = expand_first_host(nodelist)
    port_text = environ.get("MASTER_PORT", "").strip()
    port = _integer(environ, "MASTER_PORT") if port_text else default_port(environ)
    if not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT={port_text!r} is not a TCP port (1 to 65535).")
    return SlurmTask(rank=rank, size=size, local_rank=local_rank, host=host, port=port)


def local_device(task: SlurmTask, visible: int) -> int:
    """The CUDA device of ``task`` among the ``visible`` ones.

    Raises
    ------
    TooFewGPUsError
        No GPU is visible, or fewer than the task's index on its node needs.
    """
    if visible < 1:
        raise TooFewGPUsError(
            f"Slurm task {task.rank} sees no GPU: request one per task "
            "(srun --gpus-per-task=1, or --gpus-per-node with one task per GPU)."
        )
    if visible == 1:
        return 0
    if task.local_rank >= visible:
        raise TooFewGPUsError(
            f"Slurm task {task.rank} is task {task.local_rank} on its node but sees only "
            f"{visible} GPU(s): start at most one task per GPU on each node."
        )
    return task.local_rank
