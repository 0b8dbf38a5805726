"""h5ad reading of only the needed parts, staged atomic writes, copies with added results."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from anndata.io import write_elem

from harmony_step._errors import MissingBasisError, MissingColumnError
from harmony_step._step import files
from harmony_step._step.files import (
    FOREIGN_STALE_SECONDS,
    H5adError,
    OutputWriteError,
    StagedOutputs,
    check_free_space,
    check_output_path,
    estimated_h5ad_bytes,
    interruptions_deferred,
    read_harmony_inputs,
    remove_stale_temporaries,
    sha256_file,
    write_into_copy,
    write_small_h5ad,
)


@pytest.fixture(scope="module")
def pbmc(data_dir) -> Path:
    return data_dir / "pbmc_3500" / "pbmc_3500.h5ad"


def _write(path: Path, n_cells: int = 50, *, basis=None, obs=None, with_x: bool = True) -> Path:
    """A small real h5ad file with an X, obs columns 'batch' and 'kind', and obsm['X_pca']."""
    rng = np.random.default_rng(0)
    frame = obs
    if frame is None:
        frame = pd.DataFrame(
            {
                "batch": pd.Categorical(rng.choice(["a", "b"], n_cells)),
                "kind": rng.choice(["t", "b"], n_cells),
            },
            index=[f"cell{i}" for i in range(n_cells)],
        )
    x = rng.normal(size=(n_cells, 7)).astype(np.float32) if with_x else None
    obsm = {"X_pca": rng.normal(size=(n_cells, 5)) if basis is None else basis}
    ad.AnnData(X=x, obs=frame, obsm=obsm).write_h5ad(path)
    return path


# --- reading -------------------------------------------------------------------------------------


def test_reads_only_the_basis_and_the_requested_columns(pbmc):
    adata = read_harmony_inputs(pbmc, "X_pca", ["donor", "donor"])
    assert adata.X is None
    assert list(adata.obs.columns) == ["donor"]
    assert list(adata.obsm.keys()) == ["X_pca"]
    full = ad.read_h5ad(pbmc)
    np.testing.assert_array_equal(adata.obsm["X_pca"], full.obsm["X_pca"])
    assert list(adata.obs_names) == list(full.obs_names)
    assert adata.obs["donor"].equals(full.obs["donor"])


def test_reads_string_and_categorical_columns(tmp_path):
    path = _write(tmp_path / "in.h5ad")
    adata = read_harmony_inputs(path, "X_pca", ["batch", "kind"])
    assert isinstance(adata.obs["batch"].dtype, pd.CategoricalDtype)
    assert set(adata.obs["kind"]) <= {"t", "b"}
    assert adata.obs_names[0] == "cell0"


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_harmony_inputs(tmp_path / "absent.h5ad", "X_pca", ["batch"])


def test_text_file_is_not_hdf5(tmp_path):
    path = tmp_path / "text.h5ad"
    path.write_text("cell,batch\n1,a\n")
    with pytest.raises(H5adError, match="not an HDF5 file"):
        read_harmony_inputs(path, "X_pca", ["batch"])


def test_truncated_file_is_reported_as_truncated(tmp_path, pbmc):
    path = tmp_path / "cut.h5ad"
    path.write_bytes(pbmc.read_bytes()[:100_000])
    with pytest.raises(H5adError, match="truncated"):
        read_harmony_inputs(path, "X_pca", ["donor"])


def test_hdf5_file_without_anndata_layout_is_rejected(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as handle:
        handle["numbers"] = np.arange(3)
    with pytest.raises(H5adError, match="no 'obs' group"):
        read_harmony_inputs(path, "X_pca", ["batch"])


def test_missing_basis_lists_available_keys(tmp_path):
    path = _write(tmp_path / "in.h5ad")
    with pytest.raises(KeyError, match=r"'X_umap' is not in obsm.*\['X_pca'\]"):
        read_harmony_inputs(path, "X_umap", ["batch"])


def test_missing_column_lists_available_columns(tmp_path):
    path = _write(tmp_path / "in.h5ad")
    with pytest.raises(KeyError, match=r"\['donor'\] are not in obs.*'batch', 'kind'"):
        read_harmony_inputs(path, "X_pca", ["batch", "donor"])


def test_one_dimensional_basis_is_rejected(tmp_path):
    path = _write(tmp_path / "in.h5ad")
    with h5py.File(path, "r+") as handle:
        del handle["obsm/X_pca"]
        write_elem(handle["obsm"], "X_pca", np.zeros(50))
    with pytest.raises(ValueError, match=r"must be 2-D .*\(50,\)"):
        read_harmony_inputs(path, "X_pca", ["batch"])


def test_basis_with_wrong_row_count_is_rejected(tmp_path):
    path = _write(tmp_path / "in.h5ad")
    with h5py.File(path, "r+") as handle:
        del handle["obsm/X_pca"]
        write_elem(handle["obsm"], "X_pca", np.zeros((49, 3)))
    with pytest.raises(ValueError, match="49 rows but obs has 50"):
        read_harmony_inputs(path, "X_pca", ["batch"])


def test_sha256_file_matches_hashlib(pbmc):
    assert sha256_file(pbmc) == hashlib.sha256(pbmc.read_bytes()).hexdigest()


# --- checking destinations -----------------------------------------------------------------------


def test_check_output_path_accepts_a_writable_folder_and_leaves_nothing(tmp_path):
    check_output_path(tmp_path / "out.h5ad", "output")
    assert list(tmp_path.iterdir()) == []


def test_check_output_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_output_path(tmp_path / "no" / "out.h5ad", "output")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        check_output_path(tmp_path / "file" / "out.h5ad", "output")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_output_path(tmp_path, "output")


def test_check_output_path_refuses_an_unwritable_folder(locked_folder):
    with pytest.raises(PermissionError, match="Cannot write output into folder"):
        check_output_path(locked_folder / "out.h5ad", "output")


# --- staged outputs ------------------------------------------------------------------------------


def test_staged_outputs_appear_together_on_commit(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    with StagedOutputs() as staged:
        staged.temporary(first).write_text("one")
        staged.temporary(second).write_text("two")
        assert not first.exists()
        assert not second.exists()
        hidden = sorted(p.name for p in tmp_path.iterdir())
        assert all(name.startswith(".") and name.endswith(".tmp") for name in hidden)
        staged.commit()
    assert first.read_text() == "one"
    assert second.read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_staged_outputs_have_umask_permissions(tmp_path):
    target = tmp_path / "a.txt"
    with StagedOutputs() as staged:
        staged.temporary(target).write_text("x")
        staged.commit()
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_staged_outputs_leave_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("previous result")

    def fail_half_way() -> None:
        with StagedOutputs() as staged:
            staged.temporary(target).write_text("half")
            staged.temporary(tmp_path / "other.txt").write_text("half")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_half_way()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    assert target.read_text() == "previous result"


class _Stopped(Exception):
    pass


def _stop(_signum, _frame):
    raise _Stopped


@pytest.fixture
def stopping_handlers():
    """SIGTERM and SIGINT raise ``_Stopped``; a thread started first, which does not block the
    signals (as BLAS, numba and the background copy do not), so the kernel may deliver them
    there: the case a signal mask in the main thread does not cover."""
    previous = {number: signal.signal(number, _stop) for number in (signal.SIGTERM, signal.SIGINT)}
    other_thread_free = threading.Event()
    other = threading.Thread(target=other_thread_free.wait)
    other.start()
    yield
    other_thread_free.set()
    other.join()
    for number, handler in previous.items():
        signal.signal(number, handler)


@pytest.mark.usefixtures("stopping_handlers")
@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("nested", [False, True], ids=["once", "nested"])
def test_a_signal_held_back_is_acted_on_when_the_section_ends(nested, number):
    reached = []

    def signalled_section() -> None:
        inner = interruptions_deferred() if nested else contextlib.nullcontext()
        with interruptions_deferred(), inner:
            os.kill(os.getpid(), number)
            os.kill(os.getpid(), number)  # twice: acted on once
            time.sleep(0.05)  # Python runs pending handlers between bytecodes, many times here
            reached.append(True)

    with pytest.raises(_Stopped):
        signalled_section()
    assert reached == [True]
    assert signal.getsignal(signal.SIGTERM) is _stop
    assert signal.getsignal(signal.SIGINT) is _stop


@pytest.mark.usefixtures("stopping_handlers")
def test_a_section_without_signals_leaves_the_handlers_as_they_were():
    with interruptions_deferred():
        pass
    assert signal.getsignal(signal.SIGTERM) is _stop
    assert signal.getsignal(signal.SIGINT) is _stop


@pytest.mark.usefixtures("stopping_handlers")
def test_a_signal_right_after_a_temporary_file_is_made_leaves_nothing(tmp_path, monkeypatch):
    made = files.tempfile.mkstemp

    def mkstemp_then_signal(*args, **kwargs):
        result = made(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp_then_signal)
    with pytest.raises(_Stopped), StagedOutputs() as staged:
        staged.temporary(tmp_path / "out.h5ad")
    with pytest.raises(_Stopped):
        check_output_path(tmp_path / "out.h5ad", "output")  # its probe file
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("stopping_handlers")
def test_a_signal_during_the_commit_lets_every_output_appear(tmp_path, monkeypatch):
    replace = files._rename
    signalled = []

    def replace_then_signal(source, destination):
        replace(source, destination)
        if not signalled:
            signalled.append(destination)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(files, "_rename", replace_then_signal)
    with StagedOutputs() as staged:
        staged.temporary(tmp_path / "a.txt").write_text("a")
        staged.temporary(tmp_path / "b.txt").write_text("b")
        with pytest.raises(_Stopped):
            staged.commit()
    assert staged.committed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


@pytest.mark.parametrize("sendfile", [True, False], ids=["sendfile", "read-write"])
def test_the_input_copy_is_byte_for_byte_in_steps(tmp_path, monkeypatch, sendfile):
    source, target = tmp_path / "in.bin", tmp_path / "out.bin"
    source.write_bytes(np.random.default_rng(0).bytes(10_000))
    monkeypatch.setattr(files, "COPY_CHUNK_BYTES", 3000)  # four steps, the last one short
    if not sendfile:  # a file system without sendfile between files

        def unsupported(*args):
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr(files.os, "sendfile", unsupported)
    assert files.copy_input(source, target) == target
    assert target.read_bytes() == source.read_bytes()


def test_a_stopped_copy_ends_at_its_next_step(tmp_path, monkeypatch):
    source, target = tmp_path / "in.bin", tmp_path / "out.bin"
    source.write_bytes(b"x" * 10_000)
    monkeypatch.setattr(files, "COPY_CHUNK_BYTES", 1000)
    stop = threading.Event()
    copy_chunk = files._copy_chunk

    def stop_after_the_second(reader, writer, offset, count):
        if offset >= 1000:
            stop.set()
        return copy_chunk(reader, writer, offset, count)

    monkeypatch.setattr(files, "_copy_chunk", stop_after_the_second)
    with pytest.raises(files.CopyStopped):
        files.copy_input(source, target, stop)
    assert target.stat().st_size == 2000


# --- writing results -----------------------------------------------------------------------------


def test_write_into_copy_adds_results_and_keeps_everything_else(tmp_path):
    source = _write(tmp_path / "in.h5ad")
    before = sha256_file(source)
    corrected = np.arange(250, dtype=np.float64).reshape(50, 5)
    uns = {"converged": True, "none_value": "none", "table": {"x": np.arange(3)}}
    target = tmp_path / "out.h5ad"
    write_into_copy(source, target, {"X_pca_harmony": corrected}, {"harmony": uns})
    assert sha256_file(source) == before
    original, result = ad.read_h5ad(source), ad.read_h5ad(target)
    np.testing.assert_array_equal(result.X, original.X)
    np.testing.assert_array_equal(result.obsm["X_pca"], original.obsm["X_pca"])
    np.testing.assert_array_equal(result.obsm["X_pca_harmony"], corrected)
    assert bool(result.uns["harmony"]["converged"]) is True
    assert result.uns["harmony"]["none_value"] == "none"
    np.testing.assert_array_equal(result.uns["harmony"]["table"]["x"], np.arange(3))
    pd.testing.assert_frame_equal(result.obs, original.obs)


def test_write_into_copy_replaces_an_existing_result(tmp_path):
    source = _write(tmp_path / "in.h5ad")
    first = tmp_path / "first.h5ad"
    write_into_copy(source, first, {"X_pca_harmony": np.zeros((50, 5))}, {"harmony": {"run": 1}})
    second = tmp_path / "second.h5ad"
    write_into_copy(first, second, {"X_pca_harmony": np.ones((50, 2))}, {"harmony": {"run": 2}})
    result = ad.read_h5ad(second)
    np.testing.assert_array_equal(result.obsm["X_pca_harmony"], np.ones((50, 2)))
    assert result.uns["harmony"] == {"run": 2}


def test_write_into_copy_creates_a_missing_uns_group(tmp_path):
    source = _write(tmp_path / "in.h5ad")
    with h5py.File(source, "r+") as handle:
        del handle["uns"]
    target = tmp_path / "out.h5ad"
    write_into_copy(source, target, {"X_pca_harmony": np.zeros((50, 5))}, {"harmony": {"a": 1}})
    assert ad.read_h5ad(target).uns["harmony"] == {"a": 1}


def test_write_small_h5ad_holds_no_x(tmp_path):
    adata = read_harmony_inputs(_write(tmp_path / "in.h5ad"), "X_pca", ["batch"])
    adata.obsm["X_pca_harmony"] = adata.obsm["X_pca"] * 2
    write_small_h5ad(tmp_path / "small.h5ad", adata)
    with h5py.File(tmp_path / "small.h5ad") as handle:
        assert "X" not in handle
    result = ad.read_h5ad(tmp_path / "small.h5ad")
    assert set(result.obsm.keys()) == {"X_pca", "X_pca_harmony"}
    assert list(result.obs.columns) == ["batch"]


# --- paths that are not regular files ------------------------------------------------------------


def test_an_output_that_is_a_device_is_refused():
    with pytest.raises(
        FileExistsError, match=r"Output '/dev/null' exists and is a character device"
    ):
        check_output_path(Path(os.devnull), "output")


def test_an_output_that_is_a_named_pipe_is_refused(tmp_path):
    pipe = tmp_path / "out.h5ad"
    os.mkfifo(pipe)
    with pytest.raises(FileExistsError, match=r"Summary '.*out\.h5ad' exists and is a named pipe"):
        check_output_path(pipe, "summary")


def test_an_output_that_is_a_symbolic_link_is_refused(tmp_path):
    target = tmp_path / "target.h5ad"
    target.write_text("kept")
    link = tmp_path / "out.h5ad"
    link.symlink_to(target)
    with pytest.raises(FileExistsError, match="is a symbolic link"):
        check_output_path(link, "output")
    assert target.read_text() == "kept"


def test_an_existing_regular_file_may_be_replaced(tmp_path):
    (tmp_path / "out.h5ad").write_text("old result")
    check_output_path(tmp_path / "out.h5ad", "output")


def test_commit_refuses_a_destination_that_became_a_pipe(tmp_path):
    destination = tmp_path / "out.txt"

    def pipe_appears_before_commit() -> None:
        with StagedOutputs() as staged:
            staged.temporary(destination).write_text("result")
            os.mkfifo(destination)
            staged.commit()

    with pytest.raises(FileExistsError, match="is a named pipe"):
        pipe_appears_before_commit()
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    assert not destination.is_file()


# --- free space ----------------------------------------------------------------------------------


def test_free_space_is_checked_per_file_system(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: usage._replace(free=3_000_000_000))
    check_free_space({tmp_path / "a.h5ad": 2_000_000_000, tmp_path / "b.tsv": 1 << 20})
    with pytest.raises(
        OSError,
        match=r"Not enough free space for '.*a\.h5ad', '.*b\.tsv': about 4\.00 GB needed, "
        r"3\.00 GB free in '.*'\. Free some space or write the outputs to another folder\.",
    ) as caught:
        check_free_space({tmp_path / "a.h5ad": 3_999_000_000, tmp_path / "b.tsv": 1_000_000})
    assert caught.value.errno == errno.ENOSPC


def test_output_size_estimates(tmp_path):
    source = tmp_path / "in.h5ad"
    source.write_bytes(b"x" * 10_000_000)
    full = estimated_h5ad_bytes(source, 1000, 50, 8, embedding_only=False)
    assert full >= 10_000_000 + 1000 * 50 * 8
    small = estimated_h5ad_bytes(source, 1000, 50, 4, embedding_only=True)
    assert 1000 * 50 * 12 <= small < full


# --- write errors name the output ----------------------------------------------------------------


def fail_while_writing(outputs: list[Path], error: OSError) -> None:
    """Stage ``outputs`` and fail with ``error`` while the last one is being written."""
    with StagedOutputs() as staged:
        for output in outputs:
            staged.temporary(output)
        raise error


def test_a_full_disk_while_copying_names_the_output_not_the_input(tmp_path):
    source, destination = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    source.write_text("input")
    # shutil.copyfile reports a full disk with the source as the file name
    error = OSError(errno.ENOSPC, "No space left on device", str(source))
    with pytest.raises(
        OutputWriteError, match=r"Cannot write '.*out\.h5ad': No space left on device\. Check"
    ) as caught:
        fail_while_writing([destination], error)
    assert caught.value.errno == errno.ENOSPC
    assert str(source) not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]


def test_an_hdf5_write_error_without_errno_names_the_output(tmp_path):
    with pytest.raises(OutputWriteError, match=r"Cannot write '.*out\.h5ad': Can't write data"):
        fail_while_writing(
            [tmp_path / "first.tsv", tmp_path / "out.h5ad"],
            OSError("Can't write data (file write failed)"),
        )


def test_other_errors_pass_through_unchanged(tmp_path):
    elsewhere = str(tmp_path / "elsewhere.h5ad")
    with pytest.raises(FileNotFoundError, match=r"elsewhere\.h5ad") as caught:
        fail_while_writing(
            [tmp_path / "out.h5ad"], FileNotFoundError(errno.ENOENT, "No such file", elsewhere)
        )
    assert not isinstance(caught.value, OutputWriteError)


# --- temporary files of killed runs --------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def leftover(folder: Path, output: str, pid: int, host: str | None = None, suffix=".tmp") -> Path:
    """A temporary file named as a run with ``pid`` on ``host`` names them."""
    namespace = files._pid_namespace()
    path = (
        folder
        / f".{output}.harmony-step.{pid}.{namespace}@{host or files._host_tag()}.ab_12xyz{suffix}"
    )
    path.write_bytes(b"\0" * 1000)
    return path


def test_temporary_files_are_named_for_their_output_and_process(tmp_path):
    with StagedOutputs() as staged:
        name = staged.temporary(tmp_path / "out.h5ad").name
    assert name.startswith(f".out.h5ad.harmony-step.{os.getpid()}.")
    assert name.endswith(".tmp")


def test_stale_temporaries_of_dead_processes_are_removed_and_logged(tmp_path, caplog):
    dead = leftover(tmp_path, "out.h5ad", dead_pid())
    probe = leftover(tmp_path, "out.h5ad", dead_pid(), suffix=".probe")
    with caplog.at_level(logging.INFO, logger="harmony_step.progress"):
        removed = remove_stale_temporaries(tmp_path / "out.h5ad")
    assert sorted(removed) == sorted([dead, probe])
    assert not dead.exists()
    assert not probe.exists()
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        str(dead) in m and "left by an earlier run for" in m and "that was killed" in m
        for m in messages
    ), messages


def test_temporaries_of_live_processes_other_outputs_and_other_files_are_kept(tmp_path):
    live = leftover(tmp_path, "out.h5ad", os.getpid())
    parent = leftover(tmp_path, "out.h5ad", os.getppid())
    other_output = leftover(tmp_path, "other.h5ad", dead_pid())
    prefix_output = leftover(tmp_path, "out.h5ad.bak", dead_pid())
    unrelated = tmp_path / ".out.h5ad.12345.tmp"
    unrelated.write_text("not ours")
    result = tmp_path / "out.h5ad"
    result.write_text("previous result")
    assert remove_stale_temporaries(result) == []
    for path in (live, parent, other_output, prefix_output, unrelated, result):
        assert path.exists(), path


def test_temporaries_from_another_host_are_removed_only_when_old(tmp_path):
    recent = leftover(tmp_path, "out.h5ad", 1234, host="node-17.cluster")
    old = leftover(tmp_path, "out.h5ad", 4321, host="node-18.cluster")
    long_ago = time.time() - FOREIGN_STALE_SECONDS - 60
    os.utime(old, (long_ago, long_ago))
    assert remove_stale_temporaries(tmp_path / "out.h5ad") == [old]
    assert recent.exists()


def test_a_missing_output_folder_has_nothing_to_remove(tmp_path):
    assert remove_stale_temporaries(tmp_path / "absent" / "out.h5ad") == []


# --- missing names are KeyError and ValueError ---------------------------------------------------


def test_missing_basis_and_column_in_a_file_are_also_value_errors(tmp_path):
    path = tmp_path / "in.h5ad"
    ad.AnnData(
        obs=pd.DataFrame({"b": ["x", "y"]}, index=["c1", "c2"]), obsm={"X_pca": np.zeros((2, 2))}
    ).write_h5ad(path)
    with pytest.raises(MissingBasisError) as caught:
        read_harmony_inputs(path, "X_umap", ["b"])
    assert isinstance(caught.value, ValueError)
    with pytest.raises(MissingColumnError) as caught:
        read_harmony_inputs(path, "X_pca", ["batch"])
    assert isinstance(caught.value, ValueError)
