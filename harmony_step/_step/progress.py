"""Progress messages on stderr: a progress bar on a terminal, plain lines otherwise.

The algorithm and the step log their progress to the ``harmony_step.progress`` logger. A round's
record carries its number and the round limit as the fields ``harmony_round`` and
``harmony_max_rounds``; the start of a phase of the step (read, compute, metrics, hash, write)
carries ``harmony_phase``, and its end is a line of its own.

* On a terminal a tqdm bar shows the phase, the round and its objective, and the elapsed time;
  other messages (the device, each phase's seconds, the timings) are printed above it.
* Anywhere else (a Snakemake log file, a pipe) every message is one plain line: one per phase and
  one per round, never one per iteration. Phase starts are left out there.

Warnings of this package are shown as one ``harmony-step: warning:`` line each.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
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

    _BAR_FORMAT = "{desc} {bar:12} [{elapsed}]{postfix}"  # fits 80 columns with the objective

    def __init__(self, stream: TextIO, *, quiet: bool) -> None:
        super().__init__(level=logging.INFO)
        self.stream = stream
        self.quiet = quiet
        self.live = not quiet and stream.isatty()
        self._started = time.monotonic()
        self._bar: Any = None
        self._phase = ""

    def emit(self, record: logging.LogRecord) -> None:
        phase = getattr(record, "harmony_phase", None)
        done = getattr(record, "harmony_round", None)
        total = getattr(record, "harmony_max_rounds", None)
        if phase is not None:
            self.phase(str(phase))
        elif done is not None and total:
            self.round(int(done), int(total), record.getMessage())
        else:
            self.show(record.getMessage())

    def phase(self, name: str) -> None:
        """A phase starts: the bar shows its name (nothing is written to a log)."""
        self._phase = name
        if self.live:
            bar = self._live_bar()
            bar.set_description_str(f"{PROG}: {name}", refresh=False)
            bar.reset(total=1)
            bar.set_postfix_str("", refresh=False)
            bar.refresh()

    def round(self, done: int, total: int, message: str) -> None:
        """A round of the Harmony loop ended: the bar moves; a log gets the round's line."""
        if self.quiet:
            return
        if not self.live:
            self._write(f"{PROG}: {message}\n")
            return
        bar = self._live_bar()
        objective = re.search(r"objective (\S+)", message)
        postfix = f"round {done}/{total}" + (f", objective {objective[1]}" if objective else "")
        bar.total = total
        bar.n = min(done, total)
        bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()

    def show(self, message: str, fraction: float | None = None) -> None:
        """One progress message: a line of its own (above the bar on a terminal); dropped when quiet.

        ``fraction`` (0 to 1) fills the bar on a terminal.
        """
        if self.quiet:
            return
        if not self.live:
            self._write(f"{PROG}: {message}\n")
            return
        bar = self._live_bar()
        bar.write(f"{PROG}: {message}", file=self.stream)
        if fraction is not None:
            bar.total, bar.n = 1000, round(1000 * min(1.0, fraction))
            bar.refresh()

    def _live_bar(self) -> Any:
        if self._bar is None:
            from tqdm import tqdm

            # a terminal that reports no size (a new pty) counts as 100 x 24
            size = shutil.get_terminal_size((100, 24))
            self._bar = tqdm(
                total=1,
                file=self.stream,
                bar_format=self._BAR_FORMAT,
                desc=f"{PROG}: {self._phase}" if self._phase else PROG,
                leave=False,
                ncols=size.columns - 1,
                nrows=size.lines,
                mininterval=0.2,
            )
            self._bar.start_t = self._bar._time() - (time.monotonic() - self._started)
        return self._bar

    def end_line(self) -> None:
        """Remove the bar so that the next message starts on a line of its own."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def message(self, kind: str, text: str) -> None:
        """A warning or error line, shown even when quiet."""
        line = f"{PROG}: {kind}: {' '.join(str(text).split())}"
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self._write(line + "\n")

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
