"""harmony-step: Harmony batch integration of single-cell embeddings on GPU (CuPy) and CPU (NumPy)."""

from harmony_step._errors import (
    BatchKeyWarning,
    MissingBasisError,
    MissingColumnError,
    WrongTypeError,
)
from harmony_step._params import HarmonyConvergenceWarning, HarmonyParams, ObjectiveRoseWarning
from harmony_step.api import harmony_integrate

__version__ = "0.1.0"

__all__ = [
    "BatchKeyWarning",
    "HarmonyConvergenceWarning",
    "HarmonyParams",
    "MissingBasisError",
    "MissingColumnError",
    "ObjectiveRoseWarning",
    "WrongTypeError",
    "__version__",
    "harmony_integrate",
]
