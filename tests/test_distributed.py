"""Runs over several GPUs, as far as a machine without GPUs can check them.

The data path (job, codes, rows, result) runs for real between threads that stand in for the
GPU processes (:class:`ThreadComm`, NumPy buffers instead of device ones). The watcher of the
worker processes runs real child processes that fail the ways GPU processes do. The set-up errors
are the ones a user meets here: no GPU, no NCCL, n_gpus with device='cpu'. The runs on two real
GPUs are in tests/test_multigpu.py.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from harmony_step import MultiGPUSetupError, WorkerFailedError, harmony_integrate
from harmony_step._backend import Backend, GPUUnavailableError, gpu_available
from harmony_step._batches import BatchDesign
from harmony_step._core.result import HarmonyResult
from harmony_step._distributed import environment, launcher, processes, protocol, slurm, worker
from harmony_step._distributed.comm import PeerLostError
from harmony_step._distributed.rows import byte_chunks, row_range
from harmony_step._errors import NCCLUnavailableError, TooFewGPUsError
from harmony_step._params import HarmonyParams
from harmony_step.cli import EXIT_BAD_INPUT, EXIT_GPU_MEMORY, EXIT_MULTI_GPU, EXIT_NO_GPU, exit_code

# --- rows ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_cells", [2, 3, 7, 10, 1001])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_row_ranges_are_contiguous_near_equal_and_cover_every_cell(n_cells, size):
    ranges = [row_range(n_cells, size, rank) for rank in range(size)]
    assert ranges[0][0] == 0
    assert ranges[-1][1] == n_cells
    assert all(ranges[r][1] == ranges[r + 1][0] for r in range(size - 1))
    lengths = [stop - start for start, stop in ranges]
    assert max(lengths) - min(lengths) <= 1
    assert ranges == [(r * n_cells // size, (r + 1) * n_cells // size) for r in range(size)]


@pytest.mark.parametrize(
    ("n_cells", "size", "rank"), [(10, 0, 0), (10, 2, 2), (10, 2, -1), (-1, 2, 0)]
)
def test_row_range_refuses_impossible_splits(n_cells, size, rank):
    with pytest.raises(ValueError, match="row_range needs"):
        row_range(n_cells, size, rank)


def test_byte_chunks_cover_the_bytes_in_order():
    assert byte_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert byte_chunks(0, 4) == []
    assert byte_chunks(4, 4) == [(0, 4)]


# --- the data path, between threads -------------------------------------------------------------


class ThreadWorld:
    """What the ranks of a run share when they are threads of one process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=20)
        self.slots: list[np.ndarray | None] = [None] * size
        self.mail = {(a, b): queue.Queue() for a in range(size) for b in range(size)}


class ThreadComm:
    """The communicator interface of ``harmony_step._distributed.comm.NcclComm`` on NumPy arrays."""

    def __init__(self, world: ThreadWorld, rank: int) -> None:
        self.world, self.rank, self.size = world, rank, world.size
        self.sums = 0

    def all_sum(self, array: np.ndarray) -> None:
        self.sums += 1
        self.world.slots[self.rank] = array.copy()
        self.world.barrier.wait()
        total = self.world.slots[0].copy()
        for other in self.world.slots[1:]:
            total += other
        self.world.barrier.wait()
        array[...] = total

    def broadcast(self, array: np.ndarray, root: int = 0) -> None:
        if self.rank == root:
            self.world.slots[root] = array.copy()
        self.world.barrier.wait()
        if self.rank != root:
            array[...] = self.world.slots[root]
        self.world.barrier.wait()

    def send(self, array: np.ndarray, peer: int) -> None:
        self.world.mail[self.rank, peer].put(array.copy())

    def recv(self, array: np.ndarray, peer: int) -> None:
        array[...] = self.world.mail[peer, self.rank].get(timeout=20)

    def device_bytes(self, n_bytes: int) -> np.ndarray:
        return np.empty(n_bytes, dtype=np.uint8)

    def upload(self, device: np.ndarray, host: np.ndarray) -> None:
        device[...] = host

    def download(self, device: np.ndarray, host: np.ndarray) -> None:
        host[...] = device

    def release_cached(self) -> None:
        pass


CPU = Backend(xp=np, kind="cpu", name="test", reason="")


