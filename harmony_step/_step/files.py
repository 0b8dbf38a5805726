"""The step's files: read only what Harmony needs from an h5ad file, check and write outputs atomically.

Reading opens the file with h5py and decodes just ``obsm/<basis>``, the requested ``obs`` columns
and, when the output needs the cell names, the ``obs`` index, with anndata's element reader, so
``X``, layers and everything else are never loaded: a million-cell file with a many-gigabyte ``X``
costs only the size of its embedding. A full output is a byte copy of the input file (the kernel
copies it, nothing is decoded) with the results added; :func:`copy_input` can run while Harmony
computes.

Every output is first written to a hidden temporary file next to its destination and renamed
onto it only when all outputs of the run are complete (:class:`StagedOutputs`), so readers never
see a partial file and a failed or interrupted run leaves no output behind. A run killed outright
(``kill -9``, the out-of-memory killer) cannot remove its temporary file; the file's name says
which output, host and process it belongs to, and the next run for that output removes it
(:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np

from harmony_step._errors import MissingBasisError, MissingColumnError
from harmony_step._step.progress import PROGRESS_LOGGER

if TYPE_CHECKING:
    import h5py
    from anndata import AnnData

progress_log = logging.getLogger(PROGRESS_LOGGER)


class H5adError(ValueError):
    """The input is not a readable h5ad file (not HDF5, truncated, or not in the AnnData layout)."""


# --- reading -------------------------------------------------------------------------------------


@contextlib.contextmanager
def open_h5ad(path: str | os.PathLike[str]) -> Iterator[h5py.File]:
    """Open an h5ad file read-only, turning "not HDF5" and "truncated" into :class:`H5adError`.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    IsADirectoryError
        ``path`` is a folder.
    H5adError
        The file is not HDF5 or is damaged.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Input file {str(path)!r} does not exist.")
    if path.is_dir():
        raise IsADirectoryError(f"Input {str(path)!r} is a folder; pass an .h5ad file.")
    with path.open("rb"):  # a PermissionError here is clearer than h5py's
        pass
    if not h5py.is_hdf5(path):
        raise H5adError(f"Input {str(path)!r} is not an HDF5 file, so it cannot be an h5ad file.")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:  # h5py reports truncation and damaged metadata as OSError
        raise H5adError(
            f"Input {str(path)!r} cannot be opened as HDF5 ({err}); it may be truncated or damaged. "
            "Write it again from the original data."
        ) from err
    with handle:
        yield handle


def read_harmony_inputs(
    path: str | os.PathLike[str],
    basis: str,
    columns: Sequence[str],
    *,
    cell_names: bool = True,
) -> AnnData:
    """A small AnnData with the ``obs`` index, the ``columns`` of ``obs`` and ``obsm[basis]``; no ``X``.

    Parameters
    ----------
    path
        The h5ad file.
    basis
        ``obsm`` key of the embedding, shape (n_cells, n_pcs).
    columns
        ``obs`` columns to read (batch keys and labels); repeated names are read once.
    cell_names
        Read the ``obs`` index; without it the cells are named by position ("0", "1", ...),
        which is all that a run whose output is a copy of the input needs (a million names take
        about half a second to decode).

    Raises
    ------
    MissingBasisError, MissingColumnError
        The basis or a column is missing (each a ``KeyError`` and a ``ValueError``); the message
        lists what the file has.
    ValueError
        The embedding is not 2-D or its row count differs from ``obs`` (:class:`H5adError` for a
        file that is not a readable h5ad).
    """
    import anndata

    with open_h5ad(path) as handle:
        try:
            obs = _read_obs(handle, list(dict.fromkeys(columns)), path, cell_names)
            embedding = _read_embedding(handle, basis, len(obs), path)
        except OSError as err:  # the header opened but data blocks are missing: a cut-off file
            raise H5adError(
                f"Input {str(path)!r} could not be read ({err}); it may be truncated or damaged."
            ) from err
    return anndata.AnnData(obs=obs, obsm={basis: embedding})


