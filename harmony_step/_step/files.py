"""The step's files: read only what Harmony needs from an h5ad file, check and write outputs atomically.

Reading opens the file with h5py and decodes just ``obsm/<basis>``, the requested ``obs`` columns
and the ``obs`` index with anndata's element reader, so ``X``, layers and everything else are never
loaded: a million-cell file with a many-gigabyte ``X`` costs only the size of its embedding.

Every output is first written to a hidden temporary file next to its destination and renamed
onto it only when all outputs of the run are complete (:class:`StagedOutputs`), so readers never
see a partial file and a failed or interrupted run leaves no output behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import h5py
    from anndata import AnnData


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
    path: str | os.PathLike[str], basis: str, columns: Sequence[str]
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

    Raises
    ------
    KeyError
        The basis or a column is missing; the message lists what the file has.
    ValueError
        The embedding is not 2-D or its row count differs from ``obs`` (:class:`H5adError` for a
        file that is not a readable h5ad).
    """
    import anndata

    with open_h5ad(path) as handle:
        try:
            obs = _read_obs(handle, list(dict.fromkeys(columns)), path)
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


def _read_obs(handle: h5py.File, columns: list[str], path: Any) -> Any:
    import pandas as pd
    from anndata.io import read_elem

    obs = _group(handle, "obs", path)
    index_name = obs.attrs.get("_index", "_index")
    available = [name for name in obs if name != index_name and name != "__categories"]
    missing = [c for c in columns if c not in available]
    if missing:
        raise KeyError(
            f"Column(s) {missing} are not in obs of {str(path)!r}. Available columns: {available}. "
            "Pass existing columns with --key / --label-key."
        )
    index = read_elem(obs[index_name]) if index_name in obs else None
    data = {name: read_elem(obs[name]) for name in columns}
    frame = pd.DataFrame(data, index=None if index is None else pd.Index(index).astype(str))
    if index is None:
        frame.index = frame.index.astype(str)
    return frame


def _read_embedding(handle: h5py.File, basis: str, n_obs: int, path: Any) -> Any:
    from anndata.io import read_elem

    obsm = _group(handle, "obsm", path)
    if basis not in obsm:
        raise KeyError(
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
    try:
        descriptor, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".probe")
    except OSError as err:
        raise type(err)(
            err.errno, f"Cannot write {what} into folder {str(folder)!r}: {err.strerror}"
        ) from err
    os.close(descriptor)
    os.unlink(probe)


def check_paths(input_path: Path, outputs: Mapping[str, Path]) -> None:
    """Fail before any work when the input is missing or an output cannot be written.

    Parameters
    ----------
    input_path
        The file the run reads.
    outputs
        The files the run writes, by role ("output", "summary", ...), as named in messages.

    Raises
    ------
    FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError
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


# --- writing -------------------------------------------------------------------------------------


class StagedOutputs:
    """Temporary files that become the real outputs together, or not at all.

    Use as a context manager: :meth:`temporary` hands out a hidden temporary path next to each
    destination; :meth:`commit` flushes them to disk and renames each onto its destination. If the
    block raises (or :meth:`commit` is never reached), every temporary file is removed.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []
        # mkstemp creates files readable by the owner only; outputs get the usual umask mode
        umask = os.umask(0)
        os.umask(umask)
        self._mode = 0o666 & ~umask

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()

    def temporary(self, destination: str | os.PathLike[str]) -> Path:
        """A new empty temporary file in the destination's folder, renamed onto it at commit."""
        destination = Path(destination)
        # SIGTERM is held back until the new file is registered, so a run terminated right here
        # still finds it and removes it.
        with _sigterm_deferred():
            descriptor, name = tempfile.mkstemp(
                dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp"
            )
            self._pending.append((Path(name), destination))
        os.close(descriptor)
        os.chmod(name, self._mode)
        return Path(name)

    def commit(self) -> None:
        """fsync every temporary file, rename each onto its destination, then fsync the folders."""
        for temporary, _ in self._pending:
            _fsync_path(temporary)
        for temporary, destination in self._pending:
            os.replace(temporary, destination)
        for folder in {destination.parent for _, destination in self._pending}:
            _fsync_folder(folder)
        self._pending.clear()

    def discard(self) -> None:
        """Remove every temporary file not yet committed."""
        for temporary, _ in self._pending:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        self._pending.clear()


@contextlib.contextmanager
def _sigterm_deferred():
    """Block SIGTERM in this thread for the duration; a pending one is delivered on exit."""
    blocked = {signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
    import h5py
    from anndata.io import write_elem

    shutil.copyfile(source, target)
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
