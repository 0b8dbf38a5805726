"""What the benchmarks share: running the step's command (one subprocess, timed, its failure
raised) and naming the commit they measured."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path


def run_timed(command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``command`` to its end; its completed process (output captured as text) and wall
    seconds. Raises RuntimeError with the command and the end of its stderr when it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
    return done, wall


def commit() -> str:
    """The checkout's commit, marked ``-dirty`` when files other than the results differ from it
    (the results change between sizes of one call); ``unknown`` outside git. ``HARMONY_STEP_COMMIT``
    names it instead, for a copy of the checkout whose history is missing or stale (a remote
    machine's)."""
    if os.environ.get("HARMONY_STEP_COMMIT"):
        return os.environ["HARMONY_STEP_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short=8", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                      ":(top,exclude)benchmarks/results")  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if changed else "")
