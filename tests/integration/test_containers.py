"""The container image, run for real: Docker against a host run, and Apptainer under Snakemake.

`.ci/containers.sh` builds the image and its SIF, then runs this module with
``HARMONY_STEP_INTEGRATION=1`` and:

- ``HARMONY_STEP_TEST_DOCKER``: the Docker client command (default ``docker``; ``DOCKER_HOST`` is
  honoured as usual);
- ``HARMONY_STEP_TEST_IMAGE``: the tag that was built (default: the name in ``container/IMAGE``);
- ``HARMONY_STEP_TEST_REVISION``: the git commit passed to the build as ``REVISION`` (optional);
- ``HARMONY_STEP_TEST_SIF``: the SIF converted from that image; ``apptainer`` must be on ``PATH``.

A missing tool under ``HARMONY_STEP_INTEGRATION=1`` is a failure, not a skip: the script that set
the variable promised the tools.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
IMAGE_NAME = (REPO / "container" / "IMAGE").read_text().strip()
DATASET = Path("pbmc_3500") / "pbmc_3500.h5ad"
CORRECTED_BASIS = "X_pca_harmony"
# Same BLAS thread count on both sides, so that the host and container runs sum in the same order.
SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
COMMAND_TIMEOUT_S = 900
# Paths copied into the Snakemake working folder: everything the workflow reads, nothing heavy.
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", ".snakemake", "results", "__pycache__", "*.sif", "*.simg", ".pytest_cache"
)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    """Run `command`, failing the test with its output when it exits non-zero."""
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False, **kwargs
    )
    if result.returncode != 0:
        pytest.fail(
            f"command failed with exit code {result.returncode}: {shlex.join(command)}\n"
            f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name!r} is not on PATH; .ci/containers.sh installs it before running this suite"
        )
    return path


@pytest.fixture(scope="module")
def docker() -> list[str]:
    command = shlex.split(os.environ.get("HARMONY_STEP_TEST_DOCKER", "docker"))
    require_tool(command[0])
    return command


@pytest.fixture(scope="module")
def image_tag() -> str:
    return os.environ.get("HARMONY_STEP_TEST_IMAGE", IMAGE_NAME)


@pytest.fixture(scope="module")
def image_config(docker: list[str], image_tag: str) -> dict:
    inspected = run([*docker, "image", "inspect", image_tag])
    return json.loads(inspected.stdout)[0]["Config"]


@pytest.fixture(scope="module")
def sif() -> Path:
    require_tool("apptainer")
    path = Path(os.environ.get("HARMONY_STEP_TEST_SIF", ""))
    if not path.is_file():
        pytest.fail(
            f"HARMONY_STEP_TEST_SIF must name the SIF built from the image, got {str(path)!r}"
        )
    return path


def cli_arguments(input_h5ad: Path | str, out_dir: Path | str) -> list[str]:
    """Arguments of one `harmony-step run` on the test dataset, writing every output."""
    out = Path(out_dir)
    return [
        "run",
        "--input", str(input_h5ad),
        "--output", str(out / "corrected.h5ad"),
        "--key", "donor",
        "--device", "cpu",
        "--convergence", str(out / "convergence.tsv"),
        "--summary", str(out / "summary.json"),
        "--plot", str(out / "convergence.png"),
    ]  # fmt: skip


def corrected_embedding(path: Path) -> np.ndarray:
    return np.asarray(ad.read_h5ad(path).obsm[CORRECTED_BASIS])


def image_env(config: dict) -> dict[str, str]:
    return dict(item.split("=", 1) for item in config["Env"])


# --- the image itself ----------------------------------------------------------------------------


def test_image_is_labelled_named_and_unprivileged(image_config: dict) -> None:
    labels = image_config["Labels"]
    assert labels["org.opencontainers.image.version"] == IMAGE_NAME.rsplit(":", 1)[1]
    assert labels["org.opencontainers.image.source"].startswith("https://")
    revision = labels["org.opencontainers.image.revision"]
    assert revision, "build with --build-arg REVISION=$(git rev-parse HEAD)"
    if "HARMONY_STEP_TEST_REVISION" in os.environ:
        assert revision == os.environ["HARMONY_STEP_TEST_REVISION"]
    env = image_env(image_config)
    assert env["HARMONY_STEP_IMAGE"] == IMAGE_NAME
    for cache in ("CUPY_CACHE_DIR", "NUMBA_CACHE_DIR", "MPLCONFIGDIR"):
        assert env[cache].startswith("/tmp/"), f"{cache} must be writable under a read-only image"
    assert image_config["User"] not in ("", "0", "root")
    assert image_config["Entrypoint"] == ["harmony-step"]


def test_version_inside_image_matches_image_tag(docker: list[str], image_tag: str) -> None:
    result = run([*docker, "run", "--rm", "--network", "none", image_tag, "--version"])
    assert IMAGE_NAME.rsplit(":", 1)[1] in result.stdout + result.stderr


def test_cuda_libraries_resolve_without_a_driver(
    docker: list[str], image_tag: str, image_config: dict
) -> None:
    """Every CUDA library CuPy loads is in the image; only the driver is missing here."""
    probe = (
        "import json, cupy\n"
        "from cuda.pathfinder import load_nvidia_dynamic_lib\n"
        "from cupy.cuda import nvrtc\n"
        "libs = ['cudart', 'nvrtc', 'cublas', 'cublasLt', 'cusolver', 'cusparse', 'curand', 'cufft']\n"
        "paths = {lib: load_nvidia_dynamic_lib(lib).abs_path for lib in libs}\n"
        "print(json.dumps({'paths': paths, 'nvrtc': nvrtc.getVersion(),\n"
        "                  'gpu': cupy.cuda.is_available()}))\n"
    )
    result = run([*docker, "run", "--rm", "--network", "none", "--entrypoint", "python",
                  image_tag, "-c", probe])  # fmt: skip
    report = json.loads(result.stdout)
    assert all(path.startswith("/opt/harmony-step/") for path in report["paths"].values()), report
    assert str(report["nvrtc"][0]) == image_env(image_config)["HARMONY_STEP_CUDA"]
    assert report["gpu"] is False


# --- (a) the same command in Docker and on the host ----------------------------------------------


def test_docker_run_matches_host_run(
    docker: list[str], image_tag: str, data_dir: Path, tmp_path: Path
) -> None:
    container_out = tmp_path / "container"
    host_out = tmp_path / "host"
    for folder in (container_out, host_out):
        folder.mkdir()
    container_out.chmod(0o777)  # the image runs as its own unprivileged user

    # The host's OpenBLAS settings go in too: OPENBLAS_CORETYPE picks the GEMM kernels, and two
    # kernels sum in different orders. (Apptainer passes the host's environment by itself.)
    blas_env = {name: value for name, value in os.environ.items() if name.startswith("OPENBLAS_")}
    thread_env = [
        arg
        for name, value in {**blas_env, **SINGLE_THREADED}.items()
        for arg in ("-e", f"{name}={value}")
    ]
    # --read-only with a /tmp tmpfs is how Apptainer presents the image: caches must go to /tmp.
    run([*docker, "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp",
         *thread_env, "-v", f"{data_dir}:/in:ro", "-v", f"{container_out}:/out", image_tag,
         *cli_arguments(Path("/in") / DATASET, "/out")])  # fmt: skip
    run([sys.executable, "-m", "harmony_step", *cli_arguments(data_dir / DATASET, host_out)],
        env={**os.environ, **SINGLE_THREADED})  # fmt: skip

    in_container = corrected_embedding(container_out / "corrected.h5ad")
    on_host = corrected_embedding(host_out / "corrected.h5ad")
    assert in_container.shape == on_host.shape
    assert in_container.dtype == on_host.dtype
    # Same package versions (the host venv is constrained by the image's lock), same BLAS threads,
    # same CPU: the corrected embedding must be the same bits.
    if not np.array_equal(in_container, on_host):
        worst = float(np.max(np.abs(in_container - on_host)) / np.max(np.abs(on_host)))
        pytest.fail(
            f"container and host embeddings differ by up to {worst:.3e} (relative); the host must "
            "install harmony-step's dependencies at the versions in container/requirements-cuda*.lock"
        )

    container_summary = json.loads((container_out / "summary.json").read_text())
    host_summary = json.loads((host_out / "summary.json").read_text())
    assert container_summary["environment"]["container"] == "docker"
    assert container_summary["environment"]["image"] == IMAGE_NAME
    assert host_summary["environment"]["image"] == "none"
    assert container_summary["input_sha256"] == host_summary["input_sha256"]
    assert container_summary["parameters"] == host_summary["parameters"]
    assert container_summary["n_rounds"] == host_summary["n_rounds"]
    assert (container_out / "convergence.png").stat().st_size > 0


def test_a_cache_volume_serves_runs_as_any_user(
    docker: list[str], image_tag: str, data_dir: Path, tmp_path: Path
) -> None:
    """``-v VOLUME:/tmp/harmony-step-cache`` keeps the compiled kernels from one container to the
    next: the image's folder there is world-writable (with the sticky bit, as /tmp), so a new
    volume is too. A run as another uid (Nextflow's ``-u $(id -u)``) finds folders of another
    user there and makes its own beside them."""
    volume = f"harmony-step-test-cache-{os.getpid()}"
    embeddings = {}
    try:
        for name, user in (("image-user", []), ("other-user", ["--user", "4321:4321"])):
            out = tmp_path / name
            out.mkdir()
            out.chmod(0o777)
            run([*docker, "run", "--rm", "--network", "none", *user,
                 "-v", f"{volume}:/tmp/harmony-step-cache", "-v", f"{data_dir}:/in:ro",
                 "-v", f"{out}:/out", image_tag, *cli_arguments(Path("/in") / DATASET, "/out")])  # fmt: skip
            embeddings[name] = corrected_embedding(out / "corrected.h5ad")
        # as root: each run's folders are private to its user
        cached = run([*docker, "run", "--rm", "--network", "none", "--user", "0:0",
                      "-v", f"{volume}:/cache", "--entrypoint", "find", image_tag, "/cache",
                      "-name", "*.nbi"]).stdout.split()  # fmt: skip
    finally:
        subprocess.run([*docker, "volume", "rm", "-f", volume], capture_output=True, check=False)
    assert any(path.startswith("/cache/numba/") for path in cached), cached
    assert any(path.startswith("/cache/numba-4321/") for path in cached), cached
    np.testing.assert_array_equal(embeddings["image-user"], embeddings["other-user"])


# --- (b) the Snakemake workflow with its container: directive, through Apptainer -----------------


def snakemake_command(checkout: Path) -> list[str]:
    """The workflow's test run: its own test configuration, working folder ``.test``."""
    return [sys.executable, "-m", "snakemake", "--snakefile", str(checkout / "workflow" / "Snakefile"),
            "--directory", str(checkout / ".test"),
            "--configfile", str(checkout / ".test" / "config" / "config.yaml"),
            "--cores", "2"]  # fmt: skip


def declared_outputs(checkout: Path) -> list[Path]:
    """Every output file of the workflow's jobs, as Snakemake's ``--summary`` lists them."""
    summary = run([*snakemake_command(checkout), "--summary"], cwd=checkout)
    rows = csv.DictReader(io.StringIO(summary.stdout), delimiter="\t")
    return [checkout / ".test" / row["output_file"] for row in rows if row.get("output_file")]


def place_image_where_snakemake_looks(sif: Path, prefix: Path) -> Path:
    """Snakemake stores an image pulled for ``container: URL`` as ``PREFIX/md5(URL).simg``."""
    url = f"docker://{IMAGE_NAME}"
    target = prefix / f"{hashlib.md5(url.encode()).hexdigest()}.simg"
    prefix.mkdir(parents=True, exist_ok=True)
    try:
        target.hardlink_to(sif)
    except OSError:  # another filesystem: a copy is slower but equivalent
        shutil.copyfile(sif, target)
    return target


@pytest.mark.parametrize(
    "deployment",
    [["--sdm", "apptainer"], ["--use-apptainer"]],
    ids=["sdm-apptainer", "use-apptainer"],
)
def test_workflow_runs_every_job_inside_the_image(
    sif: Path, tmp_path: Path, deployment: list[str]
) -> None:
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=NOT_COPIED, symlinks=True)
    prefix = tmp_path / "apptainer-images"
    place_image_where_snakemake_looks(sif, prefix)

    result = run([*snakemake_command(checkout), *deployment, "--apptainer-prefix", str(prefix)],
                 cwd=checkout)  # fmt: skip
    log = result.stdout + result.stderr
    assert "Pulling singularity image" not in log, "Snakemake did not find the pre-placed image"

    outputs = declared_outputs(checkout)
    missing = [str(path) for path in outputs if not path.exists()]
    assert not missing, f"declared outputs not written: {missing}"
    summaries = [path for path in outputs if path.name == "summary.json"]
    assert summaries, f"the workflow declares no summary.json: {sorted(map(str, outputs))}"
    for summary_path in summaries:
        dataset_outputs = {path.name for path in outputs if path.parent == summary_path.parent}
        assert "convergence.tsv" in dataset_outputs, dataset_outputs
        assert any(name.endswith(".h5ad") for name in dataset_outputs), dataset_outputs
        environment = json.loads(summary_path.read_text())["environment"]
        assert environment["container"] == "apptainer", (summary_path, environment)
        assert environment["image"] == IMAGE_NAME, (summary_path, environment)