def _group(handle: h5py.File, name: str, path: Any) -> h5py.Group:
    import h5py

    element = handle.get(name)
    if not isinstance(element, h5py.Group):
        what = "has no" if element is None else "has an old-format (anndata < 0.7)"
        raise H5adError(
            f"Input {str(path)!r} {what} '{name}' group, so it is not an h5ad file this program can "
            "read. Save it with anndata >= 0.8 (adata.write_h5ad)."
        )
    return element


def _read_obs(handle: h5py.File, columns: list[str], path: Any, cell_names: bool) -> Any:
    import pandas as pd
    from anndata.io import read_elem

    obs = _group(handle, "obs", path)
    index_name = obs.attrs.get("_index", "_index")
    available = [name for name in obs if name != index_name and name != "__categories"]
    missing = [c for c in columns if c not in available]
    if missing:
        raise MissingColumnError(
            f"Column(s) {missing} are not in obs of {str(path)!r}. Available columns: {available}. "
            "Pass existing columns with --key / --label-key."
        )
    index = read_elem(obs[index_name]) if cell_names and index_name in obs else None
    data = {name: read_elem(obs[name]) for name in columns}
    frame = pd.DataFrame(data, index=None if index is None else pd.Index(index).astype(str))
    if index is None:
        frame.index = frame.index.astype(str)
    return frame


def _read_embedding(handle: h5py.File, basis: str, n_obs: int, path: Any) -> Any:
    from anndata.io import read_elem

    obsm = _group(handle, "obsm", path)
    if basis not in obsm:
        raise MissingBasisError(
            f"Basis {basis!r} is not in obsm of {str(path)!r}. Available keys: {list(obsm)}. "
            "Run PCA first or pass --basis <key>."
        )
    embedding = read_elem(obsm[basis])
    shape = tuple(embedding.shape)
    if len(shape) != 2:
        raise ValueError(
            f"obsm[{basis!r}] of {str(path)!r} must be 2-D (n_cells, n_pcs). Got shape {shape}."
        )
    if shape[0] != n_obs:
        raise ValueError(
            f"obsm[{basis!r}] of {str(path)!r} has {shape[0]} rows but obs has {n_obs} cells."
        )
    return embedding


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in blocks so memory stays flat for any file size."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


# --- checking destinations before any work ------------------------------------------------------


def check_output_path(path: str | os.PathLike[str], what: str) -> None:
    """Fail early unless ``path`` can be created: its folder exists and a file can be written there.

    The test writes and removes a real temporary file, which is the only check that also holds for
    root, ACLs, read-only mounts and full quotas.

    Raises
    ------
    FileNotFoundError
        The folder does not exist.
    NotADirectoryError
        The folder is a file.
    IsADirectoryError
        ``path`` itself is a folder.
    FileExistsError
        ``path`` exists and is not a regular file (a device, a pipe, a socket, a link).
    PermissionError, OSError
        The folder is not writable.
    """
    path = Path(path)
    folder = path.parent
    if not folder.exists():
        raise FileNotFoundError(
            f"The folder of {what} {str(path)!r} does not exist; create {str(folder)!r} first."
        )
    if not folder.is_dir():
        raise NotADirectoryError(
            f"The folder of {what} {str(path)!r} is not a folder: {str(folder)!r}."
        )
    if path.is_dir():
        raise IsADirectoryError(f"{what.capitalize()} {str(path)!r} is a folder; pass a file name.")
    refuse_non_regular(path, what)
    with interruptions_deferred():  # the probe never outlives the check
        try:
            descriptor, probe = tempfile.mkstemp(
                dir=folder, prefix=_temporary_prefix(path), suffix=".probe"
            )
        except OSError as err:
            raise type(err)(
                err.errno, f"Cannot write {what} into folder {str(folder)!r}: {err.strerror}"
            ) from err
        os.close(descriptor)
        os.unlink(probe)


