"""The Harmony algorithm on arrays (NumPy or CuPy). Never touches AnnData, files or arguments."""

from harmony_step._core.loop import run_harmony
from harmony_step._core.result import HarmonyResult

__all__ = ["HarmonyResult", "run_harmony"]
