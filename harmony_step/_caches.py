"""Kernel caches this user can write: CuPy's, numba's and matplotlib's folders.

The container image points them at shared folders under ``/tmp`` (``CUPY_CACHE_DIR``,
``NUMBA_CACHE_DIR``, ``MPLCONFIGDIR``). A folder that another user created (another uid running
the same image, as Nextflow's ``-u $(id -u)`` does, or another user of an Apptainer host sharing
``/tmp``) is read-only for this one, and numba then refuses to compile at import ("no locator
available"). Such a folder is replaced, for this process and the processes it starts, by a
per-user one: ``<folder>-<uid>`` beside it, or else ``harmony-step-<uid>/<name>`` in the temporary
folder. Nothing changes where the folder is usable or the variable is unset.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

CACHE_VARIABLES = ("CUPY_CACHE_DIR", "NUMBA_CACHE_DIR", "MPLCONFIGDIR")


def use_writable_caches() -> dict[str, str]:
    """Repoint each cache variable whose folder this user cannot write; returns the changes."""
    changed = {}
    for name in CACHE_VARIABLES:
        folder = os.environ.get(name)
        if not folder or usable(Path(folder)):
            continue
        for fallback in _fallbacks(Path(folder)):
            if usable(fallback):
                os.environ[name] = changed[name] = str(fallback)
                break
    return changed


def usable(folder: Path) -> bool:
    """Whether this user can write ``folder`` and the folders right inside it (numba keeps one per
    package folder), or create it: its nearest existing ancestor is writable."""
    if folder.is_dir():
        try:
            inside = [p for p in folder.iterdir() if p.is_dir()]
        except OSError:
            return False
        return all(os.access(p, os.W_OK | os.X_OK) for p in [folder, *inside])
    for ancestor in folder.parents:
        if ancestor.exists():
            return ancestor.is_dir() and os.access(ancestor, os.W_OK | os.X_OK)
    return False


def _fallbacks(folder: Path) -> list[Path]:
    uid = os.getuid()
    return [
        folder.with_name(f"{folder.name}-{uid}"),
        Path(tempfile.gettempdir()) / f"harmony-step-{uid}" / folder.name,
    ]
