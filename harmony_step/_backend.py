"""Choose the array backend once: CuPy on an NVIDIA GPU when usable, NumPy otherwise.

CuPy is optional. It is imported only inside the functions that need it, so the package imports
and runs on machines without CUDA.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import functools
import glob
import logging
import platform
from collections.abc import Callable
from concurrent.futures import Future
from types import ModuleType
from typing import Any

import numpy as np

_PAGE_BYTES = 4096
_TOUCH_WORKERS = 8
progress_log = logging.getLogger("harmony_step.progress")
_HOST_THREADS = concurrent.futures.ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="harmony-host"
)


def _touched_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """np.empty with every page written once, by several threads (NumPy copies release the GIL)."""
    out = np.empty(shape, dtype=dtype)
    flat = out.reshape(-1)
    step = max(1, _PAGE_BYTES // dtype.itemsize)
    bounds = np.linspace(0, flat.size, _TOUCH_WORKERS + 1).astype(np.int64)
    # Each slice starts on a multiple of ``step`` so every page is hit exactly once.
    starts = (bounds[:-1] // step) * step

    def touch(part: int) -> None:
        flat[starts[part] : bounds[part + 1] : step] = 0

    with concurrent.futures.ThreadPoolExecutor(max_workers=_TOUCH_WORKERS) as pool:
        list(pool.map(touch, range(_TOUCH_WORKERS)))
    return out


class GPUUnavailableError(RuntimeError):
    """device='gpu' was requested but no usable CUDA GPU with CuPy was found."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """The array namespace ``xp`` and what is known about the device it runs on."""

    xp: ModuleType
    kind: str  # "gpu" or "cpu"
    name: str
    reason: str = ""  # why this device was chosen (recorded in uns['harmony'] and the summary)

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"

    def asarray(self, host: np.ndarray, dtype: Any = None) -> Any:
        return self.xp.asarray(host, dtype=dtype)

    def to_host(self, array: Any, out: Future | None = None) -> np.ndarray:
        """A host copy of ``array``; with ``out`` (from :meth:`prepare_host_output`) into that buffer."""
        if not self.is_gpu:
            return np.asarray(array)
        if out is None:
            return array.get()
        return array.get(out=out.result())

    def prepare_host_output(self, shape: tuple[int, ...], dtype: np.dtype) -> Future | None:
        """Start allocating and touching a host array for the result while the device computes.

        Copying a large result into fresh host memory is paced by page faults, not by the bus;
        touching the pages beforehand on idle host threads takes that cost off the critical path.
        """
        if not self.is_gpu:
            return None
        return _HOST_THREADS.submit(_touched_empty, shape, np.dtype(dtype))

    def synchronize(self) -> None:
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def pool_bytes(self) -> int:
        """Bytes currently held by CuPy's memory pool (0 on the CPU)."""
        return int(self.xp.get_default_memory_pool().total_bytes()) if self.is_gpu else 0

    def versions(self) -> dict[str, str]:
        out = {"numpy": np.__version__}
        if self.is_gpu:
            xp = self.xp
            out["cupy"] = xp.__version__
            out["cuda_runtime"] = str(xp.cuda.runtime.runtimeGetVersion())
            out["cuda_driver"] = str(xp.cuda.runtime.driverGetVersion())
        return out


# What a container started without Apptainer's --nv or Docker's --gpus lacks: the driver's
# library (Apptainer binds the host's /dev by default, but not the library) or its device files.
_NVIDIA_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia[0-9]*")
_NVIDIA_DRIVER_LIBRARY = "libcuda.so.1"
HIDDEN_GPU_ADVICE = (
    "no NVIDIA driver or GPU device is visible here; in a container, make the GPU visible with "
    "--nv (Apptainer, e.g. snakemake --apptainer-args '--nv') or --gpus all (Docker)"
)


def nvidia_driver_visible() -> bool:
    """True when the NVIDIA driver's library loads and its device files exist."""
    if not any(glob.glob(pattern) for pattern in _NVIDIA_DEVICE_NODES):
        return False
    try:
        ctypes.CDLL(_NVIDIA_DRIVER_LIBRARY)
    except OSError:
        return False
    return True


@functools.cache
def _cupy_or_reason() -> tuple[ModuleType | None, str]:
    """CuPy if it imports and sees a working GPU, else None and the reason (computed once)."""
    try:
        import cupy
    except ImportError as err:
        return None, f"CuPy is not installed ({err}); install harmony-step[cuda12] or [cuda13]"
    return probe_cupy(cupy, nvidia_driver_visible)


def probe_cupy(
    cupy: ModuleType, driver_visible: Callable[[], bool]
) -> tuple[ModuleType | None, str]:
    """``cupy`` if it can run work on a GPU, else None and the reason, with the fix when known.

    CuPy installed without a visible driver (``driver_visible()`` is false) is what a container
    started without Apptainer's ``--nv`` or Docker's ``--gpus`` looks like; CUDA then reports an
    "insufficient driver", which would wrongly suggest upgrading the driver.
    """
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("CuPy found no CUDA device")
        cupy.zeros(1).sum().item()  # the first real operation fails on a missing or old driver
    except Exception as err:  # CUDARuntimeError, CompileException, driver errors
        if not driver_visible():
            return None, f"CuPy is installed but {HIDDEN_GPU_ADVICE} (CUDA said: {err})"
        return None, f"CuPy cannot use the GPU: {err}"
    return cupy, ""


def gpu_available() -> bool:
    """True when CuPy is installed and can run work on a CUDA device."""
    return _cupy_or_reason()[0] is not None


def select_backend(device: str = "auto") -> Backend:
    """The backend for ``device`` ('auto', 'gpu' or 'cpu').

    A fallback from 'auto' to the CPU is logged in one line, and its reason is kept in
    :attr:`Backend.reason`.

    Raises
    ------
    GPUUnavailableError
        ``device='gpu'`` and CuPy cannot use a GPU here.
    """
    if device == "cpu":
        return _cpu_backend("device='cpu' was requested")
    cupy, reason = _cupy_or_reason()
    if cupy is None:
        if device == "gpu":
            raise GPUUnavailableError(
                f"device='gpu' was requested but no GPU can be used: {reason}. "
                "Use device='cpu' (or 'auto') to run on the CPU."
            )
        fallback = f"device='auto' is running on the CPU: {reason}"
        # CuPy installed but unusable usually means a GPU was meant to be used: say it louder.
        level = logging.INFO if reason.startswith("CuPy is not installed") else logging.WARNING
        progress_log.log(level, fallback)
        return _cpu_backend(fallback)
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return Backend(
        xp=cupy, kind="gpu", name=name, reason=f"device={device!r}: CuPy can use the GPU"
    )


def _cpu_backend(reason: str) -> Backend:
    return Backend(
        xp=np, kind="cpu", name=platform.processor() or platform.machine() or "cpu", reason=reason
    )
