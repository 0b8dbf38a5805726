"""What the ranks of a run exchange, in order: the job, the batch codes, the rows, the result.

Rank 0 holds the whole embedding (it read the file or was handed the AnnData); the others start
with nothing. In order, over the run's communicator:

1. the job (:class:`Job`, JSON): parameters, sizes, dtypes and the batch design's names;
2. the batch codes of all cells, broadcast (every rank needs the full design: level counts are
   global);
3. each worker's rows of the embedding, sent by rank 0 (``rows.row_range``);
4. every rank runs ``run_harmony(..., shard=...)`` on its rows;
5. the peak GPU memory of each rank, summed into a vector (its maximum is the run's);
6. each worker's corrected rows, sent to rank 0, which places them in the global order.

The data path is NCCL point-to-point from rank 0, in chunks of :data:`CHUNK_BYTES` through one
device buffer per rank. No GPU holds more than its own rows plus one chunk, host memory holds each
row once per side (rank 0: the input and the output; a worker: its share of both), no file is
written, and the same code carries the rows to another node under ``srun``. The alternative,
memory-mapped temporary files, works on one node only, needs twice the embedding in free disk
space (30 GB for 150 million cells x 50 in float32), and is paced by the disk where NVLink moves
the same bytes in well under a second.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from harmony_step._backend import Backend
from harmony_step._batches import BatchDesign
from harmony_step._core import run_harmony
from harmony_step._core.result import HarmonyResult
from harmony_step._core.shard import Shard
from harmony_step._distributed.rows import byte_chunks, row_range
from harmony_step._params import HarmonyParams

PROTOCOL = 1
CHUNK_BYTES = 256 << 20
"""Bytes per transfer: large enough to run the links at full speed, small next to a GPU's share."""

Runner = Callable[..., HarmonyResult]


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything but the arrays that a worker needs to run its share."""

    n_cells: int
    n_pcs: int
    embedding_dtype: str
    codes_dtype: str
    params: dict[str, Any]
    keys: tuple[str, ...]
    n_levels: tuple[int, ...]
    level_names: tuple[tuple[str, ...], ...]

    @classmethod
    def describe(cls, embedding: np.ndarray, design: BatchDesign, params: HarmonyParams) -> Job:
        return cls(
            n_cells=int(embedding.shape[0]),
            n_pcs=int(embedding.shape[1]),
            embedding_dtype=embedding.dtype.str,
            codes_dtype=design.codes.dtype.str,
            params=params.to_dict(),
            keys=tuple(design.keys),
            n_levels=tuple(int(n) for n in design.n_levels),
            level_names=tuple(tuple(names) for names in design.level_names),
        )

    def encode(self) -> bytes:
        return json.dumps({"protocol": PROTOCOL, "job": dataclasses.asdict(self)}).encode()

    def harmony_params(self) -> HarmonyParams:
        """The parameters, as checked on rank 0 (not checked again, so no warning repeats), with
        the per-round lines left to rank 0."""
        values = dict(self.params)
        if isinstance(values.get("theta"), list):
            values["theta"] = tuple(values["theta"])
        values["verbose"] = False
        return HarmonyParams(**values)

    def design(self, codes: np.ndarray) -> BatchDesign:
        return BatchDesign(
            keys=self.keys, codes=codes, n_levels=self.n_levels, level_names=self.level_names
        )


def stop_message(reason: str) -> bytes:
    """The message that tells waiting workers there is no job (rank 0 failed before the run)."""
    return json.dumps({"protocol": PROTOCOL, "stop": reason}).encode()


def decode(message: bytes) -> Job | str:
    """The job, or the reason to stop."""
    content = json.loads(message.decode())
    if content.get("protocol") != PROTOCOL:
        raise RuntimeError(
            f"rank 0 speaks protocol {content.get('protocol')!r}, this process {PROTOCOL}: "
            "every process of a run must use the same harmony-step."
        )
    if "stop" in content:
        return str(content["stop"])
    job = content["job"]
    job["keys"] = tuple(job["keys"])
    job["n_levels"] = tuple(job["n_levels"])
    job["level_names"] = tuple(tuple(names) for names in job["level_names"])
    return Job(**job)


# --- transfers ------------------------------------------------------------------------------------


def _bytes_of(array: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array as a flat uint8 view (no copy)."""
    if not array.flags.c_contiguous:
        raise ValueError("transfers need C-contiguous arrays")
    return array.reshape(-1).view(np.uint8)


def _buffer(comm: Any, n_bytes: int, chunk_bytes: int) -> Any:
    return comm.device_bytes(max(1, min(n_bytes, chunk_bytes)))


def broadcast_message(comm: Any, message: bytes | None, root: int = 0) -> bytes:
    """``message`` from ``root`` to every rank (None on the others)."""
    length = np.array([len(message) if comm.rank == root else 0], dtype=np.int64)
    device_length = comm.device_bytes(8)
    comm.upload(device_length, length.view(np.uint8))
    comm.broadcast(device_length, root)
    comm.download(device_length, length.view(np.uint8))
    data = (
        np.frombuffer(message, dtype=np.uint8).copy()
        if comm.rank == root
        else np.empty(int(length[0]), dtype=np.uint8)
    )
    broadcast_array(comm, data, root)
    return data.tobytes()


