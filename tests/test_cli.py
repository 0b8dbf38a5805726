"""The harmony-step command, run as a real subprocess on real h5ad files.

Bad inputs must give the documented exit code, exactly one ``harmony-step: error:`` line, no output
file (nor temporary file) and an untouched input. Successful runs are checked output by output.
Runs use few iterations: these tests are about the command, not about Harmony's result.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from anndata.io import write_elem

from harmony_step import __version__
from harmony_step._params import PARAMETERS
from harmony_step._step.files import _host_tag, _pid_namespace
from harmony_step.cli import exit_code, flag_help, flag_name

COMMAND = Path(sys.executable).with_name("harmony-step")
FAST = ("--max-iter-harmony", "2", "--max-iter-clustering", "5")
ERROR_PREFIX = "harmony-step: error: "


def harmony_step(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    assert COMMAND.exists(), f"the harmony-step command is not installed next to {sys.executable}"
    return subprocess.run(
        [str(COMMAND), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def pbmc(data_dir) -> Path:
    return data_dir / "pbmc_3500" / "pbmc_3500.h5ad"


@pytest.fixture(scope="module")
def small(pbmc) -> ad.AnnData:
    """300 pbmc cells with only obs['donor'] and obsm['X_pca']: the base of the bad inputs."""
    full = ad.read_h5ad(pbmc)[:300]
    return ad.AnnData(obs=full.obs[["donor"]].copy(), obsm={"X_pca": full.obsm["X_pca"].copy()})


# --- bad inputs ----------------------------------------------------------------------------------


def _variant(small: ad.AnnData, folder: Path, change) -> Path:
    adata = small.copy()
    change(adata)
    path = folder / "in.h5ad"
    adata.write_h5ad(path)
    return path


def _with_nan(adata):
    adata.obsm["X_pca"][5, 3] = np.nan


def _with_inf(adata):
    adata.obsm["X_pca"][7, 0] = np.inf


def _key_with_missing(adata):
    donor = adata.obs["donor"].astype(object)
    donor.iloc[[3, 10]] = np.nan
    adata.obs["donor"] = pd.Categorical(donor)


def _label_with_missing(adata):
    adata.obs["kind"] = pd.Categorical(["t"] * 299 + [np.nan])


def _bad_case(name: str, small: ad.AnnData, folder: Path, out: Path) -> tuple[list, int, str, dict]:
    """(arguments, exit code, pattern of the error line, environment changes) of one bad input."""
    good = folder / "in.h5ad"
    small.write_h5ad(good)
    base = ["--input", good, "--output", out / "out.h5ad", "--key", "donor", *FAST]
    with_input = lambda path: ["--input", path, *base[2:]]  # noqa: E731
    params = folder / "params.yaml"
    if name == "missing file":
        return (
            with_input(folder / "absent.h5ad"),
            2,
            r"Input file .*absent\.h5ad' does not exist",
            {},
        )
    if name == "not an h5ad":
        text = folder / "table.h5ad"
        text.write_text("cell\tdonor\nc1\tA\n")
        return with_input(text), 2, "is not an HDF5 file", {}
    if name == "HDF5 but not h5ad":
        plain = folder / "plain.h5ad"
        with h5py.File(plain, "w") as handle:
            handle["values"] = np.arange(4)
        return with_input(plain), 2, "has no 'obs' group", {}
    if name == "truncated h5ad":
        cut = folder / "cut.h5ad"
        cut.write_bytes(good.read_bytes()[:20_000])
        return with_input(cut), 2, "truncated", {}
    if name == "missing basis":
        return [*base, "--basis", "X_umap"], 2, r"Basis 'X_umap' is not in obsm.*\['X_pca'\]", {}
    if name == "missing key column":
        args = [*base[:4], "--key", "batch", *FAST]
        return args, 2, r"\['batch'\] are not in obs.*\['donor'\]", {}
    if name == "key with missing values":
        return with_input(_variant(small, folder, _key_with_missing)), 2, "2 missing value", {}
    if name == "label key with missing values":
        args = [*with_input(_variant(small, folder, _label_with_missing)), "--label-key", "kind"]
        return args, 2, "Label key 'kind' has 1 missing value", {}
    if name == "basis with NaN":
        return with_input(_variant(small, folder, _with_nan)), 2, "non-finite value.*row 5", {}
    if name == "basis with Inf":
        return with_input(_variant(small, folder, _with_inf)), 2, "non-finite value.*row 7", {}
    if name == "1-D basis":
        with h5py.File(good, "r+") as handle:
            del handle["obsm/X_pca"]
            write_elem(handle["obsm"], "X_pca", np.zeros(300))
        return base, 2, r"must be 2-D .*\(300,\)", {}
    if name == "one cell":
        return with_input(_variant(small[:1], folder, lambda a: None)), 2, "1 cell.*at least 2", {}
    if name == "YAML wrong type":
        params.write_text("max_iter_harmony: ten\n")
        return [*base, "--params", params], 2, r"params.yaml'.*'max_iter_harmony'.*int", {}
    if name == "YAML wrong value":
        params.write_text("sigma: -1\n")
        return [*base, "--params", params], 2, r"params.yaml'.*'sigma'.*\(0, inf\)", {}
    if name == "YAML unknown key":
        params.write_text("sigma: 0.2\nsigmaa: 0.1\n")
        return [*base, "--params", params], 2, r"Unknown Harmony parameter.*'sigmaa'", {}
    if name == "YAML not a mapping":
        params.write_text("- 1\n- 2\n")
        return [*base, "--params", params], 2, "must be a mapping", {}
    if name == "YAML syntax error":
        params.write_text("sigma: [0.1\n")
        return [*base, "--params", params], 2, "is not valid YAML", {}
    if name == "YAML file missing":
        return (
            [*base, "--params", folder / "none.yaml"],
            2,
            r"none\.yaml' \(--params\) does not exist",
            {},
        )
    if name == "flag out of range":
        return [*base, "--sigma", "-1"], 2, r"'sigma' parameter must be a float in the range", {}
    if name == "flag not a number":
        return (
            [*base, "--tol-harmony", "small"],
            2,
            r"--tol-harmony: expected a number, got 'small'",
            {},
        )
    if name == "negative --metrics-cells":
        return (
            [*base, "--metrics-cells", "-1"],
            2,
            r"argument --metrics-cells: expected an integer >= 0, got '-1'",
            {},
        )
    if name == "theta of wrong length":
        return [*base, "--theta", "1", "2", "3", "4"], 2, r"'theta' parameter .* Got 4 values", {}
    if name == "more clusters than cells":
        return (
            [*base, "--n-clusters", "301"],
            2,
            r"'n_clusters' parameter must be in \[1, n_cells=300\]",
            {},
        )
    if name == "missing output folder":
        args = [*base[:2], "--output", out / "sub" / "out.h5ad", *base[4:]]
        return args, 2, r"folder of output .* does not exist", {}
    if name == "output is the input":
        args = [*base[:2], "--output", good, *base[4:]]
        return args, 2, "is the input file", {}
    if name == "GPU requested but unavailable":
        return (
            [*base, "--device", "gpu"],
            3,
            "device='gpu' was requested",
            {"CUDA_VISIBLE_DEVICES": ""},
        )
    return _user_case(name, small, folder, base, with_input)


def _with_continuous_key(adata):
    adata.obs["percent_mito"] = np.random.default_rng(0).uniform(0, 10, adata.n_obs)


def _with_huge_value(adata):
    adata.obsm["X_pca"][2, 1] = 1e200


def _user_case(
    name: str, small, folder: Path, base: list, with_input
) -> tuple[list, int, str, dict]:
    """Bad inputs rebuilt from what users hand over (issue 12): refused before any work."""
    if name == "seed of 2**64":
        return (
            [*base, "--random-state", str(2**64)],
            2,
            r"'random_state' parameter must be an int in the range \[0, 2\*\*32\) or None",
            {},
        )
    if name == "adjusted basis with a slash":
        return [*base, "--adjusted-basis", "harmony/pca"], 2, r"no '/'.*'harmony_pca'", {}
    if name == "adjusted basis is the basis":
        return [*base, "--adjusted-basis", "X_pca"], 2, "must differ from 'basis'", {}
    if name == "key listed twice":
        return [*base, "--key", "donor"], 2, r"\['donor'\] are listed more than once", {}
    if name == "continuous float key":
        args = [*with_input(_variant(small, folder, _with_continuous_key)), "--key", "percent_mito"]
        args.remove("donor")
        args.remove("--key")
        return args, 2, "'percent_mito' is a continuous float column", {}
    if name == "values whose squares overflow":
        path = _variant(small, folder, _with_huge_value)
        return (
            with_input(path),
            2,
            r"obsm\['X_pca'\] has values up to 1e\+200, above 1.22e\+153",
            {},
        )
    if name == "several GPUs on the CPU":
        return (
            [*base, "--gpus", "2", "--device", "cpu"],
            2,
            r"'n_gpus' parameter must be 1 with device='cpu'",
            {},
        )
    if name == "zero GPUs":
        return [*base, "--gpus", "0"], 2, r"'n_gpus' parameter must be an int in the range", {}
    if name == "GPUs not a number":
        return [*base, "--gpus", "two"], 2, r"argument --gpus: expected an integer, got 'two'", {}
    if name == "several GPUs but none usable":
        return (
            [*base, "--gpus", "2"],
            3,
            r"n_gpus=2 GPUs were requested, but this process sees 0",
            {"CUDA_VISIBLE_DEVICES": ""},
        )
    if name == "output is a device":
        return (
            [*base[:2], "--output", os.devnull, *base[4:]],
            2,
            "exists and is a character device",
            {},
        )
    raise AssertionError(name)


BAD_CASES = [
    "missing file",
    "not an h5ad",
    "HDF5 but not h5ad",
    "truncated h5ad",
    "missing basis",
    "missing key column",
    "key with missing values",
    "label key with missing values",
    "basis with NaN",
    "basis with Inf",
    "1-D basis",
    "one cell",
    "YAML wrong type",
    "YAML wrong value",
    "YAML unknown key",
    "YAML not a mapping",
    "YAML syntax error",
    "YAML file missing",
    "flag out of range",
    "flag not a number",
    "negative --metrics-cells",
    "theta of wrong length",
    "more clusters than cells",
    "missing output folder",
    "output is the input",
    "GPU requested but unavailable",
    "seed of 2**64",
    "adjusted basis with a slash",
    "adjusted basis is the basis",
    "key listed twice",
    "continuous float key",
    "values whose squares overflow",
    "several GPUs on the CPU",
    "zero GPUs",
    "GPUs not a number",
    "several GPUs but none usable",
    "output is a device",
]


def _assert_failed_cleanly(result, code, pattern, out: Path, inputs: dict[Path, str]) -> None:
    assert result.returncode == code, result.stderr
    # one error line, last; before it at most the progress line of a fallback to the CPU and
    # the lines of the phases that completed
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith(ERROR_PREFIX)] == lines[-1:], result.stderr
    assert all(
        line.startswith("harmony-step: device='auto'")
        or re.fullmatch(r"harmony-step: read: [\d.]+ s \(elapsed [\d.]+ s\)", line)
        for line in lines[:-1]
    ), lines
    assert re.search(pattern, lines[-1]), lines[-1]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for path, digest in inputs.items():
        assert sha256(path) == digest, f"{path} was modified"
    leftovers = [p.name for p in out.iterdir() if p not in inputs]
    assert leftovers == [], f"the failed run left {leftovers}"


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_cleanly(case, small, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    args, code, pattern, env_changes = _bad_case(case, small, folder, out)
    inputs = {p: sha256(p) for p in folder.iterdir()}
    result = harmony_step("run", *args, env={**os.environ, **env_changes})
    # "output is the input" writes into the input folder: that folder must be unchanged too
    watched = folder if case == "output is the input" else out
    _assert_failed_cleanly(result, code, pattern, watched, inputs)


@pytest.mark.parametrize("which", ["--output", "--summary", "--plot", "--convergence"])
def test_unwritable_output_folder_fails_before_any_work(which, small, tmp_path, locked_folder):
    source = tmp_path / "in.h5ad"
    small.write_h5ad(source)
    digest = sha256(source)
    outputs = {"--output": tmp_path / "out.h5ad"}
    outputs[which] = locked_folder / "result"
    args = [item for pair in outputs.items() for item in pair]
    start = time.perf_counter()
    result = harmony_step("run", "--input", source, "--key", "donor", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert re.match(rf"{ERROR_PREFIX}Cannot write .* into folder .*locked", lines[0]), lines[0]
    assert sha256(source) == digest
    assert list(locked_folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "locked"]
    # the default 10 rounds would take far longer: the check came first
    assert time.perf_counter() - start < 60


def test_debug_shows_the_traceback(small, tmp_path):
    source = tmp_path / "in.h5ad"
    small.write_h5ad(source)
    result = harmony_step(
        "run", "--input", source, "--output", tmp_path / "o.h5ad", "--key", "x", "--debug"
    )
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-1].startswith(ERROR_PREFIX)


def test_usage_errors_are_one_line(tmp_path):
    for args in (["run", "--input", "x.h5ad"], ["frobnicate"], []):
        result = harmony_step(*args)
        assert result.returncode == 2, args
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(ERROR_PREFIX)


# --- exit-code mapping for errors that need special hardware -------------------------------------


def test_exit_codes_by_exception_class():
    from harmony_step._backend import GPUUnavailableError

    assert exit_code(GPUUnavailableError("no GPU")) == 3
    assert exit_code(FileNotFoundError("x")) == 2
    assert exit_code(KeyError("x")) == 2
    assert exit_code(ValueError("x")) == 2
    assert exit_code(TypeError("x")) == 2
    assert exit_code(RuntimeError("x")) == 5
    assert exit_code(ZeroDivisionError()) == 5
    # CuPy's class is matched by name and module so that CuPy stays an optional dependency
    cupy_oom = type("OutOfMemoryError", (MemoryError,), {"__module__": "cupy.cuda.memory"})
    assert exit_code(cupy_oom("Out of memory allocating 1,024 bytes")) == 4
    other_oom = type("OutOfMemoryError", (RuntimeError,), {"__module__": "some.other.library"})
    assert exit_code(other_oom("x")) == 5


@pytest.mark.gpu
def test_gpu_out_of_memory_exits_with_4(pbmc, tmp_path):
    # CuPy's pool refuses allocations beyond this limit, a real out-of-memory on the device
    env = {**os.environ, "CUPY_GPU_MEMORY_LIMIT": str(256 * 1024)}
    result = harmony_step(
        "run", "--input", pbmc, "--output", tmp_path / "o.h5ad", "--key", "donor",
        "--device", "gpu", *FAST, env=env,
    )  # fmt: skip
    assert result.returncode == 4, result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"{ERROR_PREFIX}the GPU ran out of memory")
    assert list(tmp_path.iterdir()) == []


# --- version and help ----------------------------------------------------------------------------


def test_version():
    result = harmony_step("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"harmony-step {__version__}"


def test_help_documents_every_parameter_with_its_default():
    result = harmony_step("run", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # undo argparse's line wrapping
    for spec in PARAMETERS:
        assert flag_name(spec.name) in text, spec.name
        described = " ".join(flag_help(spec).split())
        assert described in text, described
    # the command line spells "no value" as its flags accept it, never as YAML's null
    assert "--correction-method {original,fast,batched,none}" in text
    assert "batched or none (chosen by memory)" in text
    assert re.search(r"\bnull\b", text) is None
    for option in ("--input", "--output", "--key", "--label-key", "--params", "--convergence",
                   "--summary", "--plot", "--embedding-only", "--quiet", "--debug"):  # fmt: skip
        assert option in text, option


def test_python_dash_m_runs_the_same_command(tmp_path):
    version = subprocess.run(
        [sys.executable, "-m", "harmony_step", "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0
    assert version.stdout.strip() == f"harmony-step {__version__}"
    missing = subprocess.run(
        [sys.executable, "-m", "harmony_step", "run", "--input", tmp_path / "absent.h5ad",
         "--output", tmp_path / "o.h5ad", "--key", "donor"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert missing.returncode == 2
    assert missing.stderr.startswith(ERROR_PREFIX)


# --- a full run with every report ----------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(pbmc, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    paths = {
        "output": out / "out.h5ad",
        "convergence": out / "convergence.tsv",
        "summary": out / "summary.json",
        "plot": out / "convergence.png",
    }
    digest = sha256(pbmc)
    result = harmony_step(
        "run", "--input", pbmc, "--output", paths["output"], "--key", "donor",
        "--convergence", paths["convergence"], "--summary", paths["summary"],
        "--plot", paths["plot"], *FAST,
    )  # fmt: skip
    return result, paths, digest


def test_full_run_succeeds_with_progress_per_round(full_run):
    result, _, _ = full_run
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("harmony-step: round")] == [
        line for line in lines if re.match(r"harmony-step: round [12]/2: \d+ iterations", line)
    ]
    assert sum(line.startswith("harmony-step: round") for line in lines) == 2
    assert lines[-1].startswith("harmony-step: done:")
    assert "Traceback" not in result.stderr
    # timings are logged instead of being written into the outputs
    assert any(re.match(r"harmony-step: Harmony timings: setup .* total ", line) for line in lines)
    assert any(
        re.match(
            r"harmony-step: timings: read .* total [\d.e+-]+ s; peak host memory \d+ MiB", line
        )
        for line in lines
    )


@pytest.mark.parametrize("verbose", [(), ("--verbose",)], ids=["default", "verbose"])
def test_one_line_per_round_with_or_without_verbose(verbose, small, tmp_path):
    source = tmp_path / "in.h5ad"
    small.write_h5ad(source)
    result = harmony_step(
        "run", "--input", source, "--output", tmp_path / "o.h5ad", "--key", "donor",
        "--metrics-cells", "0", *FAST, *verbose,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    both = (result.stdout + result.stderr).splitlines()
    assert len([line for line in both if re.search(r"round \d+/2:", line)]) == 2, both
    assert len([line for line in both if "converged in" in line]) <= 1, both
    assert result.stdout == ""


def test_full_run_leaves_the_input_untouched_and_no_temporary_files(full_run, pbmc):
    _, paths, digest = full_run
    assert sha256(pbmc) == digest
    folder = paths["output"].parent
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths.values())


def test_full_run_output_is_the_input_plus_the_result(full_run, pbmc):
    _, paths, _ = full_run
    original, result = ad.read_h5ad(pbmc), ad.read_h5ad(paths["output"])
    assert set(result.obsm.keys()) == {*original.obsm.keys(), "X_pca_harmony"}
    for key in original.obsm:
        np.testing.assert_array_equal(result.obsm[key], original.obsm[key])
    pd.testing.assert_frame_equal(result.obs, original.obs)
    np.testing.assert_array_equal(result.uns["pc_names"], original.uns["pc_names"])
    corrected = result.obsm["X_pca_harmony"]
    assert corrected.shape == (3500, 30)
    assert np.isfinite(corrected).all()
    assert not np.allclose(corrected, original.obsm["X_pca"])
    harmony = result.uns["harmony"]
    assert int(harmony["n_rounds"]) == 2
    metrics = harmony["metrics"]
    assert metrics["after"]["ilisi_median"] > metrics["before"]["ilisi_median"]
    assert metrics["settings"]["label_key"] is None


def test_full_run_convergence_table(full_run):
    _, paths, _ = full_run
    table = pd.read_csv(paths["convergence"], sep="\t", float_precision="round_trip")
    assert list(table.columns) == [
        "round", "iteration", "objective", "kmeans", "entropy", "diversity",
    ]  # fmt: skip
    harmony = ad.read_h5ad(paths["output"]).uns["harmony"]
    np.testing.assert_array_equal(table["objective"], harmony["iterations"]["objective"])
    assert sorted(set(table["round"])) == [0, 1, 2]
    np.testing.assert_allclose(
        table["objective"], table["kmeans"] + table["entropy"] + table["diversity"], rtol=1e-9
    )


def test_full_run_summary(full_run, pbmc):
    _, paths, digest = full_run
    summary = json.loads(paths["summary"].read_text())
    assert summary["input_sha256"] == digest
    assert summary["n_rounds"] == 2
    assert summary["converged"] is False
    assert len(summary["inner_iterations"]) == 2
    assert all(1 <= n <= 5 for n in summary["inner_iterations"])
    harmony = ad.read_h5ad(paths["output"]).uns["harmony"]
    assert summary["final_objective"] == harmony["iterations"]["objective"][-1]
    assert summary["parameters"]["max_iter_harmony"] == 2
    assert summary["parameters"]["sigma"] == 0.1
    # timings go to the log only, so that reruns write the same bytes
    assert not {"seconds", "harmony_seconds", "peak_host_memory_bytes"} & set(summary)
    assert summary["device"]["kind"] in {"cpu", "gpu"}
    if summary["device"]["kind"] == "gpu":
        assert {"cupy", "cuda_runtime"} <= set(summary["versions"])
    assert {"numpy", "anndata", "harmony_step"} <= set(summary["versions"])
    assert summary["environment"]["image"] == os.environ.get("HARMONY_STEP_IMAGE", "none")
    assert summary["environment"]["container"] in {"docker", "apptainer", "none"}
    assert summary["metrics"]["before"]["ilisi_median"] == pytest.approx(1.40, abs=0.01)
    assert (
        summary["metrics"]["after"]["batch_silhouette"]
        < summary["metrics"]["before"]["batch_silhouette"]
    )
    assert summary["peak_gpu_memory_bytes"] >= 0
    assert summary["n_cells"] == 3500


def test_full_run_plot_is_a_png(full_run):
    _, paths, _ = full_run
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- embedding only, precedence, labels, progress display ---------------------------------------


def test_embedding_only_writes_a_small_file_with_the_same_result(full_run, pbmc, tmp_path):
    _, paths, _ = full_run
    target = tmp_path / "small.h5ad"
    result = harmony_step(
        "run", "--input", pbmc, "--output", target, "--key", "donor", "--embedding-only", *FAST
    )
    assert result.returncode == 0, result.stderr
    small = ad.read_h5ad(target)
    assert set(small.obsm.keys()) == {"X_pca", "X_pca_harmony"}
    assert list(small.obs.columns) == ["donor"]
    assert small.n_vars == 0
    with h5py.File(target) as handle:
        assert "X" not in handle
    assert "harmony" in small.uns
    # same input, parameters and seed: the same corrected embedding as the full run
    np.testing.assert_array_equal(
        small.obsm["X_pca_harmony"], ad.read_h5ad(paths["output"]).obsm["X_pca_harmony"]
    )
    assert list(small.obs_names) == list(ad.read_h5ad(pbmc).obs_names)


@pytest.mark.slow
def test_flags_override_the_params_file_which_overrides_defaults(pbmc, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "max_iter_harmony: 1\nsigma: 0.2\ntol_harmony: 1e-3\ntheta: 1.5\nrandom_state: 7\n"
        "ridge_lambda: 2.0\n"
    )
    summary_path = tmp_path / "summary.json"
    result = harmony_step(
        "run", "--input", pbmc, "--output", tmp_path / "o.h5ad", "--key", "donor",
        "--params", params, "--max-iter-harmony", "2", "--theta", "1", "2", "3",
        "--max-iter-clustering", "5", "--summary", summary_path, "--embedding-only", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    parameters = json.loads(summary_path.read_text())["parameters"]
    assert parameters["max_iter_harmony"] == 2  # flag over file
    assert parameters["theta"] == [1.0, 2.0, 3.0]  # flag over file
    assert parameters["sigma"] == 0.2  # file over default
    assert parameters["tol_harmony"] == 0.001  # YAML's 1e-3 is a number
    assert parameters["random_state"] == 7
    assert parameters["block_proportion"] == 0.05  # default
    # --quiet: no progress, only warnings, each once on one line (ridge_lambda is ignored by
    # harmony2; 2 rounds do not converge)
    lines = result.stderr.splitlines()
    assert all(line.startswith("harmony-step: warning: ") for line in lines), result.stderr
    assert sum("'ridge_lambda' is ignored" in line for line in lines) == 1, result.stderr


@pytest.fixture(scope="module")
def labelled(data_dir, tmp_path_factory) -> Path:
    """1,500 cell_lines cells with two batch variables and cell-type labels."""
    full = ad.read_h5ad(data_dir / "cell_lines" / "cell_lines.h5ad")
    rng = np.random.default_rng(0)
    subset = full[np.sort(rng.choice(full.n_obs, 1500, replace=False))]
    obs = subset.obs[["dataset", "cell_type"]].copy()
    obs["lane"] = pd.Categorical(rng.choice(["L1", "L2"], subset.n_obs))
    path = tmp_path_factory.mktemp("labelled") / "cells.h5ad"
    ad.AnnData(obs=obs, obsm={"X_pca": subset.obsm["X_pca"].copy()}).write_h5ad(path)
    return path


def _run_on_a_terminal(args: list) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal; return the exit code and what the terminal showed."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [str(COMMAND), *map(str, args)], stderr=terminal, stdout=subprocess.DEVNULL
    )
    os.close(terminal)
    shown = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO once the command has exited
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    code = process.wait(timeout=300)
    reader.join(timeout=30)
    os.close(controller)
    return code, shown.decode(errors="replace")


@pytest.mark.slow
def test_label_key_several_keys_and_a_progress_bar_on_a_terminal(labelled, tmp_path):
    summary_path = tmp_path / "summary.json"
    code, shown = _run_on_a_terminal(
        ["run", "--input", labelled, "--output", tmp_path / "o.h5ad", "--key", "dataset",
         "--key", "lane", "--label-key", "cell_type", "--summary", summary_path, *FAST]
    )  # fmt: skip
    assert code == 0, shown
    # one line rewritten in place (carriage return): the phase, a bar per round with the
    # objective, and the elapsed time
    assert "\r" in shown
    bar = r"harmony-step: compute [#█]{{{}}} * \[\d\d:\d\d\], round {}/2, objective [\d.e+-]+\r"
    assert re.search(bar.format(6, 1), shown), shown
    assert re.search(bar.format(12, 2), shown), shown
    assert re.search(r"harmony-step: metrics  +\[\d\d:\d\d\]", shown), shown
    summary = json.loads(summary_path.read_text())
    assert summary["keys"] == ["dataset", "lane"]
    assert summary["resolved"]["n_levels"] == [3, 2]
    for when in ("before", "after"):
        assert set(summary["metrics"][when]) == {
            "ilisi_median", "batch_silhouette", "clisi_median", "label_silhouette",
        }  # fmt: skip
    assert summary["metrics"]["settings"]["batch_key"] == "dataset"
    assert summary["metrics"]["after"]["clisi_median"] < 1.1
    uns_metrics = ad.read_h5ad(tmp_path / "o.h5ad").uns["harmony"]["metrics"]
    assert uns_metrics["after"]["clisi_median"] == summary["metrics"]["after"]["clisi_median"]


# --- a large X is never loaded; interrupted runs leave no output ---------------------------------

BIG_CELLS, BIG_GENES = 20_000, 15_000  # X: 20,000 x 15,000 float32 = 1.2 GB on disk


@pytest.fixture(scope="module")
def big_input(tmp_path_factory) -> Path:
    """An h5ad whose dense X (1.2 GB) is far larger than everything else, written chunk by chunk."""
    path = tmp_path_factory.mktemp("big") / "big.h5ad"
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {"batch": pd.Categorical(rng.choice(["a", "b", "c"], BIG_CELLS))},
        index=[f"c{i}" for i in range(BIG_CELLS)],
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(BIG_GENES)])
    embedding = rng.normal(size=(BIG_CELLS, 10))
    ad.AnnData(obs=obs, var=var, obsm={"X_pca": embedding}).write_h5ad(path)
    rows = 1_000
    block = rng.random((rows, BIG_GENES), dtype=np.float32)  # incompressible, stored in full
    with h5py.File(path, "r+") as handle:
        x = handle.create_dataset(
            "X", shape=(BIG_CELLS, BIG_GENES), dtype="f4", chunks=(rows, 1_000)
        )
        x.attrs["encoding-type"] = "array"
        x.attrs["encoding-version"] = "0.2.0"
        for start in range(0, BIG_CELLS, rows):
            x[start : start + rows] = block
    assert path.stat().st_size > BIG_CELLS * BIG_GENES * 4
    return path


BIG_RUN = ("--key", "batch", "--n-clusters", "2", "--max-iter-harmony", "1",
           "--max-iter-clustering", "2", "--metrics-cells", "1000", "--quiet")  # fmt: skip


@pytest.mark.slow
def test_a_large_x_is_never_loaded(big_input, tmp_path):
    x_bytes = BIG_CELLS * BIG_GENES * 4
    digest = sha256(big_input)
    target = tmp_path / "out.h5ad"
    # measure the command alone: a fresh Python whose only child is the command
    measure = (
        "import resource, subprocess, sys\n"
        "code = subprocess.run(sys.argv[1:]).returncode\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", measure, str(COMMAND), "run", "--input", str(big_input),
         "--output", str(target), *BIG_RUN],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.strip())
    assert peak < x_bytes / 3, (
        f"peak memory {peak / 2**20:.0f} MiB for an X of {x_bytes / 2**20:.0f} MiB"
    )
    assert sha256(big_input) == digest
    with h5py.File(target) as handle:
        assert handle["X"].shape == (BIG_CELLS, BIG_GENES)
        assert handle["obsm/X_pca_harmony"].shape == (BIG_CELLS, 10)
        # copied byte for byte: every 1,000-row block of X holds the same values
        np.testing.assert_array_equal(handle["X"][19_000:19_010], handle["X"][0:10])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_run_leaves_no_output(sig, big_input, tmp_path):
    target = tmp_path / "out.h5ad"
    process = subprocess.Popen(
        [str(COMMAND), "run", "--input", str(big_input), "--output", str(target), *BIG_RUN],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    # wait until the output is being written (its temporary file exists), then kill
    while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        assert process.poll() is None, (
            f"finished before it could be killed: {process.stderr.read()}"
        )
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(sig)
    code = process.wait(timeout=120)
    stderr = process.stderr.read()
    assert not target.exists()
    if sig == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM, stderr
        assert (
            stderr.splitlines()[-1] == f"{ERROR_PREFIX}terminated (SIGTERM); no output was written"
        )
        assert list(tmp_path.iterdir()) == []  # temporary files removed too
    else:
        assert code == -signal.SIGKILL


def test_the_last_line_of_a_stopped_run_says_whether_the_outputs_were_written():
    from harmony_step._errors import Terminated
    from harmony_step.cli import _outputs_state

    before, after = Terminated(15), KeyboardInterrupt()
    after.outputs_written = True
    assert _outputs_state(before) == "no output was written"
    assert _outputs_state(after) == "the outputs were written"
    assert _outputs_state(before, finished=True) == "the outputs were written"


# --- outputs: space, write errors, leftovers of killed runs ----------------------------------------


def _small_run_args(small, tmp_path) -> tuple[Path, list]:
    source = tmp_path / "in.h5ad"
    small.write_h5ad(source)
    out = tmp_path / "out"
    out.mkdir()
    args = ["run", "--input", source, "--output", out / "out.h5ad", "--key", "donor", *FAST]
    return out, [str(a) for a in args]


def test_too_little_free_space_fails_before_the_compute(small, tmp_path, monkeypatch, capsys):
    from harmony_step import cli
    from harmony_step._step import files

    out, args = _small_run_args(small, tmp_path)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: usage._replace(free=1000))
    computed = []
    monkeypatch.setattr("harmony_step._step.run.integrate", lambda *a, **k: computed.append(1))
    assert cli.main([*args, "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert re.fullmatch(
        rf"{ERROR_PREFIX}Not enough free space for '.*out\.h5ad': about \d+\.\d\d GB needed, "
        r"0\.00 GB free in '.*out'\. Free some space or write the outputs to another folder\.",
        error,
    ), error
    assert computed == []
    assert list(out.iterdir()) == []


def test_a_full_disk_while_writing_names_the_output(small, tmp_path, monkeypatch, capsys):
    from harmony_step import cli
    from harmony_step._step import files

    out, args = _small_run_args(small, tmp_path)

    def full_disk(reader, writer, offset, count):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_copy_chunk", full_disk)
    assert cli.main([*args, "--quiet"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"{ERROR_PREFIX}Cannot write '{out / 'out.h5ad'}': No space left")
    assert "in.h5ad" not in error
    assert list(out.iterdir()) == []


def test_a_run_removes_what_a_killed_run_left_for_its_output_and_says_so(small, tmp_path):
    out, args = _small_run_args(small, tmp_path)
    child = subprocess.Popen(["true"])
    child.wait()
    stale = (
        out / f".out.h5ad.harmony-step.{child.pid}.{_pid_namespace()}@{_host_tag()}.x1y2z3w4.tmp"
    )
    stale.write_bytes(b"\0" * 4096)
    other = out / ".notes.txt"
    other.write_text("kept")
    result = harmony_step(*args)
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert other.exists()
    assert f"harmony-step: removed {stale} (0.00 GB), left by an earlier run for" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [".notes.txt", "out.h5ad"]


def test_too_few_gpus_are_refused_before_the_input_is_read(pbmc, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = harmony_step(
        "run", "--input", pbmc, "--output", tmp_path / "o.h5ad", "--key", "donor", "--gpus", "2",
        env=env,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "read:" not in result.stderr  # the phase line of a finished read
    assert list(tmp_path.iterdir()) == []