def doubling_run(seen: dict):
    """A stand-in for run_harmony with a shard: checks what it was given, returns 2 x its rows."""

    def run(embedding, design, params, backend, *, shard):
        seen[shard.comm.rank] = {
            "start": shard.start,
            "n_cells": shard.n_cells,
            "rows": embedding.copy(),
            "codes": design.codes.copy(),
            "params": params,
            "design": design,
        }
        count = np.array([embedding.shape[0]], dtype=np.int64)
        shard.comm.all_sum(count)
        assert int(count[0]) == shard.n_cells
        return HarmonyResult(
            embedding=(embedding * 2).astype(params.numpy_dtype),
            iterations=[],
            rounds=[],
            converged=True,
            n_clusters=3,
            block_size=2,
            correction_method="batched",
            random_state=params.random_state,
            timings={"total": 1.0},
            peak_pool_bytes=1000 * (shard.comm.rank + 1),
        )

    return run


def run_between_threads(size, embedding, design, params, chunk_bytes):
    world = ThreadWorld(size)
    seen: dict = {}
    errors: list[BaseException] = []
    run = doubling_run(seen)

    def serve(rank: int) -> None:
        try:
            assert (
                protocol.serve(ThreadComm(world, rank), CPU, run=run, chunk_bytes=chunk_bytes)
                is None
            )
        except BaseException as err:
            errors.append(err)
            world.barrier.abort()

    threads = [threading.Thread(target=serve, args=(rank,)) for rank in range(1, size)]
    for thread in threads:
        thread.start()
    result = protocol.lead(
        ThreadComm(world, 0), embedding, design, params, CPU, run=run, chunk_bytes=chunk_bytes
    )
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    return result, seen


def small_design(n_cells: int, seed: int = 0) -> BatchDesign:
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, 3, n_cells), 3 + rng.integers(0, 2, n_cells)], axis=1)
    return BatchDesign(
        keys=("donor", "chemistry"),
        codes=codes.astype(np.int32),
        n_levels=(3, 2),
        level_names=(("a", "b", "c"), ("v2", "v3")),
    )


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("chunk_bytes", [7, 1 << 20])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_rank_gets_the_job_the_codes_and_its_rows_and_rank_0_the_whole_result(
    size, chunk_bytes, dtype
):
    n_cells, n_pcs = 101, 5
    embedding = np.random.default_rng(1).normal(size=(n_cells, n_pcs))
    design = small_design(n_cells)
    params = HarmonyParams.create(theta=[2.0, 1.0], dtype=dtype, n_gpus=size, random_state=7)

    result, seen = run_between_threads(size, embedding, design, params, chunk_bytes)

    np.testing.assert_array_equal(result.embedding, (embedding * 2).astype(dtype))
    assert result.embedding.dtype == np.dtype(dtype)
    assert result.peak_pool_bytes == 1000 * size  # the largest of any rank
    assert set(result.timings) >= {"total", "distribute", "collect"}
    for rank in range(size):
        start, stop = row_range(n_cells, size, rank)
        assert seen[rank]["start"] == start
        assert seen[rank]["n_cells"] == n_cells
        np.testing.assert_array_equal(seen[rank]["rows"], embedding[start:stop])
        np.testing.assert_array_equal(seen[rank]["codes"], design.codes)
        assert seen[rank]["design"].level_names == design.level_names
        assert seen[rank]["design"].n_levels == design.n_levels
        assert seen[rank]["design"].keys == design.keys
        received = seen[rank]["params"]
        assert received.theta == (2.0, 1.0)
        assert received.dtype == dtype
        assert received.random_state == 7
    # the workers' copy differs only in leaving the per-round lines to rank 0
    assert seen[1]["params"] == HarmonyParams.create(
        theta=[2.0, 1.0], dtype=dtype, n_gpus=size, random_state=7
    )


def test_integer_embeddings_travel_in_their_own_dtype():
    embedding = np.arange(40, dtype=np.int16).reshape(10, 4)
    params = HarmonyParams.create(n_gpus=2)
    result, seen = run_between_threads(2, embedding, small_design(10), params, 3)
    assert seen[1]["rows"].dtype == np.int16
    np.testing.assert_array_equal(result.embedding, embedding * 2.0)


