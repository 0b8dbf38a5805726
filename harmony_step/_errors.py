"""Exception and warning classes of harmony-step.

The exceptions derive from two built-in classes so that code written for scanpy or
rapids-singlecell, which catches ``ValueError``, catches ours too, while code that catches the
natural type (``KeyError`` for a missing name, ``TypeError`` for a wrong type) keeps working.
"""

from __future__ import annotations


class Terminated(BaseException):
    """SIGTERM arrived; raised by the command's handler so that the clean-up (removal of temporary
    files) runs before it exits. ``outputs_written`` is set when the outputs had already appeared
    (the signal came during their commit, which it does not interrupt, or after it)."""

    outputs_written = False


class _PlainMessage:
    """``str()`` gives the message itself (``KeyError`` would wrap it in quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()  # type: ignore[misc]


class MissingBasisError(_PlainMessage, KeyError, ValueError):
    """The embedding named by ``basis`` is not in ``obsm``."""


class MissingColumnError(_PlainMessage, KeyError, ValueError):
    """A batch key or label column is not in ``obs``."""


class WrongTypeError(TypeError, ValueError):
    """A parameter or the embedding has the wrong type."""


class BatchKeyWarning(UserWarning):
    """A batch key looks implausible as a batch variable (about one cell per level)."""


class MultiGPUError(RuntimeError):
    """A run spread over several GPUs (``n_gpus > 1``) could not start or did not finish."""


class MultiGPUSetupError(MultiGPUError):
    """This machine cannot run the requested multi-GPU run; raised before any process starts."""


class TooFewGPUsError(MultiGPUSetupError):
    """``n_gpus`` is more than the GPUs visible to this process."""


class NCCLUnavailableError(MultiGPUSetupError):
    """CuPy cannot load NCCL, which a run over several GPUs needs."""


class RendezvousTimeoutError(MultiGPUError):
    """Not every process of a multi-GPU run joined it within the rendezvous timeout."""


class WorkerFailedError(MultiGPUError):
    """Another process of a multi-GPU run died or raised; the run was stopped on every GPU.

    ``rank`` is that process's rank, ``returncode`` its exit status (negative: the signal that
    killed it; None: still running when it reported the error), ``error_type`` the class name of
    the exception it raised (None when it died without saying), ``stderr_tail`` the last lines of
    its error output.
    """

    def __init__(
        self,
        message: str,
        *,
        rank: int,
        returncode: int | None = None,
        error_type: str | None = None,
        stderr_tail: str = "",
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.returncode = returncode
        self.error_type = error_type
        self.stderr_tail = stderr_tail
