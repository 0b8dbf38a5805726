"""Running the step's command from a benchmark: one subprocess, timed, its failure raised."""

from __future__ import annotations

import shlex
import subprocess
import time


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