def test_a_stop_message_ends_a_worker_without_a_run():
    world = ThreadWorld(2)
    outcome = []
    thread = threading.Thread(
        target=lambda: outcome.append(protocol.serve(ThreadComm(world, 1), CPU))
    )
    thread.start()
    protocol.broadcast_message(ThreadComm(world, 0), protocol.stop_message("the input is missing"))
    thread.join(10)
    assert outcome == ["the input is missing"]


def test_a_job_from_another_protocol_version_is_refused():
    with pytest.raises(RuntimeError, match="every process of a run must use the same harmony-step"):
        protocol.decode(b'{"protocol": 99, "stop": "x"}')


# --- set-up errors, before any process starts ---------------------------------------------------


def small_adata(n_cells: int = 60) -> ad.AnnData:
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {"batch": pd.Categorical(rng.choice(["a", "b", "c"], n_cells))},
        index=[f"c{i}" for i in range(n_cells)],
    )
    return ad.AnnData(obs=obs, obsm={"X_pca": rng.normal(size=(n_cells, 8))})


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, r"'n_gpus' parameter must be an int in the range \[1, 2\*\*63\)"),
        (1.5, TypeError, r"'n_gpus' parameter must be an int"),
        (True, TypeError, r"'n_gpus' parameter must be an int"),
    ],
)
def test_n_gpus_must_be_a_positive_integer(value, error, message):
    adata = small_adata()
    with pytest.raises(error, match=message):
        harmony_integrate(adata, "batch", n_gpus=value, device="cpu")
    assert "X_pca_harmony" not in adata.obsm


def test_several_gpus_with_device_cpu_is_refused_before_any_work():
    adata = small_adata()
    with pytest.raises(ValueError, match=r"'n_gpus' parameter must be 1 with device='cpu'.*Got 2"):
        harmony_integrate(adata, "batch", n_gpus=2, device="cpu")
    assert "X_pca_harmony" not in adata.obsm
    assert "harmony" not in adata.uns


def test_several_gpus_where_auto_finds_no_gpu_is_one_clear_error(monkeypatch):
    if gpu_available():
        pytest.skip("a GPU is usable here: device='auto' does not fall back to the CPU")
    monkeypatch.setattr(launcher, "WorkerProcesses", _no_process_may_start)
    adata = small_adata()
    with pytest.raises(
        GPUUnavailableError, match=r"n_gpus=2 needs GPUs, but this run would be on the CPU: "
    ):
        harmony_integrate(adata, "batch", n_gpus=2, device="auto")
    assert "X_pca_harmony" not in adata.obsm


def _no_process_may_start(*args, **kwargs):
    raise AssertionError("a worker process was started")


def test_more_gpus_than_visible_is_refused_before_any_process_starts(monkeypatch):
    # The one test that pretends: a GPU backend and one visible GPU, on a machine without either.
    monkeypatch.setattr(
        "harmony_step._integrate.select_backend",
        lambda device: Backend(xp=np, kind="gpu", name="pretend", reason="test"),
    )
    monkeypatch.setattr(launcher, "visible_gpus", lambda: 1)
    monkeypatch.setattr(launcher, "WorkerProcesses", _no_process_may_start)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    adata = small_adata()
    with pytest.raises(
        TooFewGPUsError,
        match=r"n_gpus=2 GPUs were requested, but this process sees 1 "
        r"\(CUDA_VISIBLE_DEVICES='3'\)\. Ask for at most 1",
    ) as caught:
        harmony_integrate(adata, "batch", n_gpus=2)
    assert isinstance(caught.value, MultiGPUSetupError)
    assert exit_code(caught.value) == EXIT_NO_GPU
    assert "X_pca_harmony" not in adata.obsm


def test_missing_nccl_is_one_clear_error_saying_how_to_install_it():
    if environment.nccl_problem() is None:
        pytest.skip("NCCL is usable here")
    with pytest.raises(
        NCCLUnavailableError, match=r"needs NCCL, but .*pip install nvidia-nccl-cu12"
    ):
        environment.check_nccl()


