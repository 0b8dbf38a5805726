"""The CPU hot path: numba kernels mirroring the CuPy ones in ``kernels``, each with a NumPy reference.

Imported lazily (``kernels.cpu()``), only when the array namespace is NumPy, so the package imports
without numba's compile step and runs on the GPU without it. Every kernel is compiled once per
dtype and cached on disk (``cache=True``).

Determinism and threads: no result depends on the number of threads.

* Per-row results (R, each row's entropy, the corrected embedding with several keys, k-means
  labels) are computed by one thread each, in a fixed order within the row.
* O is summed in int64 fixed point (``kernels.FIXED_POINT_SCALE``): integer sums are exact, so
  partial sums per thread, added in any order, give the same bits.
* Floating-point sums over cells (per-level moments, Lloyd's cluster sums) run over fixed chunks
  of ``SUM_CHUNK_ROWS`` rows, whatever the thread count, and the chunks' partial sums are added in
  chunk order.
* The BLAS products (similarities, R^T Z, k-means distances, the per-level moments and, with one
  key, the correction) run single-threaded on fixed chunks of rows (``matmul``, ``cross_sums``,
  ``assign_nearest``, ``level_moments``, ``correct_rows_by_level``), the chunks spread over a
  pool of threads: a threaded BLAS changes its rounding with its thread count (OpenBLAS does for
  these shapes).

``tests/test_cpu_kernels.py`` checks that 1 and 2 threads give bitwise-identical output.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

from harmony_step._core.kernels import ENTROPY_EPS, FIXED_POINT_SCALE
from harmony_step._core.sums import CROSS_CHUNK_ROWS
from harmony_step._threads import prepare_numba, run_chunks

prepare_numba()  # before the first parallel loop starts numba's threads

# Rows per chunk of the floating-point sums over cells; fixed so that results do not depend on the
# thread count. A chunk's partial sum is K x d, in float64 (Lloyd's sums) or in the working dtype
# (a BLAS product of the per-level moments), and the chunks are added in float64.
SUM_CHUNK_ROWS = 4096
# Fewest rows a thread takes in the row-parallel kernels: below this the threads cost more than
# they save.
MIN_ROWS_PER_TASK = 256
# Rows per chunk of a BLAS product. A row's rounding depends on the chunk it sits in, so these are
# part of what the output is: they must never follow the thread count or the machine. A clustering
# block (a twentieth of the cells by default) gets its similarities from ``matmul``, whose short
# chunks keep 16 threads busy at 200,000 cells (2048 rows made 5 chunks per block there); the
# k-means ranking (``assign_nearest``) covers all sampled points at once, and longer chunks there
# need fewer calls from Python.
MATMUL_ROWS = 512
ASSIGN_ROWS = 2048
# Bits per pass of the radix sort of the 32-bit permutation keys; below ``PARALLEL_ORDER_CELLS``
# cells the sort runs on one thread, from there on in parallel over ``ORDER_PARTS`` fixed parts.
RADIX_BITS = 8
ORDER_PARTS = 64
PARALLEL_ORDER_CELLS = 1 << 16
# Entries of the penalty table (B x K) from which it is filled by several threads.
PARALLEL_PENALTY_ENTRIES = 1 << 12


# --- exp and log that the compiler can vectorise -------------------------------------------------
# numba calls the C library's scalar exp and log, which cost several times more than the rest of
# the softmax. These are written in plain arithmetic, so the loops around them vectorise. Both are
# within 2 ulp of the C library's (``tests/test_cpu_kernels.py``).

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that n * _LN2_HI is exact (Cody-Waite)
_LN2_LO = 1.90821492927058770002e-10
_SQRT2 = math.sqrt(2.0)
_MANTISSA = 0x000FFFFFFFFFFFFF
_ONE_BITS = 0x3FF0000000000000


@intrinsic
def _as_float(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@intrinsic
def _as_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


# --- prefetching rows that are visited in a random order -------------------------------------------
# The clustering step visits the rows of R in a pseudo-random order: each row is a few cache lines
# that the hardware prefetcher cannot predict, and without help a thread waits on memory for most
# of its time (a block update took 2.5 times as long over random rows as over consecutive ones).
# The rows a few steps ahead are requested early, so their loads overlap the current row's work.

CACHE_LINE_BYTES = 64
# Rows requested ahead of the one being computed.
PREFETCH_DISTANCE = 8


@intrinsic
def _prefetch(typingctx, array, offset):
    """Ask the cache for the line holding byte ``offset`` of ``array``'s data (a hint: no effect on
    results, and no fault for any address)."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()), [args[1]])
        flag = ir.IntType(32)
        signature_ir = ir.FunctionType(ir.VoidType(), [address.type, flag, flag, flag])
        function = cgutils.get_or_insert_function(builder.module, signature_ir, "llvm.prefetch.p0")
        # llvm.prefetch(address, rw: 0 = read, locality: 3 = keep in every cache level,
        # cache type: 1 = data)
        read, keep, data_cache = (ir.Constant(flag, v) for v in (0, 3, 1))
        builder.call(function, [address, read, keep, data_cache])
        return context.get_dummy_value()

    return types.void(array, types.intp), codegen


