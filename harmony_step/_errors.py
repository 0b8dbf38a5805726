"""Exception and warning classes of harmony-step.

The exceptions derive from two built-in classes so that code written for scanpy or
rapids-singlecell, which catches ``ValueError``, catches ours too, while code that catches the
natural type (``KeyError`` for a missing name, ``TypeError`` for a wrong type) keeps working.
"""

from __future__ import annotations


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