def check_paths(input_path: Path, outputs: Mapping[str, Path]) -> None:
    """Fail before any work when the input is missing or an output cannot be written; then remove
    the temporary files that killed earlier runs left for each output
    (:func:`remove_stale_temporaries`).

    Parameters
    ----------
    input_path
        The file the run reads.
    outputs
        The files the run writes, by role ("output", "summary", ...), as named in messages.

    Raises
    ------
    FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError
        See :func:`check_output_path`.
    ValueError
        An output is the input file, or two outputs share a path.
    """
    if not input_path.exists():
        raise FileNotFoundError(f"Input file {str(input_path)!r} does not exist.")
    seen: dict[Path, str] = {}
    for role, path in outputs.items():
        resolved = path.resolve()
        if resolved == input_path.resolve():
            raise ValueError(
                f"The {role} {str(path)!r} is the input file; the input is never modified, "
                "choose another file name."
            )
        if resolved in seen:
            raise ValueError(
                f"The {seen[resolved]} and the {role} are the same file {str(path)!r}."
            )
        seen[resolved] = role
        check_output_path(path, role)
        remove_stale_temporaries(path)


def refuse_non_regular(path: Path, what: str) -> None:
    """Raise :class:`FileExistsError` when ``path`` exists and is not a regular file.

    The final rename would replace whatever is there: a device such as ``/dev/null`` (when run as
    root), a named pipe another program reads, or a symbolic link (the link, not its target).
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        return
    kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
    raise FileExistsError(
        errno.EEXIST,
        f"{what.capitalize()} {str(path)!r} exists and is {kind}; outputs replace the path by "
        "renaming, which would replace it. Pass the path of a regular file.",
    )


_FILE_KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link (the link itself would be replaced, not its target)",
    stat.S_IFDIR: "a folder",
}

# Outputs that are not the h5ad file (convergence table, plot, summary) stay well below this.
REPORT_BYTES_ESTIMATE = 1 << 20
# Added to every estimate: HDF5 metadata, uns['harmony'], obs index of the copy, file-system slack.
_SIZE_MARGIN_BYTES = 16 << 20
_SIZE_MARGIN_FRACTION = 0.05


def estimated_h5ad_bytes(
    input_path: str | os.PathLike[str],
    n_cells: int,
    n_pcs: int,
    itemsize: int,
    *,
    embedding_only: bool,
    basis_itemsize: int = 8,
) -> int:
    """An upper estimate of the output h5ad's size.

    A full output is a copy of the input plus the corrected embedding; an embedding-only output
    holds the basis, the corrected embedding and ``obs`` (index and key columns).
    """
    embedding = n_cells * n_pcs * itemsize
    if embedding_only:
        size = n_cells * n_pcs * basis_itemsize + embedding + n_cells * 64
    else:
        size = Path(input_path).stat().st_size + embedding
    return int(size * (1 + _SIZE_MARGIN_FRACTION)) + _SIZE_MARGIN_BYTES


def check_free_space(needs: Mapping[Path, int]) -> None:
    """Fail before any work when the file systems of the outputs lack the space they will take.

    Parameters
    ----------
    needs
        Estimated bytes per output path; outputs on the same file system are added up.

    Raises
    ------
    OSError
        ``ENOSPC``, naming the outputs, the space needed and the space free.
    """
    by_device: dict[int, tuple[Path, int, list[Path]]] = {}
    for path, size in needs.items():
        folder = Path(path).parent
        device = folder.stat().st_dev
        first, total, paths = by_device.get(device, (folder, 0, []))
        by_device[device] = (first, total + size, [*paths, Path(path)])
    for folder, total, paths in by_device.values():
        free = shutil.disk_usage(folder).free
        if free < total:
            names = ", ".join(repr(str(p)) for p in paths)
            raise OSError(
                errno.ENOSPC,
                f"Not enough free space for {names}: about {_gigabytes(total)} needed, "
                f"{_gigabytes(free)} free in {str(folder)!r}. Free some space or write the "
                "outputs to another folder.",
            )


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


# --- temporary files of killed runs --------------------------------------------------------------

# Temporary outputs are named ".<output name>.harmony-step.<pid>.<pid namespace>@<host>.<random>"
# with the suffix ".tmp" (or ".probe" for the writability check), so a later run can tell its
# own output's leftovers from everything else and check whether the process that made them lives.
_TEMPORARY_TAG = "harmony-step"
# A leftover from another host (or container) cannot be checked for a live process; it is removed
# only when it has not been written to for this long (a live run writes its outputs in minutes).
FOREIGN_STALE_SECONDS = 24 * 3600


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64] or "host"


def _pid_namespace() -> int:
    """Processes are comparable only within one PID namespace (containers have their own)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _temporary_prefix(destination: Path) -> str:
    return f".{destination.name}.{_TEMPORARY_TAG}.{os.getpid()}.{_pid_namespace()}@{_host_tag()}."