@njit(cache=True, error_model="numpy", inline="always")
def prefetch_row(array, row):
    """Request every cache line of ``array[row]`` (a C-contiguous array; of a 1-D one, the
    element): one request per line's width from the row's first byte, and its last byte (the row
    need not start a line)."""
    row_bytes = array.strides[0]
    for offset in range(row * row_bytes, (row + 1) * row_bytes, CACHE_LINE_BYTES):
        _prefetch(array, offset)
    if row_bytes > 0:
        _prefetch(array, (row + 1) * row_bytes - 1)


@njit(cache=True, error_model="numpy", inline="always")
def prefetch_ahead(array, rows, i):
    """Request ``array[rows[i + PREFETCH_DISTANCE]]``, the row visited that many steps after
    ``rows[i]``, if there is one."""
    if i + PREFETCH_DISTANCE < rows.shape[0]:
        prefetch_row(array, rows[i + PREFETCH_DISTANCE])


@njit(cache=True, error_model="numpy", inline="always")
def exp(x):
    """e^x: x = n ln 2 + r with |r| <= ln(2)/2, e^r by its Taylor polynomial to r^13, times 2^n
    (as two factors, so results down to the smallest subnormal are right; 0 below them)."""
    y = min(max(x, -745.2), 709.7)
    n = math.floor(y * _LOG2E + 0.5)
    r = (y - n * _LN2_HI) - n * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    whole = np.int64(n)
    half = whole >> 1
    value = p * _as_float((half + 1023) << 52) * _as_float((whole - half + 1023) << 52)
    return 0.0 if x < -745.14 else value  # below half the smallest subnormal: 0, as the C library


@intrinsic
def _as_float32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


# float32 constants: numba keeps a NumPy float32 global as float32, so the arithmetic below stays
# in float32 (twice the vector lanes of float64). ln 2 split as in Cephes' expf.
_F = np.float32
_LOG2E_32, _HALF_32 = _F(_LOG2E), _F(0.5)
_LN2_HI_32, _LN2_LO_32 = _F(0.693359375), _F(-2.12194440e-4)
_LOW_32, _HIGH_32 = _F(-103.9), _F(88.7)
_UNDERFLOW_32, _ZERO_32 = _F(-103.98), _F(0.0)
_TAYLOR_32 = tuple(_F(1.0 / math.factorial(i)) for i in range(8))


@njit(cache=True, error_model="numpy", inline="always")
def exp32(x):
    """e^x in float32 arithmetic for a float32 x: as ``exp``, the Taylor polynomial to r^7
    (within 2 ulp of float32, subnormal results included; 0 below them)."""
    y = min(max(x, _LOW_32), _HIGH_32)
    n = np.floor(y * _LOG2E_32 + _HALF_32)
    r = (y - n * _LN2_HI_32) - n * _LN2_LO_32
    p = _TAYLOR_32[7]
    p = p * r + _TAYLOR_32[6]
    p = p * r + _TAYLOR_32[5]
    p = p * r + _TAYLOR_32[4]
    p = p * r + _TAYLOR_32[3]
    p = p * r + _TAYLOR_32[2]
    p = p * r + _TAYLOR_32[1]
    p = p * r + _TAYLOR_32[0]
    whole = np.int32(n)
    half = whole >> np.int32(1)
    bias, shift = np.int32(127), np.int32(23)
    value = p * _as_float32((half + bias) << shift) * _as_float32((whole - half + bias) << shift)
    return _ZERO_32 if x < _UNDERFLOW_32 else value  # below half the smallest subnormal


def exp_of(x):
    """e^x in the precision of x: ``exp32`` for float32, ``exp`` for float64 (numba only)."""
    raise NotImplementedError("exp_of is for numba-compiled code")


@overload(exp_of, inline="always")
def _exp_of(x):
    if x == types.float32:
        return lambda x: exp32(x)
    return lambda x: exp(x)


def working(value, like):
    """``value`` in the dtype of the array ``like`` (numba only)."""
    raise NotImplementedError("working is for numba-compiled code")


@overload(working, inline="always")
def _working(value, like):
    if like.dtype == types.float32:
        return lambda value, like: np.float32(value)
    return lambda value, like: np.float64(value)


@njit(cache=True, error_model="numpy", inline="always")
def log(y):
    """ln y for finite y > 0 (normal): y = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s)
    with s = (m - 1)/(m + 1), |s| < 0.172, by its series to s^21."""
    bits = _as_bits(y)
    e = (bits >> 52) - 1023
    m = _as_float((bits & _MANTISSA) | _ONE_BITS)
    big = m > _SQRT2
    m = m * 0.5 if big else m
    e = e + 1 if big else e
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    p = 1.0 / 21.0
    p = p * z + 1.0 / 19.0
    p = p * z + 1.0 / 17.0
    p = p * z + 1.0 / 15.0
    p = p * z + 1.0 / 13.0
    p = p * z + 1.0 / 11.0
    p = p * z + 1.0 / 9.0
    p = p * z + 1.0 / 7.0
    p = p * z + 1.0 / 5.0
    p = p * z + 1.0 / 3.0
    p = p * z + 1.0
    fe = np.float64(e)
    return fe * _LN2_HI + (2.0 * s * p + fe * _LN2_LO)


