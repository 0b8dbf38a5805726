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
write has the sticky bit, as ``/tmp``; in a user namespace without root, as Apptainer's default,
root's folders show the overflow uid and are taken as root's where they cannot be another user's
shared folder), and for numba what lies directly in it is this user's too.
A missing folder is created with mode 700. Otherwise the variable is pointed, for this process and
those it starts, at the first private one of ``<folder>-<uid>`` beside it,
``harmony-step-<uid>/<name>`` in the temporary folder, and a new folder of a random name there
(removed when the run ends). If even that fails the variable is removed, so that the library's own
default applies. Nothing changes where the variable is unset, and nothing here raises.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import shutil
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
        temporary = tempfile.mkdtemp(prefix=f"harmony-step-{os.getuid()}-")  # private as made
    except (OSError, ValueError):  # no temporary folder, a path that cannot be looked at
        return None
    atexit.register(_remove_if_mine, temporary, os.getpid())
    return temporary


def _remove_if_mine(folder: str, pid: int) -> None:
    """Remove a run's own cache folder at its exit (not in the processes it started)."""
    if os.getpid() == pid:
        shutil.rmtree(folder, ignore_errors=True)


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
    made = _made(path)
    usable = made is not None and _safe_route(path) and _private(path, follow=True)
    if usable and (not inside or _private_inside(path)):
        return True
    for folder in made or []:  # leave nothing behind where the folder is not used
        with contextlib.suppress(OSError):
            os.rmdir(folder)
    return False


def _private_inside(path: str) -> bool:
    """What lies directly in ``path`` (numba's folder) is this user's: no links, no folders of
    others; in a folder that others cannot enter, this user's is enough, whatever its mode (numba
    makes its folders with the umask, group-writable under umask 002)."""
    closed = not os.stat(path).st_mode & 0o077
    try:
        entries = [entry for entry in os.scandir(path) if not entry.is_file(follow_symlinks=False)]
    except OSError:
        return False
    for entry in entries:
        info = entry.stat(follow_symlinks=False)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return False
        if not closed and not _private(entry.path, follow=False):
            return False
    return True


def _made(path: str) -> list[str] | None:
    """``path`` exists, or has been made, each missing folder with mode 700: the folders made,
    innermost first; None if it could not be made."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    made = []
    try:
        for folder in reversed(missing):
            os.mkdir(folder, mode=0o700)
            made.insert(0, folder)
    except FileExistsError:
        pass  # made meanwhile by someone else: the checks that follow decide
    except OSError:
        for folder in made:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        return None
    return made


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
        if info.st_uid != uid and not _root_like(info, part):
            return False
        if stat.S_ISDIR(info.st_mode) and not _guarded(info):
            return False
    return True


def _root_like(info: os.stat_result, path: str) -> bool:
    """Owned by root; or, in a user namespace without root (Apptainer's default), by the
    overflow uid that stands for every unmapped owner, where that cannot be someone else's
    shared folder: not writable by others, or a public temporary folder (/tmp, ...)."""
    if info.st_uid == 0:
        return True
    if info.st_uid != _overflow_uid() or _root_mapped():
        return False
    return not info.st_mode & stat.S_IWOTH or os.path.realpath(path) in _PUBLIC_TEMPORARY


_PUBLIC_TEMPORARY = frozenset({"/tmp", "/var/tmp", "/dev/shm"})


@functools.cache
def _overflow_uid() -> int:
    try:
        with open("/proc/sys/kernel/overflowuid") as stream:
            return int(stream.read())
    except (OSError, ValueError):
        return 65534


@functools.cache
def _root_mapped() -> bool:
    """Whether uid 0 outside is mapped into this process's user namespace (always, outside one)."""
    try:
        with open("/proc/self/uid_map") as stream:
            ranges = [tuple(map(int, line.split())) for line in stream if line.strip()]
    except (OSError, ValueError):
        return True
    return any(outside <= 0 < outside + count for _, outside, count in ranges)


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