def _temporary_pattern(destination: Path) -> re.Pattern[str]:
    return re.compile(
        rf"\.{re.escape(destination.name)}\.{_TEMPORARY_TAG}\.(\d+)\.(\d+)@(.+)\.[A-Za-z0-9_]+"
        r"\.(?:tmp|probe)"
    )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists but belongs to another user
        return True
    return True


def _is_stale(match: re.Match[str], path: Path) -> bool:
    pid, namespace, host = int(match[1]), int(match[2]), match[3]
    if host == _host_tag() and namespace == _pid_namespace():
        return pid != os.getpid() and not _process_alive(pid)
    try:
        return time.time() - path.lstat().st_mtime > FOREIGN_STALE_SECONDS
    except FileNotFoundError:
        return False


def remove_stale_temporaries(destination: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary files that killed earlier runs left for ``destination``; log each one.

    Only files named as this program names the temporaries of this very output are considered,
    and of those only the ones whose process is gone (same host and PID namespace) or, from
    another host, that nobody has written to for :data:`FOREIGN_STALE_SECONDS`.

    Returns
    -------
    The removed paths.
    """
    destination = Path(destination)
    pattern = _temporary_pattern(destination)
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(destination.parent):
            match = pattern.fullmatch(entry.name)
            if match is None or not entry.is_file(follow_symlinks=False):
                continue
            path = Path(entry.path)
            if not _is_stale(match, path):
                continue
            size = entry.stat(follow_symlinks=False).st_size
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
                progress_log.info(
                    "removed %s (%s), left by an earlier run for %s that was killed",
                    path,
                    _gigabytes(size),
                    destination,
                )
    return removed


# --- writing -------------------------------------------------------------------------------------

# Errors that come from writing, whichever file name the library that raised them gives.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})


class OutputWriteError(OSError):
    """Writing an output failed; the message names the output, not a temporary or input file."""


class StagedOutputs:
    """Temporary files that become the real outputs together, or not at all.

    Use as a context manager: :meth:`temporary` hands out a hidden temporary path next to each
    destination; :meth:`commit` flushes them to disk and renames each onto its destination. If the
    block raises (or :meth:`commit` is never reached), every temporary file is removed.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []
        self.committed = False  # every output in place
        # mkstemp creates files readable by the owner only; outputs get the usual umask mode
        umask = os.umask(0)
        os.umask(umask)
        self._mode = 0o666 & ~umask

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, exc_type: object, error: BaseException | None, tb: object) -> None:
        destination = self._destination_of(error)
        with interruptions_deferred():  # a second SIGTERM must not cut the clean-up short
            self.discard()
        if destination is not None:
            assert isinstance(error, OSError)
            detail = (error.strerror or str(error)).rstrip(".")
            raise OutputWriteError(
                error.errno or errno.EIO,
                f"Cannot write {str(destination)!r}: {detail}. Check the space and permissions "
                f"of {str(destination.parent)!r}, or write the output elsewhere.",
            ) from error

    def _destination_of(self, error: BaseException | None) -> Path | None:
        """The output that ``error`` stopped from being written, or None if it is no write error."""
        if not isinstance(error, OSError) or isinstance(error, OutputWriteError):
            return None
        if not self._pending:
            return None
        named = {str(p) for p in (error.filename, error.filename2) if p is not None}
        for temporary, destination in self._pending:
            if {str(temporary), str(destination)} & named:
                return destination
        if error.errno is None or error.errno in _WRITE_ERRNOS:
            return self._pending[-1][1]  # the one being written
        return None

    def temporary(self, destination: str | os.PathLike[str]) -> Path:
        """A new empty temporary file in the destination's folder, renamed onto it at commit."""
        destination = Path(destination)
        # SIGTERM and Ctrl-C are held back until the new file is registered, so a run stopped
        # right here still finds it and removes it.
        with interruptions_deferred():
            descriptor, name = tempfile.mkstemp(
                dir=destination.parent, prefix=_temporary_prefix(destination), suffix=".tmp"
            )
            self._pending.append((Path(name), destination))
        os.close(descriptor)
        os.chmod(name, self._mode)
        return Path(name)

    def commit(self) -> None:
        """fsync every temporary file, rename each onto its destination, then fsync the folders.

        SIGTERM and Ctrl-C are held back meanwhile, so that all outputs appear or none; one that
        arrived is acted on after the last rename.
        """
        with interruptions_deferred():
            self._commit()

    def _commit(self) -> None:
        for temporary, destination in self._pending:
            _fsync_path(temporary)
            refuse_non_regular(destination, "output")  # it may have appeared since the check
        for temporary, destination in self._pending:
            _rename(temporary, destination)
        for folder in {destination.parent for _, destination in self._pending}:
            _fsync_folder(folder)
        self._pending.clear()
        self.committed = True

    def discard(self) -> None:
        """Remove every temporary file not yet committed."""
        for temporary, _ in self._pending:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        self._pending.clear()