# Lets the compiler reorder a sum of squares into vector lanes (fixed by the compiled code).
_REORDER = {"reassoc", "nsz", "contract"}
# Lets the compiler fuse a * b + c into one instruction (as the GPU's compiler does): the
# exponential's polynomial then takes half the steps, each rounded once instead of twice.
FUSED = {"contract"}


# Sums and maxima of one row. Written as a plain loop, a sum is a chain of dependent additions that
# the compiler keeps in order and does not vectorise; ``reassoc`` lets it keep several partial sums
# in vector lanes. The order is then fixed by the compiled code: the same on every run on a machine.
# The flags apply to these functions alone, not to the arithmetic of exp and log.
@njit(cache=True, error_model="numpy", fastmath={"reassoc", "nsz"})
def _sum(values):
    total = 0.0
    for i in range(values.shape[0]):  # an index loop: numba does not vectorise ``for v in values``
        total += values[i]
    return total


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "nsz"})
def _dot(left, right):
    total = 0.0
    for i in range(left.shape[0]):
        total += np.float64(left[i]) * np.float64(right[i])
    return total


@njit(cache=True, error_model="numpy", fastmath={"nnan", "ninf", "nsz"})
def _max(values):
    best = values[0]
    for i in range(1, values.shape[0]):
        best = max(best, values[i])
    return best