def broadcast_array(comm: Any, host: np.ndarray, root: int = 0, chunk_bytes: int = CHUNK_BYTES):
    """Fill ``host`` on every rank with root's ``host`` (same shape and dtype everywhere)."""
    flat = _bytes_of(host)
    buffer = _buffer(comm, flat.size, chunk_bytes)
    for start, stop in byte_chunks(flat.size, chunk_bytes):
        part = buffer[: stop - start]
        if comm.rank == root:
            comm.upload(part, flat[start:stop])
        comm.broadcast(part, root)
        if comm.rank != root:
            comm.download(part, flat[start:stop])


def send_array(comm: Any, host: np.ndarray, peer: int, chunk_bytes: int = CHUNK_BYTES) -> None:
    """Send the bytes of ``host`` to ``peer``, which calls :func:`recv_array` with a like array."""
    flat = _bytes_of(host)
    buffer = _buffer(comm, flat.size, chunk_bytes)
    for start, stop in byte_chunks(flat.size, chunk_bytes):
        part = buffer[: stop - start]
        comm.upload(part, flat[start:stop])
        comm.send(part, peer)


def recv_array(comm: Any, host: np.ndarray, peer: int, chunk_bytes: int = CHUNK_BYTES) -> None:
    """Fill ``host`` with the bytes ``peer`` sends with :func:`send_array`."""
    flat = _bytes_of(host)
    buffer = _buffer(comm, flat.size, chunk_bytes)
    for start, stop in byte_chunks(flat.size, chunk_bytes):
        part = buffer[: stop - start]
        comm.recv(part, peer)
        comm.download(part, flat[start:stop])


def max_over_ranks(comm: Any, value: int) -> int:
    """The largest of every rank's ``value`` (an int64 sum of one-hot vectors: exact)."""
    values = np.zeros(comm.size, dtype=np.int64)
    values[comm.rank] = value
    device = comm.device_bytes(values.nbytes)
    comm.upload(device, values.view(np.uint8))
    comm.all_sum(device.view(np.int64))
    comm.download(device, values.view(np.uint8))
    return int(values.max())


# --- the two sides ------------------------------------------------------------------------------


def lead(
    comm: Any,
    embedding: np.ndarray,
    design: BatchDesign,
    params: HarmonyParams,
    backend: Backend,
    *,
    run: Runner = run_harmony,
    chunk_bytes: int = CHUNK_BYTES,
) -> HarmonyResult:
    """Rank 0's side: hand out the job and the rows, run its own share, collect the result.

    Returns the result of the whole embedding: rank 0's records (the same on every rank), the
    corrected rows of all ranks in the global order, and the largest peak GPU memory of any rank.
    """
    clock = time.perf_counter()
    n_cells, n_pcs = embedding.shape
    broadcast_message(comm, Job.describe(embedding, design, params).encode())
    broadcast_array(comm, design.codes, chunk_bytes=chunk_bytes)
    for peer in range(1, comm.size):
        start, stop = row_range(n_cells, comm.size, peer)
        send_array(comm, embedding[start:stop], peer, chunk_bytes)
    comm.release_cached()
    distribute = time.perf_counter() - clock

    host_output = backend.prepare_host_output((n_cells, n_pcs), params.numpy_dtype)
    start, stop = row_range(n_cells, comm.size, 0)
    result = run(embedding[start:stop], design, params, backend, shard=Shard(comm, start, n_cells))
    peak = max_over_ranks(comm, int(result.peak_pool_bytes))

    clock = time.perf_counter()
    output = (
        host_output.result()
        if host_output is not None
        else np.empty((n_cells, n_pcs), dtype=params.numpy_dtype)
    )
    output[start:stop] = result.embedding
    for peer in range(1, comm.size):
        start, stop = row_range(n_cells, comm.size, peer)
        recv_array(comm, output[start:stop], peer, chunk_bytes)
    comm.release_cached()
    collect = time.perf_counter() - clock
    timings = {**result.timings, "distribute": distribute, "collect": collect}
    return dataclasses.replace(result, embedding=output, peak_pool_bytes=peak, timings=timings)


def serve(
    comm: Any,
    backend: Backend,
    *,
    run: Runner = run_harmony,
    chunk_bytes: int = CHUNK_BYTES,
) -> str | None:
    """A worker's side of one run; returns None after the run, or the reason rank 0 sent to stop."""
    job = decode(broadcast_message(comm, None))
    if isinstance(job, str):
        return job
    codes = np.empty((job.n_cells, len(job.keys)), dtype=np.dtype(job.codes_dtype))
    broadcast_array(comm, codes, chunk_bytes=chunk_bytes)
    design = job.design(codes)
    params = job.harmony_params()
    start, stop = row_range(job.n_cells, comm.size, comm.rank)
    shape, dtype = (stop - start, job.n_pcs), np.dtype(job.embedding_dtype)
    # Pages touched beforehand, so the copy from the device is not paced by page faults.
    prepared = backend.prepare_host_output(shape, dtype)
    rows = prepared.result() if prepared is not None else np.empty(shape, dtype=dtype)
    recv_array(comm, rows, 0, chunk_bytes)
    comm.release_cached()

    result = run(rows, design, params, backend, shard=Shard(comm, start, job.n_cells))
    del rows
    max_over_ranks(comm, int(result.peak_pool_bytes))
    corrected = np.ascontiguousarray(result.embedding)
    expected = ((stop - start, job.n_pcs), params.numpy_dtype)
    if (corrected.shape, corrected.dtype) != expected:
        raise RuntimeError(
            f"GPU rank {comm.rank}: the corrected rows are {corrected.shape} {corrected.dtype}, "
            f"not {expected[0]} {expected[1]}."
        )
    send_array(comm, corrected, 0, chunk_bytes)
    comm.release_cached()
    return None
