"""Runs spread over two GPUs, on a machine that has them (skipped elsewhere, saying why).

Every run here is a real one: one process per GPU, NCCL between them. The agreement tests of
tests/test_api.py are repeated on two GPUs; a two-GPU run must be the same bit for bit from run
to run and agree with the one-GPU run to 1e-10 relative in float64; a worker killed mid-run must
give one clear error and no hang; the command must run with --gpus 2. Runs that could hang if
the failure handling broke run in a child process with a time limit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from harmony_step import HarmonyConvergenceWarning, WorkerFailedError, harmony_integrate
from harmony_step._distributed import environment, launcher
from harmony_step._distributed.processes import WORKER_MODULE
from harmony_step._errors import RendezvousTimeoutError, TooFewGPUsError
from tests.reference import min_pc_correlation, relative_frobenius

REPO = Path(__file__).resolve().parents[1]
VISIBLE = environment.visible_gpus()
NCCL_PROBLEM = environment.nccl_problem() if VISIBLE >= 2 else None
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        VISIBLE < 2, reason=f"needs 2 GPUs visible to CuPy; this machine has {VISIBLE}"
    ),
    pytest.mark.skipif(
        NCCL_PROBLEM is not None, reason=f"needs NCCL with its 2 GPUs: {NCCL_PROBLEM}"
    ),
]

DATASETS = {"pbmc_3500": "donor", "cell_lines": "dataset"}
DTYPES = [pytest.param(np.float64, id="float64"), pytest.param(np.float32, id="float32")]
_SCRIPT = Path(sys.executable).with_name("harmony-step")
# The installed command where there is one, else the same entry point through the interpreter.
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "harmony_step"]
CHILD_TIMEOUT_S = 300


def load(data_dir: Path, name: str) -> ad.AnnData:
    return ad.read_h5ad(data_dir / name / f"{name}.h5ad")


def integrate(adata: ad.AnnData, key, **kwargs) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HarmonyConvergenceWarning)
        harmony_integrate(adata, key, **kwargs)
    return adata.obsm[kwargs.get("adjusted_basis", "X_pca_harmony")].copy()


def realistic(n_cells: int, seed: int = 0) -> ad.AnnData:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from realistic_data import generate
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return generate(n_cells, seed).to_anndata()


def children(pid: int) -> list[int]:
    """PIDs of the processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def worker_pids(parent: int) -> list[int]:
    """The worker processes among the children of ``parent`` (by their own argument list)."""
    pids = []
    for pid in children(parent):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if WORKER_MODULE in argv:
            pids.append(pid)
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def run_child(code: str, timeout: float = CHILD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """``code`` in a new Python process of its own session, killed with its children when it
    outlives ``timeout`` (which fails the test: something hung)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the run hung for {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


# --- results ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(DATASETS))
def test_two_gpu_runs_are_the_same_bit_for_bit(data_dir, name, dtype):
    adata = load(data_dir, name)
    first = integrate(adata, DATASETS[name], dtype=dtype, n_gpus=2)
    record = adata.uns["harmony"]
    second = integrate(adata, DATASETS[name], dtype=dtype, n_gpus=2)
    assert np.array_equal(first, second)
    np.testing.assert_array_equal(
        record["iterations"]["objective"], adata.uns["harmony"]["iterations"]["objective"]
    )
    assert record["params"]["n_gpus"] == 2
    assert record["resolved"]["device"] == "gpu"


@pytest.mark.parametrize(("dtype", "tolerance"), [(np.float64, 1e-10), (np.float32, 1e-3)])
@pytest.mark.parametrize("name", list(DATASETS))
def test_two_gpus_agree_with_one(data_dir, name, dtype, tolerance):
    adata = load(data_dir, name)
    one = integrate(adata, DATASETS[name], dtype=dtype, device="gpu")
    one_record = adata.uns["harmony"]
    two = integrate(adata, DATASETS[name], dtype=dtype, n_gpus=2)
    difference = relative_frobenius(two, one)
    print(f"{name} {np.dtype(dtype).name}: 2 GPUs vs 1 rel F {difference:.2e}")
    assert difference <= tolerance
    assert adata.uns["harmony"]["n_rounds"] == one_record["n_rounds"]
    if dtype is np.float64:
        np.testing.assert_array_equal(
            adata.uns["harmony"]["rounds"]["inner_iterations"],
            one_record["rounds"]["inner_iterations"],
        )


def test_two_gpus_agree_with_one_on_realistic_data():
    adata = realistic(400_000, seed=3)
    kwargs = {"dtype": np.float64, "max_iter_harmony": 10, "random_state": 0}
    one = integrate(adata, "batch", device="gpu", **kwargs)
    two = integrate(adata, "batch", n_gpus=2, **kwargs)
    difference = relative_frobenius(two, one)
    print(f"realistic 400,000 float64: 2 GPUs vs 1 rel F {difference:.2e}")
    assert difference <= 1e-10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(DATASETS))
def test_harmony2_on_two_gpus_agrees_with_r_harmony_2(data_dir, name, dtype):
    adata = load(data_dir, name)
    ours = integrate(adata, DATASETS[name], dtype=dtype, n_gpus=2)
    reference = adata.obsm["X_pca_harmony_R_2.0.4_seed1"]
    assert min_pc_correlation(ours, reference) >= 0.995
    assert relative_frobenius(ours, reference) <= 0.05
    assert ours.dtype == np.dtype(dtype)


def test_harmony1_on_two_gpus_agrees_with_pre_2_r_harmony(data_dir):
    adata = load(data_dir, "pbmc_3500")
    ours = integrate(adata, "donor", flavor="harmony1", n_gpus=2)
    reference = adata.obsm["X_pca_harmony_R_v1_shipped"]
    assert min_pc_correlation(ours, reference) >= 0.99
    assert relative_frobenius(ours, reference) <= 0.06


def test_correction_strategies_agree_on_two_gpus(data_dir):
    adata = load(data_dir, "pbmc_3500")
    runs = {
        method: integrate(adata, "donor", correction_method=method, max_iter_harmony=4, n_gpus=2)
        for method in ("original", "fast", "batched")
    }
    for method in ("original", "fast"):
        assert relative_frobenius(runs[method], runs["batched"]) <= 1e-10, method


@pytest.mark.parametrize("name", list(DATASETS))
def test_two_gpus_match_the_cpu(data_dir, name):
    """float64 closely; float32 within float32's own noise on these runs (its distance from
    float64 on the CPU), as in test_api's one-GPU check."""
    adata = load(data_dir, name)
    cpu64 = integrate(adata, DATASETS[name], dtype=np.float64, device="cpu").copy()
    cpu32 = integrate(adata, DATASETS[name], dtype=np.float32, device="cpu").copy()
    two64 = integrate(adata, DATASETS[name], dtype=np.float64, n_gpus=2).copy()
    two32 = integrate(adata, DATASETS[name], dtype=np.float32, n_gpus=2)
    assert relative_frobenius(two64, cpu64) <= 1e-6
    noise = relative_frobenius(cpu32, cpu64)
    assert relative_frobenius(two32, cpu32) <= max(3 * noise, 1e-4)


