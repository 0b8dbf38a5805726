"""Runs over several GPUs under a real ``srun``, as far as the one-node test cluster allows.

Needs the cluster that .ci/slurm.sh starts. Its two GPUs are stand-ins that CuPy cannot use, so
no run completes here; what is checked is how the tasks of a step see themselves (rank, size, GPU,
rendezvous host) as Slurm really sets their environment, that a batch script and a one-task step
are not taken for a multi-task step, and that ``harmony-step run --gpus 2`` under ``srun`` fails
on every task with one clear line, no hang and no output. tests/test_multigpu.py runs on real GPUs.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
SRUN_TIMEOUT_S = 120
TASK_PROBE = (
    "import json, os; from harmony_step._distributed.slurm import current_task; "
    "t = current_task(os.environ); "
    "print(json.dumps(None if t is None else {**t.__dict__, "
    "'cuda': os.environ.get('CUDA_VISIBLE_DEVICES')}))"
)


def srun(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["timeout", "-s", "KILL", str(SRUN_TIMEOUT_S), "srun", *args],
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def cluster() -> None:
    ping = subprocess.run(
        ["timeout", "-s", "KILL", "10", "scontrol", "ping"], capture_output=True, text=True
    )
    if ping.returncode != 0 or "UP" not in ping.stdout:
        pytest.fail("no Slurm controller answers; start one with .ci/slurm.sh")


def test_each_task_of_a_step_knows_its_rank_gpu_and_the_rendezvous_host(cluster):
    done = srun("-n", "2", "--gpus-per-task=1", sys.executable, "-c", TASK_PROBE)
    assert done.returncode == 0, done.stderr
    tasks = sorted((json.loads(line) for line in done.stdout.splitlines()), key=lambda t: t["rank"])
    assert [(t["rank"], t["size"], t["local_rank"]) for t in tasks] == [(0, 2, 0), (1, 2, 1)]
    assert {t["host"] for t in tasks} == {socket.gethostname().split(".")[0]}
    assert len({t["port"] for t in tasks}) == 1  # both derive the same port from the step
    assert sorted(t["cuda"] for t in tasks) == ["0", "1"]  # one bound GPU each


def test_a_one_task_step_and_a_batch_script_are_not_a_multi_task_step(cluster, tmp_path):
    done = srun("-n", "1", sys.executable, "-c", TASK_PROBE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "null"

    out = tmp_path / "batch.out"
    job = subprocess.run(
        ["sbatch", "--parsable", "--ntasks=2", "-o", str(out), "--wrap",
         f"{sys.executable} -c \"{TASK_PROBE}\""],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()  # fmt: skip
    deadline = time.monotonic() + SRUN_TIMEOUT_S
    while time.monotonic() < deadline:
        queued = subprocess.run(
            ["squeue", "-h", "-j", job, "-t", "PD,R,CG"], capture_output=True, text=True
        )
        if not queued.stdout.strip():
            break
        time.sleep(0.5)
    assert out.read_text().strip() == "null"


def test_the_command_on_tasks_without_a_usable_gpu_fails_on_every_task_with_one_line(
    cluster, data_dir, tmp_path
):
    output = tmp_path / "out.h5ad"
    done = srun(
        "-n", "2", "--gpus-per-task=1", "--kill-on-bad-exit=1", str(BIN / "harmony-step"), "run",
        "--gpus", "2", "--input", str(data_dir / "pbmc_3500" / "pbmc_3500.h5ad"),
        "--output", str(output), "--key", "donor",
    )  # fmt: skip
    # The first task to fail exits 3; --kill-on-bad-exit may end the other before it says so.
    assert done.returncode != 0, done.stderr
    assert "Exited with exit code 3" in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("harmony-step: error:")]
    assert 1 <= len(errors) <= 2, done.stderr
    assert all(" sees no GPU: request one per task" in line for line in errors), errors
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []


def test_gpus_must_match_the_tasks_of_the_step(cluster, data_dir, tmp_path):
    done = srun(
        "-n", "2", str(BIN / "harmony-step"), "run", "--gpus", "4",
        "--input", str(data_dir / "pbmc_3500" / "pbmc_3500.h5ad"),
        "--output", str(tmp_path / "out.h5ad"), "--key", "donor",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "n_gpus=4 (--gpus) must equal the number of tasks srun started (2" in done.stderr
    assert list(tmp_path.iterdir()) == []