def test_one_gpu_starts_no_process_and_imports_nothing_of_the_multi_gpu_path():
    code = textwrap.dedent(
        """
        import sys, warnings
        import numpy as np, pandas as pd, anndata as ad
        from harmony_step import harmony_integrate
        rng = np.random.default_rng(0)
        obs = pd.DataFrame({"b": pd.Categorical(rng.choice(["x", "y"], 80))},
                           index=[str(i) for i in range(80)])
        adata = ad.AnnData(obs=obs, obsm={"X_pca": rng.normal(size=(80, 5))})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            harmony_integrate(adata, "b", device="cpu", max_iter_harmony=2)
        loaded = [m for m in sys.modules if m.startswith(("harmony_step._distributed", "cupyx"))]
        loaded += [m for m in sys.modules if "nccl" in m]
        print(loaded)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_exit_codes_of_multi_gpu_failures():
    def failed(error_type):
        return WorkerFailedError("x", rank=1, returncode=1, error_type=error_type)

    assert exit_code(failed("OutOfMemoryError")) == EXIT_GPU_MEMORY
    assert exit_code(failed("ValueError")) == EXIT_BAD_INPUT
    assert exit_code(failed("NcclError")) == EXIT_MULTI_GPU
    assert exit_code(failed(None)) == EXIT_MULTI_GPU
    assert exit_code(NCCLUnavailableError("x")) == EXIT_NO_GPU


# --- the processes' environment -------------------------------------------------------------------


def test_workers_get_nvls_off_unless_set_and_this_harmony_step_first_on_the_path():
    root = os.path.dirname(os.path.dirname(os.path.abspath(protocol.__file__)))
    root = os.path.dirname(root)
    env = environment.worker_environment({"PYTHONPATH": "/elsewhere"})
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert env["PYTHONPATH"].split(os.pathsep) == [root, "/elsewhere"]
    kept = environment.worker_environment({"NCCL_NVLS_ENABLE": "1"})
    assert kept["NCCL_NVLS_ENABLE"] == "1"


@pytest.mark.parametrize(("value", "expected"), [(None, 300.0), ("", 300.0), ("12.5", 12.5)])
def test_rendezvous_timeout_comes_from_the_environment(value, expected):
    environ = {} if value is None else {environment.TIMEOUT_VARIABLE: value}
    assert environment.rendezvous_timeout(environ) == expected


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan"])
def test_a_bad_rendezvous_timeout_is_refused(value):
    with pytest.raises(ValueError, match="HARMONY_STEP_RENDEZVOUS_TIMEOUT must be a number"):
        environment.rendezvous_timeout({environment.TIMEOUT_VARIABLE: value})


# --- Slurm --------------------------------------------------------------------------------------

STEP = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_JOB_NODELIST": "gpu[07-09]",
}


def test_an_srun_task_gets_rank_size_and_the_first_host_of_the_step():
    task = slurm.current_task(STEP, expand_first_host=slurm.first_host)
    assert task == slurm.SlurmTask(
        rank=2, size=4, local_rank=0, host="gpu07", port=slurm.default_port(STEP)
    )
    assert slurm.PORT_BASE <= task.port < slurm.PORT_BASE + slurm.PORT_SPAN


def test_master_addr_and_port_override_slurm():
    environ = {**STEP, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"}
    task = slurm.current_task(environ, expand_first_host=_no_host_lookup)
    assert (task.host, task.port) == ("10.0.0.5", 29500)


def _no_host_lookup(nodelist):
    raise AssertionError("MASTER_ADDR should have been used")


def test_the_node_list_is_expanded_by_scontrol_when_given(monkeypatch):
    asked = []
    task = slurm.current_task(
        {**STEP, "SLURM_STEP_NODELIST": "a[1-2]"},
        expand_first_host=lambda nodelist: asked.append(nodelist) or "a1.cluster",
    )
    assert asked == ["a[1-2]"]
    assert task.host == "a1.cluster"


@pytest.mark.parametrize(
    "environ",
    [
        {},  # not under Slurm
        {"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"},  # a batch script
        {**STEP, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"},  # a one-task step
    ],
    ids=["no-slurm", "batch-script", "one-task"],
)
def test_only_a_step_of_several_tasks_is_taken_for_one(environ):
    assert slurm.current_task(environ) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"SLURM_PROCID": "4"}, r"SLURM_PROCID=4 is outside \[0, SLURM_STEP_NUM_TASKS=4\)"),
        ({"SLURM_PROCID": "x"}, r"SLURM_PROCID='x' is not an integer"),
        ({"MASTER_PORT": "70000"}, r"MASTER_PORT='70000' is not a TCP port"),
        ({"MASTER_PORT": "p"}, r"MASTER_PORT='p' is not an integer"),
    ],
)
def test_malformed_slurm_variables_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        slurm.current_task({**STEP, **change}, expand_first_host=slurm.first_host)


def test_a_step_without_a_node_list_asks_for_master_addr():
    environ = {k: v for k, v in STEP.items() if "NODELIST" not in k}
    with pytest.raises(ValueError, match="set MASTER_ADDR"):
        slurm.current_task(environ)


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("node1", "node1"),
        ("gpu[07-09,12]", "gpu07"),
        ("gpu[12,07-09]", "gpu12"),
        ("a[1-2],b3", "a1"),
        ("rack1-n[001-004]-ib", "rack1-n001-ib"),
        ("n3,n1", "n3"),
    ],
)
def test_first_host_of_a_node_list(nodelist, host):
    assert slurm.first_host(nodelist) == host


def test_scontrol_expands_the_node_list_where_it_exists(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "first.x\\nsecond.x\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert slurm.scontrol_first_host("whatever[1-2]") == "first.x"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert slurm.scontrol_first_host("n[5-6]") == "n5"


@pytest.mark.parametrize(("local_rank", "visible", "device"), [(0, 1, 0), (3, 1, 0), (3, 4, 3)])
def test_a_task_uses_its_bound_gpu_or_its_index_on_the_node(local_rank, visible, device):
    task = slurm.SlurmTask(rank=5, size=8, local_rank=local_rank, host="h", port=1)
    assert slurm.local_device(task, visible) == device


@pytest.mark.parametrize(
    ("local_rank", "visible", "message"), [(0, 0, "sees no GPU"), (4, 2, "sees only 2")]
)
def test_a_task_without_its_gpu_is_refused(local_rank, visible, message):
    task = slurm.SlurmTask(rank=1, size=8, local_rank=local_rank, host="h", port=1)
    with pytest.raises(TooFewGPUsError, match=message):
        slurm.local_device(task, visible)


# --- the worker's command line ------------------------------------------------------------------


def test_worker_arguments_for_a_run_on_one_machine():
    options = worker.parse_args(
        ["--rank", "1", "--size", "2", "--host", "127.0.0.1", "--port", "4000", "--watch-stdin"]
    )
    assert options == worker.WorkerOptions(
        slurm=False, rank=1, size=2, host="127.0.0.1", port=4000, device=1, watch_stdin=True
    )
    assert worker.parse_args(["--slurm"]) == worker.WorkerOptions(slurm=True)
    command = processes.worker_command(2, 4, "127.0.0.1", 4000, 30.0)
    assert worker.parse_args(command[3:]) == worker.WorkerOptions(
        slurm=False, rank=2, size=4, host="127.0.0.1", port=4000, device=2, timeout=30.0,
        watch_stdin=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "2", "--host", "h", "--port", "1"], "give --rank"),
        (
            ["--rank", "0", "--size", "2", "--host", "h", "--port", "1"],
            r"--rank must be in \[1, 1\]",
        ),
        (["--rank", "1", "--size", "1", "--host", "h", "--port", "1"], "--size must be 2 or more"),
        (["--rank", "1", "--size", "2", "--host", "h", "--port", "0"], "--port must be a TCP port"),
        (
            ["--rank", "1", "--size", "2", "--host", "h", "--port", "1", "--timeout", "0"],
            "--timeout",
        ),
        (["--slurm", "--rank", "1"], "--slurm takes everything from srun's environment"),
        (["--rank", "one"], "invalid int value"),
    ],
)
def test_bad_worker_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as done:
        worker.parse_args(argv)
    assert done.value.code == worker.EXIT_USAGE
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_a_worker_outside_srun_says_so_and_exits_1():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(
        [sys.executable, "-m", "harmony_step._distributed.worker", "--slurm"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == worker.EXIT_FAILED
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        processes.ERROR_MARK + "ValueError: --slurm: this process is not one task"
    )


# --- the worker processes and their watcher ----------------------------------------------------


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


SLEEPER = python("import time; time.sleep(60)")


def test_a_worker_that_raises_is_reported_with_its_error_and_the_others_are_stopped():
    failing = python(
        f"""
        import sys, time
        time.sleep(0.3)
        print("Traceback (most recent call last):", file=sys.stderr)
        print("{processes.ERROR_MARK}OutOfMemoryError: Out of memory allocating 1,024 bytes",
              file=sys.stderr)
        sys.exit(1)
        """
    )
    aborted = threading.Event()
    with processes.WorkerProcesses({1: failing, 2: SLEEPER}, os.environ) as workers:
        workers.on_failure(aborted.set)
        failure = workers.wait_for_failure(20)
        assert failure is not None
        assert aborted.is_set()
        other = workers._workers[1].process
        assert other.wait(10) is not None  # stopped, not left running
    assert failure.rank == 1
    assert failure.error_type == "OutOfMemoryError"
    assert failure.returncode == 1
    assert str(failure).startswith("GPU rank 1 (process ")
    assert "exited with status 1 after an error: OutOfMemoryError: Out of memory" in str(failure)
    assert exit_code(failure) == EXIT_GPU_MEMORY


def test_a_killed_worker_is_named_with_its_signal_and_last_output():
    victim = python(
        """
        import os, signal, sys, time
        print("loading", file=sys.stderr, flush=True)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    with processes.WorkerProcesses({1: victim}, os.environ) as workers:
        failure = workers.wait_for_failure(20)
    assert failure is not None
    assert failure.returncode == -signal.SIGKILL
    assert failure.error_type is None
    assert "was killed by signal 9 (SIGKILL)" in str(failure)
    assert "out-of-memory killer" in str(failure)
    assert "its last error output: loading" in str(failure)
    assert exit_code(failure) == EXIT_MULTI_GPU


def test_a_failure_before_the_callback_is_set_calls_it_at_once():
    with processes.WorkerProcesses({1: python("import sys; sys.exit(4)")}, os.environ) as workers:
        assert workers.wait_for_failure(20) is not None
        called = []
        workers.on_failure(lambda: called.append(True))
        assert called == [True]


def test_workers_that_finish_after_the_run_are_not_failures():
    with processes.WorkerProcesses({1: python("pass"), 2: python("pass")}, os.environ) as workers:
        workers.finish(20)
        assert workers.failure() is None


def test_stopping_ends_workers_that_are_still_running():
    started = time.monotonic()
    workers = processes.WorkerProcesses({1: SLEEPER, 2: SLEEPER}, os.environ)
    workers.stop()
    assert all(w.process.returncode is not None for w in workers._workers)
    assert workers.failure() is None
    assert time.monotonic() - started < 20


def test_a_worker_exits_when_the_process_that_started_it_is_gone():
    # The worker watches its stdin pipe; the pipe closes when its parent's process ends.
    child = python(
        """
        import os, time
        from harmony_step._distributed.processes import exit_when_closed
        import sys
        exit_when_closed(sys.stdin.buffer, lambda: os._exit(3))
        time.sleep(60)
        os._exit(0)
        """
    )
    env = environment.worker_environment(os.environ)
    process = subprocess.Popen(child, stdin=subprocess.PIPE, env=env)
    time.sleep(0.5)
    assert process.poll() is None
    process.stdin.close()
    assert process.wait(20) == 3


def test_describe_exit_without_any_output():
    failure = processes.describe_exit(3, 99, 7, [])
    assert str(failure) == (
        "GPU rank 3 (process 99) exited with status 7 during the run. The run was stopped on "
        "every GPU."
    )


class _Watcher:
    def __init__(self, failure):
        self._failure, self.waited = failure, False

    def wait_for_failure(self, seconds):
        self.waited = True
        return self._failure

    def failure(self):
        return self._failure


@pytest.mark.parametrize(
    ("error", "aborted", "reported"),
    [
        (ValueError("rank 0's own bad input"), False, False),
        (KeyError("x"), False, False),
        (type("OutOfMemoryError", (MemoryError,), {})("rank 0's GPU"), False, False),
        (ValueError("computed on what an aborted collective left"), True, True),
        (RuntimeError("NCCL error: remote process exited"), False, True),
        (PeerLostError("cut short"), False, True),
        (KeyboardInterrupt(), False, True),
    ],
)
def test_rank_0_reports_the_worker_failure_behind_its_error(error, aborted, reported):
    failure = WorkerFailedError("GPU rank 1 died", rank=1, returncode=-9)
    watcher = _Watcher(failure)
    found = launcher._worker_failure_behind(error, aborted, watcher)
    assert (found is failure) == reported