@pytest.mark.parametrize(("name", "r_ilisi"), [("pbmc_3500", 2.32), ("cell_lines", 1.73)])
def test_mixing_on_two_gpus_matches_r_harmony(data_dir, name, r_ilisi):
    from harmony_step._step.metrics import lisi

    adata = load(data_dir, name)
    ours = integrate(adata, DATASETS[name], n_gpus=2)
    ilisi = float(np.median(lisi(ours, adata.obs[DATASETS[name]].to_numpy())))
    assert abs(ilisi - r_ilisi) <= 0.05


def test_each_gpu_holds_about_half_of_what_one_gpu_needs():
    adata = realistic(4_000_000, seed=1)
    kwargs = {"dtype": np.float32, "max_iter_harmony": 2}
    integrate(adata, "batch", device="gpu", **kwargs)
    one = int(adata.uns["harmony"]["peak_gpu_memory_bytes"])
    integrate(adata, "batch", n_gpus=2, **kwargs)
    two = int(adata.uns["harmony"]["peak_gpu_memory_bytes"])
    print(f"peak GPU memory: 1 GPU {one / 2**30:.2f} GiB, 2 GPUs {two / 2**30:.2f} GiB per GPU")
    assert 0 < two <= 0.75 * one


def test_one_gpu_loads_no_nccl_and_starts_no_process():
    done = run_child(
        """
        import os, sys, warnings
        import numpy as np, anndata as ad, pandas as pd
        from harmony_step import harmony_integrate
        rng = np.random.default_rng(0)
        obs = pd.DataFrame({"b": pd.Categorical(rng.choice(["x", "y"], 500))},
                           index=[str(i) for i in range(500)])
        adata = ad.AnnData(obs=obs, obsm={"X_pca": rng.normal(size=(500, 10))})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            harmony_integrate(adata, "b", device="gpu", max_iter_harmony=2)
        loaded = [m for m in sys.modules
                  if m.startswith(("harmony_step._distributed", "cupyx.distributed"))
                  or m.endswith("nccl")]
        print(loaded)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- the command ----------------------------------------------------------------------------


def test_the_command_runs_on_two_gpus(data_dir, tmp_path):
    pbmc = data_dir / "pbmc_3500" / "pbmc_3500.h5ad"
    out, summary = tmp_path / "out.h5ad", tmp_path / "summary.json"
    done = subprocess.run(
        [*COMMAND, "run", "--input", str(pbmc), "--output", str(out), "--key", "donor",
         "--gpus", "2", "--device", "gpu", "--summary", str(summary), "--embedding-only"],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads(summary.read_text())
    assert record["parameters"]["n_gpus"] == 2
    assert record["device"]["kind"] == "gpu"
    written = ad.read_h5ad(out).obsm["X_pca_harmony"]
    api = integrate(load(data_dir, "pbmc_3500"), "donor", device="gpu", n_gpus=2)
    assert np.array_equal(written, api)
    one = integrate(load(data_dir, "pbmc_3500"), "donor", device="gpu")
    assert relative_frobenius(written, one) <= 1e-10
    assert worker_pids(os.getpid()) == []


def test_a_worker_killed_under_the_command_gives_exit_6_one_line_and_no_output(tmp_path):
    adata = realistic(1_000_000, seed=2)
    source = tmp_path / "in" / "realistic.h5ad"
    source.parent.mkdir()
    adata.write_h5ad(source)
    out = tmp_path / "out"
    out.mkdir()
    process = subprocess.Popen(
        [*COMMAND, "run", "--input", str(source), "--output", str(out / "o.h5ad"),
         "--key", "batch", "--gpus", "2", "--summary", str(out / "s.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    lines, killed = [], None
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    try:
        for line in process.stderr:
            lines.append(line)
            if killed is None and re.search(r"round 1/", line):
                # Rank 0 is held still while its worker dies, so the run cannot end first.
                os.kill(process.pid, signal.SIGSTOP)
                (worker,) = worker_pids(process.pid)
                os.kill(worker, signal.SIGKILL)
                killed = worker
                os.kill(process.pid, signal.SIGCONT)
            if time.monotonic() > deadline:
                break
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the command hung after its worker was killed:\n" + "".join(lines[-20:]))
    assert killed is not None, "".join(lines)
    errors = [line for line in lines if line.startswith("harmony-step: error:")]
    assert len(errors) == 1, "".join(lines)
    assert code == 6, "".join(lines)
    assert re.search(
        rf"GPU rank 1 \(process {killed}\) was killed by signal 9 \(SIGKILL\)", errors[0]
    ), errors[0]
    assert list(out.iterdir()) == []  # no output, no temporary file
    assert not alive(killed)


# --- failures, in a child process with a time limit -------------------------------------------

PREAMBLE = f"""
import json, logging, os, signal, sys, time, warnings
from pathlib import Path
import anndata as ad
from harmony_step import harmony_integrate

def worker_pids(parent):
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().decode().split(chr(0))
        except OSError:
            continue
        # the worker's own argument, not the text of a program that mentions it
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and "{WORKER_MODULE}" in argv:
            pids.append(int(entry.name))
    return pids

class AtFirstRound(logging.Handler):
    done = False

    def emit(self, record):
        if getattr(record, "harmony_round", None) == 1 and not self.done:
            self.done = True
            at_first_round()  # defined by the test

logger = logging.getLogger("harmony_step.progress")
logger.setLevel(logging.INFO)
logger.addHandler(AtFirstRound())
"""

RUN = """
adata = ad.read_h5ad("tests/data/pbmc_3500/pbmc_3500.h5ad")
start = time.monotonic()
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        harmony_integrate(adata, "donor", n_gpus=2)
    outcome = {"error": None}
except Exception as err:
    outcome = {"error": type(err).__name__, "message": str(err),
               "rank": getattr(err, "rank", None), "returncode": getattr(err, "returncode", None)}
outcome["seconds"] = time.monotonic() - start
outcome["written"] = "X_pca_harmony" in adata.obsm
outcome["workers_left"] = worker_pids(os.getpid())
print(json.dumps(outcome))
"""


def test_a_worker_killed_mid_run_gives_one_clear_error_and_no_hang():
    # Killed from rank 0's own round report: the run cannot end before the kill lands.
    kill_worker = """
def at_first_round():
    (pid,) = worker_pids(os.getpid())
    print(json.dumps({"worker": pid}), flush=True)
    os.kill(pid, signal.SIGKILL)
"""
    done = run_child(PREAMBLE + kill_worker + RUN)
    assert done.returncode == 0, done.stderr
    first, outcome = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert outcome["error"] == "WorkerFailedError", outcome
    assert outcome["rank"] == 1
    assert outcome["returncode"] == -signal.SIGKILL
    assert outcome["message"].startswith(
        f"GPU rank 1 (process {first['worker']}) was killed by signal 9 (SIGKILL)"
    )
    assert outcome["seconds"] < 60
    assert outcome["written"] is False
    assert outcome["workers_left"] == []


def test_workers_exit_when_rank_0_dies():
    kill_rank_0 = """
def at_first_round():
    (pid,) = worker_pids(os.getpid())
    print(json.dumps({"worker": pid}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    done = run_child(PREAMBLE + kill_rank_0 + RUN)
    assert done.returncode == -signal.SIGKILL, done.stderr
    worker = json.loads(done.stdout.strip().splitlines()[0])["worker"]
    deadline = time.monotonic() + 30
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(worker), "the worker outlived rank 0"


def test_more_gpus_than_visible_are_refused_before_any_process_starts(data_dir):
    adata = load(data_dir, "pbmc_3500")
    before = set(children(os.getpid()))
    with pytest.raises(TooFewGPUsError, match=rf"n_gpus={VISIBLE + 1} GPUs were requested, but "):
        harmony_integrate(adata, "donor", n_gpus=VISIBLE + 1)
    assert set(children(os.getpid())) <= before
    assert "X_pca_harmony" not in adata.obsm


def test_a_rendezvous_that_never_completes_times_out(data_dir, monkeypatch):
    monkeypatch.setenv(environment.TIMEOUT_VARIABLE, "5")
    adata = load(data_dir, "pbmc_3500")
    never = [sys.executable, "-c", "import time; time.sleep(120)"]
    monkeypatch.setattr(launcher, "worker_command", lambda rank, size, host, port, timeout: never)
    start = time.monotonic()
    with pytest.raises(
        RendezvousTimeoutError, match=r"not every process of the run joined within 5 s"
    ):
        harmony_integrate(adata, "donor", n_gpus=2)
    assert time.monotonic() - start < 60
    import multiprocessing

    assert not [p for p in multiprocessing.active_children() if "cupyx" in type(p).__module__]
    stand_ins = [
        pid
        for pid in children(os.getpid())
        if alive(pid) and b"sleep(120)" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert stand_ins == []


def test_worker_failed_error_is_public():
    assert issubclass(WorkerFailedError, RuntimeError)