# Signals whose Python handlers end a run early: the command's SIGTERM handler and Ctrl-C's.
_INTERRUPTIONS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def interruptions_deferred() -> Iterator[None]:
    """Hold back the Python handlers of SIGTERM and SIGINT for the duration; each signal that
    arrived meanwhile then runs its handler once, in the order they came.

    Blocking the signals in this thread would not do: the kernel may deliver them to any other
    thread (BLAS, numba, a background copy), and Python then runs the handler in the main thread
    all the same. Python runs handlers only in the main thread, so in any other this does nothing;
    a handler installed outside Python (``signal.getsignal`` gives None) is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {number: signal.getsignal(number) for number in _INTERRUPTIONS}
    held = {number: handler for number, handler in handlers.items() if handler is not None}
    arrived: dict[int, FrameType | None] = {}  # first arrival of each, in order
    swapped = []
    try:  # a signal between two swaps still finds every swapped handler put back
        for number in held:
            signal.signal(number, lambda signum, frame: arrived.setdefault(signum, frame))
            swapped.append(number)
        yield
    finally:
        for number in swapped:
            signal.signal(number, held[number])
        for number, frame in arrived.items():
            _deliver(number, held[number], frame)


def _deliver(number: int, handler: Any, frame: FrameType | None) -> None:
    """Act on a held-back signal as ``handler`` (what signal.getsignal returned) would have."""
    if callable(handler):
        handler(number, frame)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(number)  # the default action: the process ends


def _rename(temporary: Path, destination: Path) -> None:
    """One output into place (atomic within a file system)."""
    os.replace(temporary, destination)


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as stream:
        os.fsync(stream.fileno())


def _fsync_folder(folder: Path) -> None:
    # Makes the renames durable; some file systems do not support it on folders, which is harmless.
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_into_copy(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    obsm: dict[str, np.ndarray],
    uns: dict[str, Any],
) -> None:
    """Copy the h5ad ``source`` to ``target`` and add or replace ``obsm`` and ``uns`` entries there.

    Everything else in the file (``X``, layers, other annotations) is copied byte for byte without
    being decoded, so memory use does not depend on the size of ``X``.
    """
    copy_input(source, target)
    add_results(target, obsm, uns)


COPY_CHUNK_BYTES = 1 << 26
"""Bytes per step of :func:`copy_input`: a stop takes effect within one (64 MiB, some 50 ms)."""


class CopyStopped(Exception):
    """:func:`copy_input` was asked to stop before it finished."""


def copy_input(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    stop: threading.Event | None = None,
) -> Path:
    """Copy the file ``source`` to ``target`` byte for byte and flush it to disk; returns ``target``.

    The kernel moves the bytes (``os.sendfile``), at the speed of the page cache and the disk,
    without the GIL, in steps of :data:`COPY_CHUNK_BYTES`; the flush here, which a run does while
    Harmony computes, leaves little for the flush at commit. When ``stop`` is set the copy ends at
    the next step with :class:`CopyStopped`, so that a stopped run need not wait for all of it.
    """
    if os.path.lexists(target) and os.path.samefile(source, target):
        raise shutil.SameFileError(f"{str(source)!r} and {str(target)!r} are the same file")
    with open(source, "rb", buffering=0) as reader, open(target, "wb", buffering=0) as writer:
        offset = 0
        while True:  # to the end of the file, also if it grows meanwhile
            _check_stop(stop, source)
            try:
                sent = _copy_chunk(reader, writer, offset, COPY_CHUNK_BYTES)
            except OSError as err:
                err.filename, err.filename2 = err.filename or str(source), str(target)
                raise
            if sent == 0:
                break
            offset += sent
        _check_stop(stop, source)  # before a flush that may take long
        os.fsync(writer.fileno())
    return Path(target)


def _check_stop(stop: threading.Event | None, source: str | os.PathLike[str]) -> None:
    if stop is not None and stop.is_set():
        raise CopyStopped(f"copy of {str(source)!r} stopped")


def _copy_chunk(reader: Any, writer: Any, offset: int, count: int) -> int:
    """Up to ``count`` bytes from ``offset`` of ``reader`` appended to ``writer``; the bytes
    moved (``sendfile``, or a read and a write where the file system cannot)."""
    try:
        return os.sendfile(writer.fileno(), reader.fileno(), offset, count)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSOCK):
            raise
    reader.seek(offset)
    data = reader.read(count)
    return writer.write(data) if data else 0  # unbuffered: may write less, the rest comes next


def add_results(
    target: str | os.PathLike[str], obsm: dict[str, np.ndarray], uns: dict[str, Any]
) -> None:
    """Add or replace ``obsm`` and ``uns`` entries in the h5ad file ``target``, in place."""
    import h5py
    from anndata.io import write_elem

    with h5py.File(target, "r+") as handle:
        for group in ("obsm", "uns"):
            if group not in handle:
                write_elem(handle, group, {})
        for name, value in obsm.items():
            _replace(handle["obsm"], name, value, write_elem)
        for name, value in uns.items():
            _replace(handle["uns"], name, value, write_elem)
        handle.flush()


def _replace(group: h5py.Group, name: str, value: Any, write_elem: Any) -> None:
    if name in group:
        del group[name]
    write_elem(group, name, value)


def write_small_h5ad(target: str | os.PathLike[str], adata: AnnData) -> None:
    """Write ``adata`` (no ``X``: ``obs``, ``obsm`` and ``uns``) as an h5ad file."""
    adata.write_h5ad(target)


def write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 text."""
    Path(target).write_text(text, encoding="utf-8")
