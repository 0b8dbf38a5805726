"""What a run over several GPUs needs from the machine, checked before any process starts, and the
environment its processes run in."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from harmony_step._errors import NCCLUnavailableError, TooFewGPUsError

NVLS_VARIABLE = "NCCL_NVLS_ENABLE"
"""NVLink SHARP (NCCL's use of NVLink multicast) stays off in every process of a run, unless the
caller set the variable: the sums exchanged here are kilobytes, where multicast brings nothing,
and shared GPU hosts may require it off."""

TIMEOUT_VARIABLE = "HARMONY_STEP_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 300.0
"""How long the processes of a run wait for each other to join, in seconds (environment variable
:data:`TIMEOUT_VARIABLE` overrides it). Covers starting Python, importing CuPy and creating a CUDA
context on every GPU, with room for a loaded machine; under ``srun`` the other tasks also wait
while rank 0 reads its input, so set it higher there for inputs that take longer to read."""

NCCL_ADVICE = (
    "install NCCL for your CUDA version (pip install nvidia-nccl-cu12, or nvidia-nccl-cu13 for "
    "CUDA 13 builds of CuPy; conda install -c conda-forge nccl), or run on one GPU (n_gpus=1, "
    "--gpus 1)"
)


def keep_nvls_off(environ: MutableMapping[str, str]) -> None:
    """Set :data:`NVLS_VARIABLE` to 0 in ``environ`` unless it is already set."""
    environ.setdefault(NVLS_VARIABLE, "0")


def worker_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The environment of a worker process: ``base``, NVLS off (unless set), and this copy of
    harmony_step first on ``PYTHONPATH``, so the worker imports the same code as the process
    that started it (also when that one found it through ``sys.path`` alone)."""
    environ = dict(base)
    keep_nvls_off(environ)
    package_root = str(Path(__file__).resolve().parents[2])
    paths = [package_root, *[p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return environ


def rendezvous_timeout(environ: Mapping[str, str]) -> float:
    """Seconds the processes wait for each other to join (see :data:`DEFAULT_RENDEZVOUS_TIMEOUT_S`).

    Raises
    ------
    ValueError
        :data:`TIMEOUT_VARIABLE` is set to something other than a positive number.
    """
    text = environ.get(TIMEOUT_VARIABLE)
    if text is None or text == "":
        return DEFAULT_RENDEZVOUS_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{TIMEOUT_VARIABLE} must be a number of seconds > 0. Got {text!r}.")
    return value


def visible_gpus() -> int:
    """The CUDA devices this process can see (``CUDA_VISIBLE_DEVICES`` and Slurm's binding
    applied); 0 when CuPy is missing or finds no driver."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # ImportError, CUDARuntimeError (no driver)
        return 0


def check_gpu_count(requested: int, visible: int) -> None:
    """Refuse ``requested`` GPUs when fewer are visible.

    Raises
    ------
    TooFewGPUsError
        ``requested > visible``.
    """
    if requested <= visible:
        return
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    limit = f" (CUDA_VISIBLE_DEVICES={shown!r})" if shown is not None else ""
    raise TooFewGPUsError(
        f"n_gpus={requested} GPUs were requested, but this process sees {visible}{limit}. "
        f"Ask for at most {visible} (n_gpus / --gpus / the workflow's gpus), or run where "
        f"{requested} GPUs are visible (under Slurm, request them: --gpus={requested})."
    )


def nccl_problem() -> str | None:
    """Why NCCL cannot be used through CuPy here, or None when it can."""
    try:
        from cupy.cuda import nccl
    except Exception as err:  # ImportError, or a broken install
        return f"cupy.cuda.nccl cannot be imported ({type(err).__name__}: {err})"
    if not getattr(nccl, "available", False):
        return "CuPy found no NCCL library (cupy.cuda.nccl.available is False)"
    try:
        import cupyx.distributed  # noqa: F401
    except Exception as err:
        return f"cupyx.distributed cannot be imported ({type(err).__name__}: {err})"
    return None


def check_nccl() -> None:
    """Refuse a multi-GPU run when NCCL cannot be used.

    Raises
    ------
    NCCLUnavailableError
        CuPy's NCCL binding or library is missing.
    """
    problem = nccl_problem()
    if problem is not None:
        raise NCCLUnavailableError(
            f"A run over several GPUs needs NCCL, but {problem}: {NCCL_ADVICE}."
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the rendezvous of a run on one machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
