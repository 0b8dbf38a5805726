"""The step on files: read an h5ad file, integrate, measure, write every output atomically.

:func:`run_step` takes a :class:`StepRequest` (paths and options) and already-checked
:class:`~harmony_step.HarmonyParams`; the ``harmony-step run`` command is a thin layer over it.
Modules: ``request`` (what to do), ``run`` (doing it), ``files`` (h5ad reading, output checks,
atomic writes), ``metrics`` (LISI, silhouette), ``reports`` (convergence table, summary, plot),
``progress`` (messages on stderr).
"""

from harmony_step._step.request import StepRequest
from harmony_step._step.run import StepOutcome, run_step

__all__ = ["StepOutcome", "StepRequest", "run_step"]
