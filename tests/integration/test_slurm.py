"""The workflow on a real Slurm cluster: GPU jobs, a failing input, and recovery after a kill.

Needs the one-node cluster that .ci/slurm.sh starts (it also sets HARMONY_STEP_INTEGRATION=1).
Snakemake runs with the slurm-gpu profile minus its container settings (Apptainer is not part of
this cluster), plus the options a cluster without an accounting database needs. The datasets run
with ``device: auto``, so every Harmony job asks Slurm for a GPU and gets one of the node's two
declared GPUs; the GPUs are stand-ins that CuPy cannot use, so Harmony itself falls back to the
CPU. (A dataset with ``device: cpu`` asks for no GPU; tests/test_workflow.py checks that.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import yaml

from tests.reference import RESULT_FILES

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SNAKEFILE = REPO / "workflow" / "Snakefile"
SLURM_PROFILE = REPO / "workflow" / "profiles" / "slurm-gpu" / "config.yaml"
TEST_CONFIG = REPO / ".test" / "config" / "config.yaml"
BIN = Path(sys.executable).parent

# Options a cluster without slurmdbd needs (job states from squeue, no account to guess), a first
# status check after 1 s instead of 40, and the Slurm logs of successful jobs kept as evidence of
# where each job ran.
TEST_CLUSTER_OPTIONS = {
    "slurm-status-command": "squeue",
    "slurm-no-account": True,
    "slurm-init-seconds-before-status-checks": 1,
    "slurm-keep-successful-logs": True,
}
SNAKEMAKE_TIMEOUT_S = 600
SLURM_COMMAND_TIMEOUT_S = 20
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")
SBATCH_CALL = re.compile(r"^sbatch call: (sbatch .*)$", re.MULTILINE)


# --- running Snakemake and reading back what Slurm did -----------------------------------------


@dataclass
class SlurmJob:
    """One submission of a Harmony job: its Slurm id, dataset, and the sbatch options used."""

    job_id: str
    dataset: str
    log: Path
    sbatch_options: dict[str, str]


@dataclass
class WorkflowRun:
    workdir: Path
    returncode: int
    output: str

    @property
    def jobs(self) -> list[SlurmJob]:
        return slurm_jobs(self.output)

    def results(self, dataset: str) -> Path:
        return self.workdir / "results" / dataset


def slurm(*command: str) -> str:
    """Output of a Slurm client command; fails the test if the command fails."""
    done = subprocess.run(
        ["timeout", "-s", "KILL", str(SLURM_COMMAND_TIMEOUT_S), *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert done.returncode == 0, f"{shlex.join(command)} failed:\n{done.stdout}"
    return done.stdout


def job_record(job_id: str) -> dict[str, str]:
    """Slurm's own record of a job (``scontrol show job``), as a mapping of its fields."""
    record = slurm("scontrol", "show", "job", "--details", "--oneliner", job_id)
    return dict(re.findall(r"(\w+)=(\S*)", record))


def sbatch_options(call: str) -> dict[str, str]:
    """The resource options of an sbatch command line (``-t``, ``--mem``, ``--gpus``, ...)."""
    tokens = shlex.split(call.split(" --wrap=", 1)[0])[1:]
    options = {}
    position = 0
    while position < len(tokens):
        name, _, value = tokens[position].partition("=")
        if not value and position + 1 < len(tokens) and not tokens[position + 1].startswith("-"):
            value = tokens[position + 1]
            position += 1
        options[name] = value
        position += 1
    return options


def slurm_jobs(output: str) -> list[SlurmJob]:
    """Every Harmony job Snakemake submitted, in submission order, from its --verbose output."""
    calls_by_log = {}
    for call in SBATCH_CALL.findall(output):
        options = sbatch_options(call)
        calls_by_log.setdefault(options["--output"], []).append(options)
    jobs = []
    for job_id, log in SUBMITTED.findall(output):
        log = Path(log)
        options = calls_by_log[str(log.with_name("%j.log"))].pop(0)
        jobs.append(SlurmJob(job_id, log.parent.name, log, options))
    return jobs


