"""Kernel and configuration caches of this user: CuPy's, numba's and matplotlib's folders.

The container image points them at shared folders under ``/tmp`` (``CUPY_CACHE_DIR``,
``NUMBA_CACHE_DIR``, ``MPLCONFIGDIR``). Two things can go wrong with a folder another user made
(another uid running the same image, as Nextflow's ``-u $(id -u)`` does, or another user of an
Apptainer host sharing ``/tmp``): it is read-only for this user, and numba then refuses to compile
at import ("no locator available"); or it is writable by others, and numba loads its index with
``pickle``, so whoever can write there can run code as this user. A folder is therefore used only
if this user owns it and others (beyond its group) may not write it, numba's also the folders
inside it; a missing one is created. Otherwise the variable is pointed, for this process and those it starts, at
the first of ``<folder>-<uid>`` beside it and ``harmony-step-<uid>/<name>`` in the temporary folder
that passes the same test. Nothing changes where the variable is unset, and nothing here raises:
when no folder passes, the variable stays as it was.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import tempfile
from collections.abc import Iterator

CACHE_VARIABLES = ("CUPY_CACHE_DIR", "NUMBA_CACHE_DIR", "MPLCONFIGDIR")

log = logging.getLogger("harmony_step")


def use_own_caches() -> dict[str, str]:
    """Repoint each cache variable whose folder is not this user's own; returns the changes."""
    changed = {}
    for name in CACHE_VARIABLES:
        folder = os.environ.get(name)
        if not folder:
            continue
        try:
            chosen = _first_own(name, folder)
        except (OSError, ValueError):  # a path the checks cannot even look at: leave it
            continue
        if chosen is not None and chosen != folder:
            os.environ[name] = changed[name] = chosen
    if changed:
        log.debug("cache folders of this user: %s", changed)
        if "NUMBA_CACHE_DIR" in changed and "numba" in sys.modules:
            import numba.core.config  # read its environment again: it was imported first

            numba.core.config.reload_config()
    return changed


def _first_own(name: str, folder: str) -> str | None:
    for candidate in _candidates(folder):
        if own_folder(candidate, inside=name == "NUMBA_CACHE_DIR"):
            return candidate
    return None


def _candidates(folder: str) -> Iterator[str]:
    """The folder, then per-user ones (computed only when needed)."""
    folder = os.path.abspath(folder)
    yield folder
    uid = os.getuid()
    base = os.path.basename(folder)
    if base:
        yield f"{folder}-{uid}"
    personal = os.path.join(tempfile.gettempdir(), f"harmony-step-{uid}")
    if own_folder(personal, inside=False):
        yield os.path.join(personal, base or "cache")


def own_folder(path: str, *, inside: bool) -> bool:
    """Whether ``path`` is (or, missing, has now been made) a folder of this user that others may
    not write; with ``inside``, the same for every folder directly in it."""
    if not os.path.lexists(path):
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError:
            return False
    if not _owned(path):
        return False
    if not inside:
        return True
    try:
        entries = list(os.scandir(path))
    except OSError:
        return False
    return all(_owned(entry.path) for entry in entries if entry.is_dir(follow_symlinks=False))


def _owned(path: str) -> bool:
    """A folder of this user that this user may write and others may not, reached (if through a
    link) by a link of this user: one planted by someone else in a shared folder does not pass."""
    try:
        link, target = os.lstat(path), os.stat(path)
    except OSError:
        return False
    uid = os.getuid()
    return (
        link.st_uid == uid
        and stat.S_ISDIR(target.st_mode)
        and target.st_uid == uid
        and not target.st_mode & stat.S_IWOTH
        and os.access(path, os.W_OK | os.X_OK)
    )
