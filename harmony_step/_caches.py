"""Kernel and configuration caches of this user: CuPy's, numba's and matplotlib's folders.

The container image points them at shared folders under ``/tmp`` (``CUPY_CACHE_DIR``,
``NUMBA_CACHE_DIR``, ``MPLCONFIGDIR``). Two things can go wrong with a folder another user made
(another uid running the same image, as Nextflow's ``-u $(id -u)`` does, or another user of an
Apptainer host sharing ``/tmp``): it is read-only for this user, and numba then refuses to compile
at import ("no locator available"); or someone else can write it, and since numba loads its cache
index with ``pickle``, whoever can write there can run code as this user.

A folder is therefore used only if it is private to this user (:func:`private_folder`): this user
owns it and may write it, no other user may (its group only if that is this user's own group), no
one else can move it (every folder above it belongs to root or this user, and one others may
write has the sticky bit, as ``/tmp``), and for numba the same holds for what lies directly in it.
A missing folder is created with mode 700. Otherwise the variable is pointed, for this process and
those it starts, at the first private one of ``<folder>-<uid>`` beside it,
``harmony-step-<uid>/<name>`` in the temporary folder, and a new folder of a random name there
(kept only for this run). If even that fails the variable is removed, so that the library's own
default applies. Nothing changes where the variable is unset, and nothing here raises.
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


def use_own_caches() -> dict[str, str | None]:
    """Repoint each cache variable whose folder is not private to this user; returns the changes
    (None: removed)."""
    changed: dict[str, str | None] = {}
    for name in CACHE_VARIABLES:
        folder = os.environ.get(name)
        if not folder:
            continue
        chosen = _first_private(folder, inside=name == "NUMBA_CACHE_DIR")
        if chosen == folder:
            continue
        if chosen is None:
            del os.environ[name]
        else:
            os.environ[name] = chosen
        changed[name] = chosen
    if changed:
        log.debug("cache folders of this user: %s", changed)
        if "NUMBA_CACHE_DIR" in changed and "numba" in sys.modules:
            import numba.core.config  # read its environment again: it was imported first

            numba.core.config.reload_config()
    return changed


def _first_private(folder: str, *, inside: bool) -> str | None:
    try:
        for candidate in _candidates(folder):
            if private_folder(candidate, inside=inside):
                return candidate
        return tempfile.mkdtemp(prefix=f"harmony-step-{os.getuid()}-")  # private by construction
    except (OSError, ValueError):  # no temporary folder, a path that cannot be looked at
        return None


def _candidates(folder: str) -> Iterator[str]:
    """The folder, then per-user ones (computed only when needed)."""
    yield folder
    folder = os.path.abspath(folder)
    uid = os.getuid()
    base = os.path.basename(folder)
    if base:
        yield f"{folder}-{uid}"
    personal = os.path.join(tempfile.gettempdir(), f"harmony-step-{uid}")
    if private_folder(personal, inside=False):
        yield os.path.join(personal, base or "cache")


def private_folder(path: str, *, inside: bool) -> bool:
    """Whether ``path`` is (or, missing, has now been made) a folder private to this user (module
    docstring); with ``inside``, the same for everything directly in it."""
    path = os.path.abspath(path)
    if not _made(path) or not (_safe_route(path) and _private(path, follow=True)):
        return False
    if not inside:
        return True
    try:
        entries = list(os.scandir(path))
    except OSError:
        return False
    return all(
        _private(entry.path, follow=False)
        for entry in entries
        if not entry.is_file(follow_symlinks=False)
    )


def _made(path: str) -> bool:
    """``path`` exists, or has been made, each missing folder with mode 700."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent
    try:
        for folder in reversed(missing):
            os.mkdir(folder, mode=0o700)
    except FileExistsError:
        pass  # made meanwhile by someone else: the checks that follow decide
    except OSError:
        return False
    return True


def _private(path: str, *, follow: bool) -> bool:
    """A folder of this user, which this user may write and no other user may; with ``follow``
    reached through a link (``_safe_route`` checks who owns the link), else not a link."""
    try:
        info = os.stat(path) if follow else os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.getuid()
        and not info.st_mode & stat.S_IWOTH
        and (not info.st_mode & stat.S_IWGRP or _own_group(info.st_gid))
        and os.access(path, os.W_OK | os.X_OK)
    )


def _safe_route(path: str) -> bool:
    """Every folder above ``path``, and every link on the way to it, belongs to root or this user,
    and a folder that others may write has the sticky bit: no one else can move ``path``."""
    uid = os.getuid()
    for part in [*_ancestors(path), *_ancestors(os.path.realpath(path))]:
        try:
            info = os.lstat(part)
        except OSError:
            return False
        if info.st_uid not in (0, uid):
            return False
        if stat.S_ISDIR(info.st_mode) and not _guarded(info):
            return False
    return True


def _guarded(info: os.stat_result) -> bool:
    """No one else may rename what is in this folder: only its owner may write it (or its
    owner's own group), or it has the sticky bit."""
    if info.st_mode & stat.S_ISVTX or not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return True
    return not info.st_mode & stat.S_IWOTH and _own_group(info.st_gid)


def _ancestors(path: str) -> list[str]:
    """The folders above ``path`` (absolute), and ``path`` itself if it is a link."""
    parts, current = [], path
    while True:
        parent = os.path.dirname(current)
        if parent == current:
            break
        parts.append(parent)
        current = parent
    return [path, *parts] if os.path.islink(path) else parts


def _own_group(gid: int) -> bool:
    """Whether group ``gid`` is this user's own: named after the user, with no other member."""
    import grp
    import pwd

    try:
        user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(gid)
    except KeyError:
        return False
    return group.gr_name == user and set(group.gr_mem) <= {user}
