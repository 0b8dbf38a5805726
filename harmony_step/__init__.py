"""harmony-step: Harmony batch integration of single-cell embeddings on GPU (CuPy) and CPU (NumPy)."""

from harmony_step._params import HarmonyConvergenceWarning, HarmonyParams
from harmony_step.api import harmony_integrate

__version__ = "0.1.0"

__all__ = ["HarmonyConvergenceWarning", "HarmonyParams", "__version__", "harmony_integrate"]