def write_run_folder(workdir: Path, datasets: dict[str, dict]) -> Path:
    """A working directory with the .test config for ``datasets`` and the Slurm test profile."""
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["datasets"] = datasets
    config["device"] = "auto"  # a GPU job on Slurm; harmony-step falls back to the CPU here
    (workdir / "config").mkdir(parents=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    profile = yaml.safe_load(SLURM_PROFILE.read_text())
    del profile["software-deployment-method"], profile["apptainer-args"]
    profile.update(TEST_CLUSTER_OPTIONS)
    (workdir / "profile").mkdir()
    (workdir / "profile" / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return workdir


def snakemake_command(workdir: Path, *args: str, profile: bool = True) -> list[str]:
    profile_args = ["--profile", str(workdir / "profile"), "--verbose"] if profile else []
    return [
        "timeout",
        "-s",
        "KILL",
        str(SNAKEMAKE_TIMEOUT_S),
        str(BIN / "snakemake"),
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config" / "config.yaml"),
        *profile_args,
        *args,
    ]


def snakemake_environment() -> dict[str, str]:
    # sbatch passes the environment on (--export=ALL): the jobs find harmony-step and Snakemake.
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def run_workflow(workdir: Path, *args: str, profile: bool = True) -> WorkflowRun:
    done = subprocess.run(
        snakemake_command(workdir, *args, profile=profile),
        env=snakemake_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run = WorkflowRun(workdir, done.returncode, done.stdout)
    (workdir / f"snakemake-{time.monotonic_ns()}.out").write_text(done.stdout)
    return run


def cancel(job_ids: list[str]) -> None:
    """End jobs that may still be queued or running, and wait until Slurm has ended them."""
    if not job_ids:
        return
    # scancel complains about jobs that already ended; those need nothing.
    subprocess.run(
        ["timeout", "-s", "KILL", str(SLURM_COMMAND_TIMEOUT_S), "scancel", *job_ids],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    active = ["squeue", "--noheader", "--states=PENDING,RUNNING,COMPLETING"]
    deadline = time.monotonic() + 60
    while slurm(*active, "--jobs", ",".join(job_ids)).strip():
        assert time.monotonic() < deadline, f"Slurm jobs {job_ids} still active after scancel"
        time.sleep(0.5)


def embedding(run: WorkflowRun, dataset: str) -> np.ndarray:
    adata = ad.read_h5ad(run.results(dataset) / "integrated.h5ad")
    return adata.obsm["X_pca_harmony"]


def minutes_as_slurm_time(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def tail(text: str) -> str:
    return text[-6000:]


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_cluster() -> str:
    """The node of the running test cluster; the tests fail (not skip) when there is none."""
    ping = subprocess.run(
        ["timeout", "-s", "KILL", "10", "scontrol", "ping"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if ping.returncode != 0 or "UP" not in ping.stdout:
        pytest.fail(
            f"no Slurm controller answers ({ping.stdout.strip()}); start one with .ci/slurm.sh"
        )
    node, gres = slurm("sinfo", "--noheader", "--Node", "--format=%N %G").split()[:2]
    assert gres.startswith("gpu:"), f"the test node declares no GPU ({gres}); see .ci/slurm.sh"
    return node


@pytest.fixture(scope="module")
def datasets(data_dir) -> dict[str, dict]:
    return {
        "pbmc": {"input": str(data_dir / "pbmc_3500" / "pbmc_3500.h5ad"), "key": "donor"},
        "cell_lines": {
            "input": str(data_dir / "cell_lines" / "cell_lines.h5ad"),
            "key": "dataset",
            "label_key": "cell_type",
        },
    }


@pytest.fixture(scope="module")
def undisturbed_run(slurm_cluster, datasets, tmp_path_factory) -> WorkflowRun:
    """Both datasets through Slurm from start to finish."""
    workdir = write_run_folder(tmp_path_factory.mktemp("undisturbed"), datasets)
    run = run_workflow(workdir)
    yield run
    cancel([job.job_id for job in run.jobs])


# --- tests ----------------------------------------------------------------------------------------


def test_every_dataset_is_integrated_by_its_own_slurm_gpu_job(
    undisturbed_run, datasets, slurm_cluster
):
    run = undisturbed_run
    assert run.returncode == 0, tail(run.output)

    assert sorted(job.dataset for job in run.jobs) == sorted(datasets)
    for job in run.jobs:
        record = job_record(job.job_id)
        assert record["JobState"] == "COMPLETED", record
        assert record["NodeList"] == slurm_cluster
        # What Slurm granted is what the profile and the workflow asked for.
        assert job.sbatch_options["--gpus"] == "1"
        assert record["TresPerJob"] == "gres:gpu:1"
        assert record["NumCPUs"] == job.sbatch_options["--cpus-per-task"]
        assert record["MinMemoryNode"] == f"{job.sbatch_options['--mem']}M"
        assert record["TimeLimit"] == minutes_as_slurm_time(int(job.sbatch_options["-t"]))
        # The job's own log: Snakemake inside the allocation ran this dataset's harmony-step.
        job_log = job.log.read_text()
        assert f"dataset={job.dataset}" in job_log
        assert "harmony-step run --input" in job_log

    for name, dataset in datasets.items():
        results = run.results(name)
        for filename in RESULT_FILES:
            assert (results / filename).stat().st_size > 0, f"{name}: {filename} is empty"
        n_cells = ad.read_h5ad(dataset["input"]).n_obs
        corrected = embedding(run, name)
        assert corrected.shape[0] == n_cells
        assert np.isfinite(corrected).all()
        summary = json.loads((results / "summary.json").read_text())
        assert summary["environment"]["hostname"] == slurm_cluster
        assert summary["device"]["kind"] == "cpu"
        assert len((results / "convergence.tsv").read_text().splitlines()) > 1
        assert (results / "convergence.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_an_input_that_fails_in_its_job_fails_alone_and_the_other_dataset_completes(
    slurm_cluster, datasets, data_dir, tmp_path
):
    # Its names are all there, so the check before the run passes it (a truncated or misnamed
    # input would stop the run before any job); the NaN in its embedding fails the job itself.
    broken = tmp_path / "broken.h5ad"
    shutil.copyfile(data_dir / "cell_lines" / "cell_lines.h5ad", broken)
    with h5py.File(broken, "r+") as handle:
        handle["obsm"]["X_pca"][0, 0] = np.nan
    workdir = write_run_folder(
        tmp_path / "run",
        {"pbmc": datasets["pbmc"], "broken": {"input": str(broken), "key": "dataset"}},
    )

    run = run_workflow(workdir)
    try:
        assert run.returncode != 0, tail(run.output)
        assert "Error in rule harmony" in run.output

        # The good dataset completed in spite of the failure (keep-going).
        for filename in RESULT_FILES:
            assert (run.results("pbmc") / filename).is_file(), filename
        # The failing one left no output, only its log with one clear error line.
        assert not any((run.results("broken") / name).exists() for name in RESULT_FILES)
        log = (workdir / "results" / "logs" / "harmony" / "broken.log").read_text()
        errors = [line for line in log.splitlines() if line.startswith("harmony-step: error:")]
        assert len(errors) == 1, log
        assert "non-finite" in errors[0]
        assert "Traceback" not in log

        # Slurm ran it twice (retries: 1), the second time with twice the memory and time.
        attempts = [job for job in run.jobs if job.dataset == "broken"]
        assert len(attempts) == 2, tail(run.output)
        first, second = (attempt.sbatch_options for attempt in attempts)
        assert int(second["--mem"]) == 2 * int(first["--mem"])
        assert int(second["-t"]) == 2 * int(first["-t"])
        for attempt in attempts:
            record = job_record(attempt.job_id)
            assert record["JobState"] == "FAILED", record
            assert record["MinMemoryNode"] == f"{attempt.sbatch_options['--mem']}M"
        (good,) = [job for job in run.jobs if job.dataset == "pbmc"]
        assert job_record(good.job_id)["JobState"] == "COMPLETED"
    finally:
        cancel([job.job_id for job in run.jobs])


def kill_job_processes(job_ids: list[str]) -> None:
    """SIGKILL every process of the jobs at once, as the kernel's OOM killer or a node crash would.

    Unlike scancel, this leaves Snakemake inside the job no chance to remove what it wrote.
    """
    pids = []
    for job_id in job_ids:
        listing = slurm("scontrol", "listpids", job_id).splitlines()[1:]
        pids += [int(line.split()[0]) for line in listing]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("kill", ["scancel", "sigkill"])
def test_after_a_kill_rerun_incomplete_gives_the_undisturbed_embedding(
    kill, undisturbed_run, datasets, tmp_path
):
    assert undisturbed_run.returncode == 0, tail(undisturbed_run.output)
    workdir = write_run_folder(tmp_path / "run", datasets)
    output_file = workdir / "killed-snakemake.out"
    started_output = workdir / "results" / "cell_lines" / "params.yaml"
    final_output = workdir / "results" / "cell_lines" / "integrated.h5ad"

    # Start the workflow; once the cell_lines job has begun writing its outputs, kill Snakemake
    # (as a lost login session would), then the Slurm jobs it left running.
    with output_file.open("w") as output:
        snakemake = subprocess.Popen(
            snakemake_command(workdir),
            env=snakemake_environment(),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SNAKEMAKE_TIMEOUT_S
        while not started_output.exists():
            assert snakemake.poll() is None, tail(output_file.read_text())
            assert time.monotonic() < deadline, tail(output_file.read_text())
            time.sleep(0.1)
    finally:
        os.killpg(snakemake.pid, signal.SIGKILL)
        snakemake.wait()
    job_ids = [job.job_id for job in slurm_jobs(output_file.read_text())]
    cell_lines_job = next(
        job for job in slurm_jobs(output_file.read_text()) if job.dataset == "cell_lines"
    )
    assert job_record(cell_lines_job.job_id)["JobState"] == "RUNNING"
    if kill == "sigkill":
        kill_job_processes(job_ids)
    cancel(job_ids)
    assert not final_output.exists(), "the job finished before it could be killed"

    # The killed Snakemake left its lock behind.
    assert run_workflow(workdir, "--unlock").returncode == 0
    if kill == "sigkill":
        # Outputs of a job that never finished are still there: Snakemake without
        # --rerun-incomplete (no profile) refuses to trust them.
        assert started_output.exists()
        refused = run_workflow(workdir, "--dry-run", profile=False)
        assert refused.returncode != 0, tail(refused.output)
        assert "IncompleteFilesException" in refused.output, tail(refused.output)

    rerun = run_workflow(workdir)
    try:
        assert rerun.returncode == 0, tail(rerun.output)
        assert "cell_lines" in {job.dataset for job in rerun.jobs}
        for name in datasets:
            for filename in RESULT_FILES:
                assert (rerun.results(name) / filename).is_file(), f"{name}: {filename}"
            expected, got = embedding(undisturbed_run, name), embedding(rerun, name)
            assert got.dtype == expected.dtype
            assert got.shape == expected.shape
            assert got.tobytes() == expected.tobytes(), f"{name}: embedding differs after rerun"
    finally:
        cancel([job.job_id for job in rerun.jobs])
