"""harmony-step: Harmony batch integration of single-cell embeddings on GPU (CuPy) and CPU (NumPy).

The package has three wings. The public face: :func:`harmony_integrate` (:mod:`harmony_step.api`)
and the ``harmony-step`` command (:mod:`harmony_step.cli`). The step on files
(:mod:`harmony_step._step`): read an h5ad file, integrate, measure, write atomically. The algorithm
on arrays (:mod:`harmony_step._core`), which never sees a file or an AnnData.
"""

from harmony_step._caches import use_own_caches
from harmony_step._errors import (
    BatchKeyWarning,
    MissingBasisError,
    MissingColumnError,
    MultiGPUError,
    MultiGPUSetupError,
    WorkerFailedError,
    WrongTypeError,
)
from harmony_step._params import (
    HarmonyConvergenceWarning,
    HarmonyParameterWarning,
    HarmonyParams,
    ObjectiveRoseWarning,
)
from harmony_step._threads import cpu_threads
from harmony_step._version import __version__
from harmony_step.api import harmony_integrate

# The package imports neither CuPy nor numba until it computes, so this comes before both.
use_own_caches()

__all__ = [
    "BatchKeyWarning",
    "HarmonyConvergenceWarning",
    "HarmonyParameterWarning",
    "HarmonyParams",
    "MissingBasisError",
    "MissingColumnError",
    "MultiGPUError",
    "MultiGPUSetupError",
    "ObjectiveRoseWarning",
    "WorkerFailedError",
    "WrongTypeError",
    "__version__",
    "cpu_threads",
    "harmony_integrate",
]
