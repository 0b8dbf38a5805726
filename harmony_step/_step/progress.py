"""Progress messages on stderr: one updating line with a bar on a terminal, plain lines otherwise.

The algorithm and the step log their progress to the ``harmony_step.progress`` logger; a round's
record carries its number and the round limit as the fields ``harmony_round`` and
``harmony_max_rounds``, from which the bar is drawn. Warnings of this package are shown as one
``harmony-step: warning:`` line each.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

PROG = "harmony-step"
PROGRESS_LOGGER = "harmony_step.progress"
_PACKAGE = Path(__file__).resolve().parents[1]


class ProgressDisplay(logging.Handler):
    """Shows progress records and warning or error lines on ``stream``."""

    _BAR_WIDTH = 20

    def __init__(self, stream: TextIO, *, quiet: bool) -> None:
        super().__init__(level=logging.INFO)
        self.stream = stream
        self.quiet = quiet
        self.live = not quiet and stream.isatty()
        self._line_open = False

    def emit(self, record: logging.LogRecord) -> None:
        done = getattr(record, "harmony_round", None)
        total = getattr(record, "harmony_max_rounds", None)
        fraction = None if done is None or not total else min(1.0, int(done) / int(total))
        self.show(record.getMessage(), fraction)

    def show(self, message: str, fraction: float | None = None) -> None:
        """One progress message, with a bar filled to ``fraction`` on a terminal; dropped when quiet."""
        if self.quiet:
            return
        if not self.live:
            self._write(f"{PROG}: {message}\n")
            return
        width = shutil.get_terminal_size((100, 24)).columns - 1
        line = f"{PROG}: {self._bar(fraction)}{message}"[:width]
        self._write("\r\x1b[K" + line)
        self._line_open = True

    def _bar(self, fraction: float | None) -> str:
        if fraction is None:
            return ""
        filled = round(self._BAR_WIDTH * fraction)
        return "[" + "#" * filled + "." * (self._BAR_WIDTH - filled) + "] "

    def end_line(self) -> None:
        """Close the updating line so that the next message starts on a line of its own."""
        if self._line_open:
            self._write("\n")
            self._line_open = False

    def message(self, kind: str, text: str) -> None:
        """A warning or error line, shown even when quiet."""
        self.end_line()
        self._write(f"{PROG}: {kind}: {' '.join(str(text).split())}\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _in_package(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(_PACKAGE)


@contextmanager
def attached(display: ProgressDisplay, *, debug: bool) -> Iterator[None]:
    """Route the progress logger and this package's warnings to ``display`` for the block.

    Other libraries' warnings are shown only with ``debug``.
    """
    logger = logging.getLogger(PROGRESS_LOGGER)
    saved = (logger.level, logger.propagate)
    logger.addHandler(display)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def show_warning(message: Any, category: type, filename: str, *_: Any, **__: Any) -> None:
        ours = category.__module__.startswith("harmony_step") or _in_package(filename)
        if ours or debug:
            display.message("warning", str(message))

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show_warning
        try:
            yield
        finally:
            display.end_line()
            logger.removeHandler(display)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]
