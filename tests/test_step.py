"""The step's phases: field-only reading, the input hashed alongside the run, progress in a log."""

from __future__ import annotations

import hashlib
import io
import logging
import re
import threading

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from harmony_step._params import HarmonyParams
from harmony_step._step import files
from harmony_step._step.progress import PROGRESS_LOGGER, ProgressDisplay, attached
from harmony_step._step.request import StepRequest
from harmony_step._step.run import _BackgroundHash, run_step

pytestmark = pytest.mark.filterwarnings("ignore:Harmony did not converge")


@pytest.fixture
def counts_h5ad(tmp_path):
    """An h5ad with a sparse X, a layer, obsp and extra columns besides what Harmony needs."""
    rng = np.random.default_rng(0)
    n = 600
    counts = sp.random(n, 300, density=0.1, format="csr", random_state=1, dtype=np.float32)
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(rng.choice(["a", "b", "c"], n)),
            "other": rng.normal(size=n),
        },
        index=[f"cell{i}" for i in range(n)],
    )
    adata = ad.AnnData(
        X=counts,
        obs=obs,
        obsm={
            "X_pca": rng.normal(size=(n, 8)).astype(np.float32),
            "X_umap": rng.normal(size=(n, 2)),
        },
        layers={"raw": counts.copy()},
        obsp={"distances": sp.eye(n, format="csr")},
    )
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture
def elements_read(monkeypatch) -> list[str]:
    """The names of the h5ad elements that anndata decodes during the test, in order."""
    import anndata.io

    read = []
    original = anndata.io.read_elem

    def recording(element):
        read.append(element.name)
        return original(element)

    monkeypatch.setattr(anndata.io, "read_elem", recording)
    return read


def test_reading_decodes_only_the_needed_fields(counts_h5ad, elements_read):
    read = elements_read
    adata = files.read_harmony_inputs(counts_h5ad, "X_pca", ["batch", "batch"])
    assert sorted(read) == ["/obs/_index", "/obs/batch", "/obsm/X_pca"]
    assert adata.X is None
    assert list(adata.obs.columns) == ["batch"]
    assert list(adata.obsm) == ["X_pca"]
    assert adata.obs_names[0] == "cell0"


def test_cell_names_are_left_undecoded_when_the_output_copies_the_input(counts_h5ad, elements_read):
    read = elements_read
    adata = files.read_harmony_inputs(counts_h5ad, "X_pca", ["batch"], cell_names=False)
    assert sorted(read) == ["/obs/batch", "/obsm/X_pca"]
    assert list(adata.obs_names[:3]) == ["0", "1", "2"]
    assert adata.n_obs == 600


@pytest.mark.parametrize("embedding_only", [False, True])
def test_outputs_keep_the_cell_names(counts_h5ad, tmp_path, embedding_only):
    _run(counts_h5ad, tmp_path, embedding_only=embedding_only)
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    assert list(written.obs_names) == [f"cell{i}" for i in range(600)]


def test_the_input_is_copied_while_harmony_runs(counts_h5ad, tmp_path, monkeypatch):
    """The full output's copy of the input starts before the compute; writing adds the results."""
    from harmony_step._step import run

    seen = []
    original = run.integrate

    def integrate(*args, **kwargs):
        seen.extend(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
        original(*args, **kwargs)

    monkeypatch.setattr(run, "integrate", integrate)
    outcome = _run(counts_h5ad, tmp_path)
    assert len(seen) == 1
    assert seen[0].startswith(".out.h5ad.harmony-step.")
    assert outcome.seconds["copy_thread"] >= 0
    assert not (tmp_path / seen[0]).exists()


def test_a_failed_compute_leaves_no_copy_behind(counts_h5ad, tmp_path, monkeypatch):
    from harmony_step._step import run

    def failing(*args, **kwargs):
        raise ValueError("compute failed")

    monkeypatch.setattr(run, "integrate", failing)
    with pytest.raises(ValueError, match="compute failed"):
        _run(counts_h5ad, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]


@pytest.fixture
def sigterm_raises_terminated():
    """The command's SIGTERM handler, for runs in this process."""
    import signal

    from harmony_step.cli import _raise_terminated

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.usefixtures("sigterm_raises_terminated")
@pytest.mark.parametrize("signals", [1, 2], ids=["once", "again-during-the-clean-up"])
def test_sigterm_as_the_copy_starts_leaves_no_copy_behind(
    counts_h5ad, tmp_path, monkeypatch, signals
):
    """SIGTERM right after the copy thread started: the run waits for the thread (a slow one,
    which would otherwise create its file after the clean-up) before removing the file; a second
    SIGTERM while it waits does not cut the clean-up short."""
    import os
    import signal
    import time

    from harmony_step._errors import Terminated
    from harmony_step._step import run

    copy_input = run.copy_input

    def slow_copy(source, target, stop):
        time.sleep(0.5)
        return copy_input(source, target, stop)

    class SignalledBackground(run._Background):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)
            if signals == 2:  # from another thread while the clean-up waits for the copy
                threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()

    monkeypatch.setattr(run, "copy_input", slow_copy)
    monkeypatch.setattr(run, "_Background", SignalledBackground)
    with pytest.raises(Terminated) as stopped:
        _run(counts_h5ad, tmp_path)
    for thread in threading.enumerate():  # a copy left running would write its file now
        if thread.name == "harmony-step-copy":
            thread.join()
    assert not stopped.value.outputs_written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]