def _tasks(n_rows: int) -> int:
    """Row ranges for a row-parallel kernel whose result does not depend on the split."""
    return max(1, min(numba.get_num_threads(), -(-n_rows // MIN_ROWS_PER_TASK)))


# --- BLAS products in fixed row chunks --------------------------------------------------------------
# A threaded BLAS splits one product over its threads in ways that change the rounding with the
# thread count (OpenBLAS does for the similarity products). Here BLAS runs single-threaded
# (``harmony_step._threads``), each product is cut into fixed chunks of rows, and the chunks run
# in parallel on a pool of Python threads (NumPy releases the GIL in BLAS calls): the same bits for
# any thread count, and no BLAS threads spinning beside numba's.


def _run_chunks(task, n_chunks: int) -> None:
    """task(i) for every chunk i, on numba's thread count (``_threads.run_chunks``)."""
    run_chunks(task, n_chunks, numba.get_num_threads())


def matmul(left, right, out=None):
    """left @ right, (n, m) from (n, p) and (p, m), in chunks of ``MATMUL_ROWS`` rows, into
    ``out`` if given."""
    if out is None:
        out = np.empty((left.shape[0], right.shape[1]), dtype=np.result_type(left, right))

    def task(i):
        rows = slice(i * MATMUL_ROWS, (i + 1) * MATMUL_ROWS)
        np.matmul(left[rows], right, out=out[rows])

    _run_chunks(task, -(-left.shape[0] // MATMUL_ROWS))
    return out


def cross_sums(left, right, chunk_rows=CROSS_CHUNK_ROWS):
    """left^T @ right, (m1, m2) float64: one product per chunk of ``chunk_rows`` rows in the
    working dtype, the partial products added in float64 in chunk order (``sums.cross_sums``)."""
    n = left.shape[0]
    n_chunks = -(-n // chunk_rows)
    parts = np.empty((n_chunks, left.shape[1], right.shape[1]), dtype=np.result_type(left, right))

    def task(i):
        rows = slice(i * chunk_rows, (i + 1) * chunk_rows)
        np.matmul(left[rows].T, right[rows], out=parts[i])

    _run_chunks(task, n_chunks)
    out = np.zeros((left.shape[1], right.shape[1]))
    for i in range(n_chunks):
        out += parts[i]
    return out


# --- clustering step -----------------------------------------------------------------------------


@njit(cache=True, error_model="numpy", inline="always")
def _fixed_point(r: float) -> np.int64:
    return np.int64(np.rint(r * FIXED_POINT_SCALE))


@njit(cache=True, error_model="numpy", inline="always")
def _add_mass(partial, cell_codes, quanta):
    for c in range(cell_codes.shape[0]):
        row = partial[cell_codes[c]]
        for k in range(quanta.shape[0]):
            row[k] += quanta[k]


@njit(cache=True, error_model="numpy", inline="always")
def _softmax_row(s, log_penalty, cell_codes, r, logits, shifted, weights, quanta, scale):
    """One updated row, as the GPU's ``softmax_row``: R = softmax of the penalised logits, stored
    in ``r``, its fixed-point mass in ``quanta``; returns the row's entropy term sum_k R log R of
    the stored R.

    The logits are summed in float64 (``logits``), then held in the working dtype (``shifted``,
    ``weights``): float32 runs take the exponential in float32, and the row's sums are float64.
    No logarithm per entry: log R_k = (v_k - max) - log(total), so
    sum_k R_k log R_k = sum_k R_k (v_k - max) - (sum_k R_k) log(total).
    Each loop does one thing over k, so that the compiler vectorises it.
    """
    n_clusters = r.shape[0]
    for k in range(n_clusters):
        logits[k] = scale * (np.float64(s[k]) - 1.0)
    for c in range(cell_codes.shape[0]):
        penalty = log_penalty[cell_codes[c]]
        for k in range(n_clusters):
            logits[k] += penalty[k]
    # Rounding is monotonic, so the maximum of the rounded logits is the rounded maximum.
    row_max = working(_max(logits), shifted)
    for k in range(n_clusters):
        shifted[k] = working(logits[k], shifted) - row_max
    for k in range(n_clusters):
        weights[k] = exp_of(shifted[k])
    total = _sum(weights)
    inverse = 1.0 / total
    for k in range(n_clusters):
        r[k] = weights[k] * inverse
        quanta[k] = _fixed_point(np.float64(r[k]))
    return _dot(r, shifted) - _sum(r) * math.log(total)


@njit(parallel=True, cache=True, error_model="numpy", fastmath=FUSED)
def _block_update(
    similarity, log_penalty, codes, cells, identity, n_update, n_rows, assignments, row_entropy,
    observed, scale, other_sign, n_tasks,
):  # fmt: skip
    n_levels, n_clusters = observed.shape
    partial = np.zeros((n_tasks, n_levels, n_clusters), dtype=np.int64)
    n_other = n_rows - n_update
    for t in prange(n_tasks):
        logits = np.empty(n_clusters, dtype=np.float64)
        shifted = np.empty(n_clusters, dtype=similarity.dtype)
        weights = np.empty(n_clusters, dtype=similarity.dtype)
        quanta = np.empty(n_clusters, dtype=np.int64)
        mass = partial[t]
        # Each task takes an equal share of the updated rows and of the other rows: the updates
        # cost far more, and a split of all rows would give them to the first tasks alone.
        others = range(n_update + t * n_other // n_tasks, n_update + (t + 1) * n_other // n_tasks)
        for row in others:
            cell = row if identity else cells[row]
            prefetch_ahead(assignments, cells, row)  # ``cells`` is empty for identity
            prefetch_ahead(codes, cells, row)
            r = assignments[cell]
            for k in range(n_clusters):
                quanta[k] = other_sign * _fixed_point(np.float64(r[k]))
            _add_mass(mass, codes[cell], quanta)
        updates = range(t * n_update // n_tasks, (t + 1) * n_update // n_tasks)
        for row in updates:
            cell = row if identity else cells[row]
            prefetch_ahead(assignments, cells, row)
            prefetch_ahead(codes, cells, row)
            prefetch_ahead(row_entropy, cells, row)
            row_entropy[cell] = _softmax_row(
                similarity[row], log_penalty, codes[cell], assignments[cell], logits, shifted,
                weights, quanta, scale,
            )  # fmt: skip
            _add_mass(mass, codes[cell], quanta)
    # Integer partial sums: exact, so their order does not matter. Added on one thread: a second
    # parallel loop would cost more in waking the threads than the additions take.
    for t in range(n_tasks):
        for b in range(n_levels):
            for k in range(n_clusters):
                observed[b, k] += partial[t, b, k]


def block_update(
    similarity, log_penalty, codes, cells, n_update, assignments, row_entropy, observed, scale,
    other_sign,
):  # fmt: skip
    """``kernels.block_update`` on the CPU (same arguments, without ``xp``)."""
    n_rows = assignments.shape[0] if cells is None else int(cells.shape[0])
    if n_rows == 0:
        return
    empty_float = np.empty((0, assignments.shape[1]), dtype=np.float64)
    _block_update(
        empty_float.astype(assignments.dtype) if similarity is None else similarity,
        empty_float if log_penalty is None else log_penalty,
        codes,
        np.empty(0, dtype=np.int64) if cells is None else cells,
        cells is None,
        n_update,
        n_rows,
        assignments,
        np.empty(0) if row_entropy is None else row_entropy,
        observed,
        float(scale),
        np.int64(other_sign),
        _tasks(n_rows),
    )


def log_penalty_table(observed, level_share, theta, first_key_levels, stabilized, out=None):
    """``kernels.log_penalty_table`` on the CPU: (B, K) float64 from fixed-point O, into ``out`` if
    given. Two logarithms per entry, once per block: a large table is filled one cluster per task
    (the same bits)."""
    if out is None:
        out = np.empty(observed.shape, dtype=np.float64)
    fill = _penalty_columns if out.size >= PARALLEL_PENALTY_ENTRIES else _penalty_columns_serial
    fill(observed, level_share, theta, first_key_levels, stabilized, out)
    return out


@njit(cache=True, error_model="numpy", inline="always")
def _penalty_column(observed, level_share, theta, first_key_levels, stabilized, k, out):
    size = np.int64(0)
    for b in range(first_key_levels):
        size += observed[b, k]
    n_k = np.float64(size) / FIXED_POINT_SCALE
    for b in range(observed.shape[0]):
        e = level_share[b] * n_k
        o = np.float64(observed[b, k]) / FIXED_POINT_SCALE
        out[b, k] = theta[b] * (math.log1p(e) - math.log1p(o + e if stabilized else o))


@njit(parallel=True, cache=True, error_model="numpy")
def _penalty_columns(observed, level_share, theta, first_key_levels, stabilized, out):
    for k in prange(observed.shape[1]):
        _penalty_column(observed, level_share, theta, first_key_levels, stabilized, k, out)


@njit(cache=True, error_model="numpy")
def _penalty_columns_serial(observed, level_share, theta, first_key_levels, stabilized, out):
    for k in range(observed.shape[1]):
        _penalty_column(observed, level_share, theta, first_key_levels, stabilized, k, out)


@njit(parallel=True, cache=True, error_model="numpy", fastmath=FUSED)
def softmax_rows(logits, scale):
    """Row softmax of scale * (logits - 1), in place, max-shifted (``init.softmax_rows``).

    One loop per step, the row's maximum and sum in the vectorising helpers (``_max``, ``_sum``),
    so that every loop runs in vector lanes. The shift is subtracted in float64 whatever the dtype
    (as the GPU's generic code does), so float32 rows round once, after the subtraction."""
    for i in prange(logits.shape[0]):
        row = logits[i]
        if row.shape[0] == 0:
            continue
        for k in range(row.shape[0]):
            row[k] = (row[k] - 1) * scale
        row_max = np.float64(_max(row))
        for k in range(row.shape[0]):
            row[k] = exp(row[k] - row_max)
        total = _sum(row)
        for k in range(row.shape[0]):
            row[k] = row[k] / total
    return logits


@njit(parallel=True, cache=True, error_model="numpy")
def _row_entropy(assignments, out, n_tasks):
    """out[i] = sum_k R_ik log(R_ik + eps): the terms in one loop, their sum in ``_sum``. The rows
    are cut into ``n_tasks`` ranges so that each task fills one scratch row of terms (a row's
    value does not depend on the ranges)."""
    n, n_clusters = assignments.shape
    for t in prange(n_tasks):
        terms = np.empty(n_clusters)
        for i in range(t * n // n_tasks, (t + 1) * n // n_tasks):
            for k in range(n_clusters):
                r = np.float64(assignments[i, k])
                terms[k] = r * log(r + ENTROPY_EPS)
            out[i] = _sum(terms)


def entropy_sum(assignments) -> float:
    """sum R log(R + eps): per row in one thread, then the rows in NumPy's fixed (pairwise) order."""
    rows = np.empty(assignments.shape[0])
    _row_entropy(assignments, rows, _tasks(assignments.shape[0]))
    return rows.sum()


@njit(parallel=True, cache=True, error_model="numpy")
def gather_rows(src, rows, out):
    """out[i] = src[rows[i]] (``kernels.gather_rows``), rows spread over the threads: NumPy's
    ``take`` copies on one thread."""
    for i in prange(rows.shape[0]):
        prefetch_ahead(src, rows, i)
        row = src[rows[i]]
        for j in range(row.shape[0]):
            out[i, j] = row[j]


@njit(parallel=True, cache=True, error_model="numpy")
def row_normalize(x, floor, out):
    """out_i = x_i / max(|x_i|, floor) (``sums.row_normalize``), |x_i|^2 summed in the dtype of x."""
    for i in prange(x.shape[0]):
        row = x[i]
        total = row[0] * row[0]
        for j in range(1, row.shape[0]):
            total += row[j] * row[j]
        norm = max(math.sqrt(total), floor)
        for j in range(row.shape[0]):
            out[i, j] = row[j] / norm


def load_rows(host, floor, z_hat, x=None):
    """Z_hat (and X, if given) from the stored rows in one pass (``setup.load_embedding``).

    Each row of ``host`` (float32 or float64) is cast to the working dtype of ``z_hat``, copied to
    ``x`` if given, and scaled to unit norm into ``z_hat`` as :func:`row_normalize` does (the
    same operations in the same order, so the same bits). Returns max |cast value| as float64,
    +inf when any cast value is NaN or Inf (then the caller looks for the cause). The first touch
    of the new arrays' pages is spread over the threads with the work.
    """
    keep = x is not None
    return _load_rows(host, floor, z_hat, x if keep else z_hat, keep, _tasks(host.shape[0]))


@njit(parallel=True, cache=True, error_model="numpy")
def _load_rows(host, floor, z_hat, x, keep, n_tasks):
    n_rows, n_dims = host.shape
    per_task = -(-n_rows // n_tasks)
    parts = np.zeros(n_tasks)
    for t in prange(n_tasks):
        best = 0.0
        for i in range(t * per_task, min((t + 1) * per_task, n_rows)):
            out = z_hat[i]
            for j in range(n_dims):
                out[j] = host[i, j]  # the cast to the working dtype
            total = out[0] * out[0]
            for j in range(1, n_dims):
                total += out[j] * out[j]
            for j in range(n_dims):
                v = abs(np.float64(out[j]))
                if not v <= best:  # a larger value, or NaN
                    best = v if math.isfinite(v) else np.inf
            if keep:
                for j in range(n_dims):
                    x[i, j] = out[j]
            norm = max(math.sqrt(total), floor)
            for j in range(n_dims):
                out[j] = out[j] / norm
        parts[t] = best
    return parts.max() if n_tasks else 0.0


@njit(parallel=True, cache=True, error_model="numpy")
def largest_magnitude(values):
    """max |v| over a 1-d array (0 if empty), NaN if any value is NaN."""
    n_parts = 64
    parts = np.zeros(n_parts)
    per_part = -(-values.shape[0] // n_parts)
    for p in prange(n_parts):
        best = 0.0
        for i in range(p * per_part, min((p + 1) * per_part, values.shape[0])):
            v = abs(np.float64(values[i]))
            if not v <= best:  # true for a larger value and for NaN
                best = v
                if v != v:
                    break
        parts[p] = best
    best = 0.0
    for p in range(n_parts):
        if not parts[p] <= best:
            best = parts[p]
            if best != best:
                break
    return best


# --- the cell order of an iteration ---------------------------------------------------------------


@njit(cache=True, error_model="numpy")
def _pcg_keys(n, seed):
    """``permutation.pcg_keys``: 32-bit arithmetic done in 64 bits and masked (numba widens)."""
    keys = np.empty(n, dtype=np.uint32)
    mask = np.uint64(0xFFFFFFFF)
    s = np.uint64(seed)
    for j in range(n):
        state = ((np.uint64(j) ^ s) * np.uint64(747796405) + np.uint64(2891336453)) & mask
        shift = (state >> np.uint64(28)) + np.uint64(4)
        word = (((state >> shift) ^ state) * np.uint64(277803737)) & mask
        keys[j] = np.uint32((word >> np.uint64(22)) ^ word)
    return keys


@njit(parallel=True, cache=True, error_model="numpy")
def cell_order(n, seed):
    """Cells sorted by their PCG hash key (``permutation.cell_order``), by a radix sort.

    The keys of distinct cells are distinct, so this is exactly NumPy's argsort of the keys. The
    top ``RADIX_BITS`` bits spread the cells over buckets in parallel (fixed parts of the cells,
    each with its own counts, so the split is stable); each bucket (1/256 of the cells, within the
    cache up to tens of millions of cells) is then sorted by the remaining bits on one thread,
    least significant digit first. Small
    inputs are sorted the same way as one bucket, on one thread.
    """
    n = np.int64(n)
    keys, order = _pcg_keys(n, seed), np.arange(n)
    if n < PARALLEL_ORDER_CELLS:  # the threads' start-up would cost more than they save
        _sort_bucket(keys, order, 32)
        return order
    n_buckets = 1 << RADIX_BITS
    top = 32 - RADIX_BITS
    n_parts = ORDER_PARTS
    per_part = -(-n // n_parts)
    counts = np.zeros((n_parts, n_buckets), dtype=np.int64)
    for p in prange(n_parts):
        for j in range(p * per_part, min(n, (p + 1) * per_part)):
            counts[p, keys[j] >> top] += 1
    starts = np.empty(n_buckets + 1, dtype=np.int64)  # bucket b: starts[b] to starts[b + 1]
    total = 0
    for b in range(n_buckets):  # counts become each part's first position in each bucket
        starts[b] = total
        for p in range(n_parts):
            size = counts[p, b]
            counts[p, b] = total
            total += size
    starts[n_buckets] = total
    bucketed = np.empty(n, dtype=np.uint32)
    for p in prange(n_parts):
        for j in range(p * per_part, min(n, (p + 1) * per_part)):
            at = counts[p, keys[j] >> top]
            counts[p, keys[j] >> top] = at + 1
            order[at] = j
            bucketed[at] = keys[j]
    for b in prange(n_buckets):
        _sort_bucket(bucketed[starts[b] : starts[b + 1]], order[starts[b] : starts[b + 1]], top)
    return order


@njit(cache=True, error_model="numpy")
def _sort_bucket(keys, order, bits):
    """``order`` sorted in place by the low ``bits`` of ``keys``, ``RADIX_BITS`` at a time (stable);
    ``bits`` is a multiple of ``RADIX_BITS``."""
    m = keys.shape[0]
    if m < 2:
        return
    digits = 1 << RADIX_BITS
    keys_now, order_now = keys.copy(), order.copy()
    keys_next, order_next = np.empty_like(keys), np.empty_like(order)
    count = np.empty(digits + 1, dtype=np.int64)
    for shift in range(0, bits, RADIX_BITS):
        count[:] = 0
        for j in range(m):
            count[((keys_now[j] >> shift) & (digits - 1)) + 1] += 1
        for d in range(digits):
            count[d + 1] += count[d]
        for j in range(m):
            digit = (keys_now[j] >> shift) & (digits - 1)
            at = count[digit]
            count[digit] = at + 1
            keys_next[at] = keys_now[j]
            order_next[at] = order_now[j]
        keys_now, keys_next = keys_next, keys_now
        order_now, order_next = order_next, order_now
    order[:] = order_now


@njit(parallel=True, cache=True, error_model="numpy")
def group_blocks_by_level(order, levels, n_levels, block_size):
    """Each block's cells regrouped by level, stably (``permutation.group_blocks_by_level``)."""
    n = order.shape[0]
    out = np.empty_like(order)
    n_blocks = -(-n // block_size)
    for block in prange(n_blocks):
        start = block * block_size
        stop = min(start + block_size, n)
        count = np.zeros(n_levels + 1, dtype=np.int64)
        for j in range(start, stop):
            count[levels[order[j]] + 1] += 1
        count[0] = start
        for b in range(n_levels):
            count[b + 1] += count[b]
        for j in range(start, stop):
            level = levels[order[j]]
            out[count[level]] = order[j]
            count[level] += 1
    return out


# --- initialisation: k-means++ and Lloyd ----------------------------------------------------------


@njit(parallel=True, cache=True, error_model="numpy", fastmath=_REORDER)
def kmeans_plus_plus(points, first, draws):
    """Indices of the k-means++ seeds (``init.kmeans_plus_plus``): ``first``, then one per draw.

    Each pass updates every point's squared distance to its nearest seed (computed directly) and
    sums them per fixed chunk of ``SUM_CHUNK_ROWS`` points, in parallel. The next seed is then found
    from the chunk sums and one chunk's running sum, so no pass over all points runs on one thread
    (a full cumulative sum did, once per seed). The sums depend on the chunking alone, not on the
    thread count. When every distance is zero the lowest-index unchosen point is taken.
    """
    n, d = points.shape
    n_chunks = -(-n // SUM_CHUNK_ROWS)
    nearest = np.full(n, np.inf)
    chunk_sums = np.empty(n_chunks)
    chosen = np.empty(draws.shape[0] + 1, dtype=np.int64)
    chosen[0] = first
    for j in range(draws.shape[0]):
        centre = points[chosen[j]]
        for chunk in prange(n_chunks):
            total = 0.0
            for i in range(chunk * SUM_CHUNK_ROWS, min((chunk + 1) * SUM_CHUNK_ROWS, n)):
                distance = 0.0
                for m in range(d):
                    diff = points[i, m] - centre[m]
                    distance += diff * diff
                nearest[i] = min(nearest[i], distance)
                total += nearest[i]
            chunk_sums[chunk] = total
        chosen[j + 1] = _draw_weighted(nearest, chunk_sums, draws[j], chosen[: j + 1])
    return chosen


@njit(cache=True, error_model="numpy")
def _draw_weighted(weights, chunk_sums, draw, chosen):
    """The first point whose running weight exceeds ``draw`` times the total weight, the running
    weight summed chunk by chunk; the lowest-index point not in ``chosen`` if every weight is 0."""
    total = 0.0
    for chunk in range(chunk_sums.shape[0]):
        total += chunk_sums[chunk]
    if not total > 0.0:
        taken = np.zeros(weights.shape[0], dtype=np.bool_)
        for index in chosen:
            taken[index] = True
        return np.argmin(taken)
    target = draw * total
    before, chunk = 0.0, 0
    while chunk < chunk_sums.shape[0] - 1 and not before + chunk_sums[chunk] > target:
        before += chunk_sums[chunk]
        chunk += 1
    start = chunk * SUM_CHUNK_ROWS
    stop = min(start + SUM_CHUNK_ROWS, weights.shape[0])
    running, last_positive = 0.0, start
    for i in range(start, stop):
        running += weights[i]
        if weights[i] > 0.0:
            last_positive = i
            if before + running > target:
                return i
    # Rounding left the target at the chunk's end (or the total is not finite, which unit-norm
    # points cannot give): the chunk's last point of positive weight.
    return last_positive


# A float32 dot product of length d, of float64 vectors rounded to float32, is within
# (d + 2) u |x| |c| of the exact one (u = 2^-24, to first order) while nothing underflows; each
# rounding in float32's subnormal range adds at most 2^-149. So |c|^2 - 2 x.c is within
# 2 (d + 2) (u |x| |c| + 2^-149), and two such values are ranked rightly when they differ by more
# than twice that. The factor 2 on top covers the second-order terms.
SCREEN_RELATIVE_ERROR = 8.0 * 2.0**-24
SCREEN_ABSOLUTE_ERROR = 8.0 * 2.0**-149


@njit(parallel=True, cache=True, error_model="numpy")
def screen_rows(points, points32, norms):
    """points32 = points in float32 and norms = |points_i| (``init.Screen``), rows spread over the
    threads. The norms only size the ranking's error bound, which covers their own rounding."""
    for i in prange(points.shape[0]):
        total = 0.0
        for j in range(points.shape[1]):
            points32[i, j] = points[i, j]
            total += points[i, j] * points[i, j]
        norms[i] = math.sqrt(total)


def assign_nearest(points32, centres_t32, centre_sq, points, centres, slack, labels, distance):
    """Nearest centre of each point and the squared distance to it (``init._assign``), per fixed
    chunk of ``ASSIGN_ROWS`` points on the pool: the chunk's float32 products, then their ranking
    (``assign_chunk``) on the same thread while the products are still in its cache."""

    def task(i):
        rows = slice(i * ASSIGN_ROWS, (i + 1) * ASSIGN_ROWS)
        dots = np.matmul(points32[rows], centres_t32)
        assign_chunk(
            dots, centre_sq, points[rows], centres, slack[rows], labels[rows], distance[rows]
        )

    _run_chunks(task, -(-points.shape[0] // ASSIGN_ROWS))


@njit(cache=True, error_model="numpy", fastmath=_REORDER, nogil=True)
def assign_chunk(dots, centre_sq, points, centres, slack, labels, distance):
    """Nearest centre of each point and the squared distance to it (recomputed directly), on the
    calling thread.

    Centres are ranked by |c|^2 - 2 x.c with x.c from a float32 product (``dots``). Where the
    best two are within ``slack[i]`` (the float32 error bound of row i), float32 could rank them
    wrongly, and the row is ranked again in float64 with dot products summed in a fixed order.
    Ties go to the lower index.
    """
    n_clusters = dots.shape[1]
    for i in range(dots.shape[0]):
        # Two passes that vectorise: the smallest value, then how many lie within the slack of it.
        best_value = np.inf
        for k in range(n_clusters):
            value = centre_sq[k] - 2.0 * np.float64(dots[i, k])
            best_value = value if value < best_value else best_value
        close, best = 0, n_clusters
        for k in range(n_clusters):
            value = centre_sq[k] - 2.0 * np.float64(dots[i, k])
            close += value <= best_value + slack[i]
            best = min(best, k if value == best_value else n_clusters)  # the first smallest
        if close > 1:  # float32 cannot tell them apart: float64, summed in a fixed order
            best_value = np.inf
            for k in range(n_clusters):
                value = centre_sq[k] - 2.0 * _dot(points[i], centres[k])
                if value < best_value:
                    best, best_value = k, value
        labels[i] = best
        d = 0.0
        for j in range(points.shape[1]):
            diff = points[i, j] - centres[best, j]
            d += diff * diff
        distance[i] = d


@njit(parallel=True, cache=True, error_model="numpy")
def cluster_sums(points, labels, n_clusters):
    """sum of the points of each cluster, (K, d) float64: fixed row chunks, added in chunk order."""
    n, d = points.shape
    n_chunks = -(-n // SUM_CHUNK_ROWS)
    partial = np.zeros((n_chunks, n_clusters, d))
    for chunk in prange(n_chunks):
        for i in range(chunk * SUM_CHUNK_ROWS, min((chunk + 1) * SUM_CHUNK_ROWS, n)):
            for j in range(d):
                partial[chunk, labels[i], j] += points[i, j]
    out = np.zeros((n_clusters, d))
    for chunk in range(n_chunks):
        out += partial[chunk]
    return out


# --- correction ------------------------------------------------------------------------------------


@njit(cache=True, error_model="numpy", nogil=True)
def _take_rows(src, rows, out):
    """out[i] = src[rows[i]] on the calling thread, without the GIL (for the pool's tasks)."""
    for i in range(rows.shape[0]):
        prefetch_ahead(src, rows, i)
        row = src[rows[i]]
        for j in range(row.shape[0]):
            out[i, j] = row[j]


@njit(cache=True, error_model="numpy", nogil=True)
def _put_rows(src, rows, out):
    """out[rows[i]] = src[i] on the calling thread, without the GIL."""
    for i in range(rows.shape[0]):
        prefetch_ahead(out, rows, i)
        row = out[rows[i]]
        for j in range(row.shape[0]):
            row[j] = src[i, j]


def _level_chunks(level_cells) -> list[tuple[int, np.ndarray]]:
    """(level, cells) for fixed chunks of ``SUM_CHUNK_ROWS`` cells of each level, in level order."""
    return [
        (b, cells[start : start + SUM_CHUNK_ROWS])
        for b, cells in enumerate(level_cells)
        for start in range(0, cells.shape[0], SUM_CHUNK_ROWS)
    ]


def _chunk_rows(assignments, x, cells):
    """The rows of R and X of ``cells``, gathered on the calling thread."""
    r = np.empty((cells.shape[0], assignments.shape[1]), dtype=assignments.dtype)
    rows = np.empty((cells.shape[0], x.shape[1]), dtype=x.dtype)
    _take_rows(assignments, cells, r)
    _take_rows(x, cells, rows)
    return r, rows


def level_moments(x, assignments, level_cells):
    """M[b, k] = sum over the cells of level b of R_ik x_i, (B, K, d) float64.

    ``level_cells`` holds the cells of each level. Each level is cut into fixed chunks of
    ``SUM_CHUNK_ROWS`` cells; a chunk's rows are gathered and multiplied by BLAS in the working
    dtype (as ``sums.cross_sums`` does), and the chunks' products are added in float64 in order.
    """
    chunks = _level_chunks(level_cells)
    parts = np.empty((len(chunks), assignments.shape[1], x.shape[1]), dtype=x.dtype)

    def task(i):
        r, rows = _chunk_rows(assignments, x, chunks[i][1])
        np.matmul(r.T, rows, out=parts[i])

    _run_chunks(task, len(chunks))
    out = np.zeros((len(level_cells), assignments.shape[1], x.shape[1]))
    for i, (b, _) in enumerate(chunks):
        out[b] += parts[i]
    return out


def correct_rows_by_level(x, assignments, weights, level_cells, out):
    """out_i = x_i - R_i W[b(i)] for one key (``kernels.correct_rows``), one BLAS product per
    fixed chunk of each level's cells, in the working dtype (as the reference does)."""
    chunks = _level_chunks(level_cells)

    def task(i):
        b, cells = chunks[i]
        r, rows = _chunk_rows(assignments, x, cells)
        rows -= r @ weights[b]
        _put_rows(rows, cells, out)

    _run_chunks(task, len(chunks))


@njit(parallel=True, cache=True, error_model="numpy")
def correct_rows(x, assignments, weights, codes, out):
    """out_i = x_i - sum_c sum_k R_ik W[b_c(i), k] for every cell (``kernels.correct_rows``),
    summed in float64; ``weights`` (B, K, d)."""
    n, d = x.shape
    n_clusters, n_keys = assignments.shape[1], codes.shape[1]
    for i in prange(n):
        shift = np.zeros(d)
        for c in range(n_keys):
            w = weights[codes[i, c]]
            for k in range(n_clusters):
                r = np.float64(assignments[i, k])
                for j in range(d):
                    shift[j] += r * np.float64(w[k, j])
        for j in range(d):
            out[i, j] = x[i, j] - shift[j]