def test_sif_carries_the_image_environment(sif: Path, tmp_path: Path) -> None:
    result = run(["apptainer", "exec", "--cleanenv", str(sif), "sh", "-c",
                  'echo "$HARMONY_STEP_IMAGE"; command -v harmony-step'], cwd=tmp_path)  # fmt: skip
    image, executable = result.stdout.split()
    assert image == IMAGE_NAME
    assert executable == "/opt/harmony-step/bin/harmony-step"


def test_definition_file_builds_the_same_environment(
    docker: list[str], image_tag: str, tmp_path: Path
) -> None:
    """container/harmony-step.def and the Dockerfile install the same packages and settings."""
    require_tool("apptainer")
    sandbox = Path(os.environ.get("HARMONY_STEP_TEST_DEF_SANDBOX", ""))
    if not sandbox.is_dir():
        pytest.fail(
            "HARMONY_STEP_TEST_DEF_SANDBOX must name a sandbox built from container/harmony-step.def, "
            f"got {str(sandbox)!r}"
        )
    report = (
        'echo "$HARMONY_STEP_IMAGE $HARMONY_STEP_CUDA"; harmony-step --version; '
        "PIP_DISABLE_PIP_VERSION_CHECK=1 python -m pip list --format=freeze"
    )
    from_docker = run([*docker, "run", "--rm", "--network", "none", "--entrypoint", "sh",
                       image_tag, "-c", report])  # fmt: skip
    from_definition = run(["apptainer", "exec", "--cleanenv", str(sandbox), "sh", "-c", report],
                          cwd=tmp_path)  # fmt: skip
    docker_lines = from_docker.stdout.splitlines()
    definition_lines = from_definition.stdout.splitlines()
    assert docker_lines[0].split()[0] == IMAGE_NAME
    assert definition_lines[0] == docker_lines[0]  # image name and CUDA major
    assert sorted(definition_lines[1:]) == sorted(docker_lines[1:])
    assert any(line.startswith("cupy-cuda") for line in docker_lines)