@pytest.mark.usefixtures("sigterm_raises_terminated")
def test_sigterm_during_the_commit_is_reported_after_the_outputs(
    counts_h5ad, tmp_path, monkeypatch
):
    import os
    import signal

    from harmony_step._errors import Terminated

    replace = files._rename

    def replace_then_signal(source, destination):
        replace(source, destination)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(files, "_rename", replace_then_signal)
    with pytest.raises(Terminated) as stopped:
        _run(counts_h5ad, tmp_path)
    assert stopped.value.outputs_written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "out.h5ad", "summary.json"]


def test_a_failed_copy_names_the_output(counts_h5ad, tmp_path, monkeypatch):
    import errno

    def full_disk(reader, writer, offset, count):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_copy_chunk", full_disk)
    with pytest.raises(files.OutputWriteError, match=r"Cannot write '.*out\.h5ad': No space"):
        _run(counts_h5ad, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]


def test_background_hash_equals_the_serial_hash(counts_h5ad):
    pending = _BackgroundHash(counts_h5ad)
    expected = hashlib.sha256(counts_h5ad.read_bytes()).hexdigest()
    assert pending.result() == expected == files.sha256_file(counts_h5ad)
    assert pending.seconds >= 0
    assert pending.result() == expected  # a second wait returns the same digest


def test_background_hash_raises_in_the_caller(tmp_path):
    pending = _BackgroundHash(tmp_path / "missing.h5ad")
    with pytest.raises(FileNotFoundError):
        pending.result()


def _run(counts_h5ad, tmp_path, **options):
    request = StepRequest(
        input=counts_h5ad,
        output=tmp_path / "out.h5ad",
        keys=("batch",),
        summary=tmp_path / "summary.json",
        **options,
    )
    params = HarmonyParams.create(device="cpu", max_iter_harmony=3, random_state=0)
    return run_step(request, params)


def test_the_summary_holds_the_input_hash_computed_alongside_the_run(counts_h5ad, tmp_path):
    import json

    outcome = _run(counts_h5ad, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["input_sha256"] == hashlib.sha256(counts_h5ad.read_bytes()).hexdigest()
    assert {"read", "compute", "metrics", "hash", "hash_thread", "write", "total"} <= set(
        outcome.seconds
    )


def test_full_copy_keeps_every_other_field_byte_for_byte(counts_h5ad, tmp_path):
    _run(counts_h5ad, tmp_path)
    before, after = ad.read_h5ad(counts_h5ad), ad.read_h5ad(tmp_path / "out.h5ad")
    assert (before.X != after.X).nnz == 0
    assert (before.layers["raw"] != after.layers["raw"]).nnz == 0
    np.testing.assert_array_equal(before.obsm["X_umap"], after.obsm["X_umap"])
    assert "X_pca_harmony" in after.obsm
    assert "harmony" in after.uns


def test_progress_in_a_log_is_one_line_per_phase_and_per_round(counts_h5ad, tmp_path):
    log = io.StringIO()  # not a terminal, as a Snakemake log file
    display = ProgressDisplay(log, quiet=False)
    assert not display.live
    with attached(display, debug=False):
        outcome = _run(counts_h5ad, tmp_path)
    lines = log.getvalue().splitlines()
    assert all(line.startswith("harmony-step: ") for line in lines), lines
    assert "\r" not in log.getvalue()
    for phase in ("read", "compute", "metrics", "hash", "write"):
        matching = [line for line in lines if line.startswith(f"harmony-step: {phase}: ")]
        assert len(matching) == 1, (phase, lines)
        assert re.fullmatch(rf"harmony-step: {phase}: [\d.]+ s \(elapsed [\d.]+ s\)", matching[0])
    rounds = [line for line in lines if line.startswith("harmony-step: round ")]
    assert len(rounds) == outcome.n_rounds
    assert all(re.match(r"harmony-step: round \d+/3: .*objective", line) for line in rounds)
    assert len(lines) < 20 + outcome.n_rounds


def test_quiet_shows_nothing_but_warnings():
    stream = io.StringIO()
    display = ProgressDisplay(stream, quiet=True)
    logger = logging.getLogger(PROGRESS_LOGGER)
    with attached(display, debug=False):
        logger.info("read", extra={"harmony_phase": "read"})
        logger.info("round 1/2: objective 1", extra={"harmony_round": 1, "harmony_max_rounds": 2})
        display.message("warning", "something")
    assert stream.getvalue() == "harmony-step: warning: something\n"
