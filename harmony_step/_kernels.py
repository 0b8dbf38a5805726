"""Hand-written CuPy kernels for the clustering step's hot path, each beside its plain reference.

The block update is launch-bound on the GPU: written with array operations it takes some fifteen
small kernels per block. ``penalized_softmax`` does the logits, the row softmax, the scatter into R
and the per-row entropy in one kernel; ``log_penalty_table`` turns O into the penalty table in one.
Reductions inside a kernel are fixed-order shared-memory trees, so results are bitwise repeatable.

CUDA source is compiled lazily per device and dtype (``functools.cache``); CuPy is never imported
at module level, so the package runs without it. On NumPy the reference implementations run.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

# Added inside log(R + eps) of the entropy term (here and in the objective) so R = 0 gives 0, not NaN.
ENTROPY_EPS = 1e-12
THREADS = 128
# The one-warp-per-row softmax keeps this many logits per lane in registers: K <= 32 * 16 = 512.
VALUES_PER_LANE = 16
ROWS_PER_BLOCK = 8

_SOFTMAX_SOURCE = r"""
template <typename T>
__device__ void harmony_penalized_softmax(
    const T* __restrict__ similarity, const double* __restrict__ log_penalty,
    const int* __restrict__ codes, const long long* __restrict__ cells,
    T* __restrict__ assignments, double* __restrict__ out64, double* __restrict__ row_entropy,
    const int n_rows, const int n_clusters, const int n_keys, const double scale)
{
    __shared__ double shared[THREADS];
    const int row = blockIdx.x;
    const int tid = threadIdx.x;
    const T* sim = similarity + (long long)row * n_clusters;
    double* out = out64 + (long long)row * n_clusters;
    const int* code = codes + (long long)row * n_keys;

    // pass 1: logits (float64) and their maximum
    double local_max = -1.7976931348623157e308;
    for (int k = tid; k < n_clusters; k += THREADS) {
        double logit = scale * ((double)sim[k] - 1.0);
        for (int c = 0; c < n_keys; ++c) logit += log_penalty[(long long)code[c] * n_clusters + k];
        out[k] = logit;
        local_max = fmax(local_max, logit);
    }
    shared[tid] = local_max;
    __syncthreads();
    for (int s = THREADS / 2; s > 0; s >>= 1) {
        if (tid < s) shared[tid] = fmax(shared[tid], shared[tid + s]);
        __syncthreads();
    }
    const double row_max = shared[0];
    __syncthreads();

    // pass 2: exponentials and their sum (fixed-order tree)
    double local_sum = 0.0;
    for (int k = tid; k < n_clusters; k += THREADS) {
        double e = exp(out[k] - row_max);
        out[k] = e;
        local_sum += e;
    }
    shared[tid] = local_sum;
    __syncthreads();
    for (int s = THREADS / 2; s > 0; s >>= 1) {
        if (tid < s) shared[tid] += shared[tid + s];
        __syncthreads();
    }
    const double total = shared[0];
    __syncthreads();

    // pass 3: normalise, round to the working dtype, scatter into R, entropy of the stored values
    T* dest = assignments + cells[row] * n_clusters;
    double local_entropy = 0.0;
    for (int k = tid; k < n_clusters; k += THREADS) {
        T r = (T)(out[k] / total);
        dest[k] = r;
        double r64 = (double)r;
        out[k] = r64;
        local_entropy += r64 * log(r64 + ENTROPY_EPS);
    }
    shared[tid] = local_entropy;
    __syncthreads();
    for (int s = THREADS / 2; s > 0; s >>= 1) {
        if (tid < s) shared[tid] += shared[tid + s];
        __syncthreads();
    }
    if (tid == 0) row_entropy[row] = shared[0];
}

// Fast path: one warp per row, each lane keeps up to VALUES_PER_LANE logits in registers
// (K <= 32 * VALUES_PER_LANE). Butterfly shuffles leave the identical value in every lane,
// so the reductions are fixed-order and every lane agrees bit for bit.
template <typename T>
__device__ void harmony_penalized_softmax_warp(
    const T* __restrict__ similarity, const double* __restrict__ log_penalty,
    const int* __restrict__ codes, const long long* __restrict__ cells,
    T* __restrict__ assignments, double* __restrict__ out64, double* __restrict__ row_entropy,
    const int n_rows, const int n_clusters, const int n_keys, const double scale)
{
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n_rows) return;
    const T* sim = similarity + row * n_clusters;
    const int* code = codes + row * n_keys;
    double v[VALUES_PER_LANE];
    double row_max = -1.7976931348623157e308;
#pragma unroll
    for (int j = 0; j < VALUES_PER_LANE; ++j) {
        const int k = lane + 32 * j;
        v[j] = 0.0;
        if (k < n_clusters) {
            double logit = scale * ((double)sim[k] - 1.0);
            for (int c = 0; c < n_keys; ++c) logit += log_penalty[(long long)code[c] * n_clusters + k];
            v[j] = logit;
            row_max = fmax(row_max, logit);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) row_max = fmax(row_max, __shfl_xor_sync(0xffffffffu, row_max, o));
    double total = 0.0;
#pragma unroll
    for (int j = 0; j < VALUES_PER_LANE; ++j) {
        const int k = lane + 32 * j;
        if (k < n_clusters) { v[j] = exp(v[j] - row_max); total += v[j]; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
    T* dest = assignments + cells[row] * n_clusters;
    double* out = out64 + row * n_clusters;
    double entropy = 0.0;
#pragma unroll
    for (int j = 0; j < VALUES_PER_LANE; ++j) {
        const int k = lane + 32 * j;
        if (k < n_clusters) {
            const T r = (T)(v[j] / total);
            const double r64 = (double)r;
            dest[k] = r;
            out[k] = r64;
            entropy += r64 * log(r64 + ENTROPY_EPS);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) entropy += __shfl_xor_sync(0xffffffffu, entropy, o);
    if (lane == 0) row_entropy[row] = entropy;
}

extern "C" __global__ void penalized_softmax_warp_float(
    const float* a, const double* b, const int* c, const long long* d, float* e, double* f,
    double* g, const int n, const int k, const int m, const double s)
{ harmony_penalized_softmax_warp<float>(a, b, c, d, e, f, g, n, k, m, s); }

extern "C" __global__ void penalized_softmax_warp_double(
    const double* a, const double* b, const int* c, const long long* d, double* e, double* f,
    double* g, const int n, const int k, const int m, const double s)
{ harmony_penalized_softmax_warp<double>(a, b, c, d, e, f, g, n, k, m, s); }

extern "C" __global__ void penalized_softmax_float(
    const float* a, const double* b, const int* c, const long long* d, float* e, double* f,
    double* g, const int n, const int k, const int m, const double s)
{ harmony_penalized_softmax<float>(a, b, c, d, e, f, g, n, k, m, s); }

extern "C" __global__ void penalized_softmax_double(
    const double* a, const double* b, const int* c, const long long* d, double* e, double* f,
    double* g, const int n, const int k, const int m, const double s)
{ harmony_penalized_softmax<double>(a, b, c, d, e, f, g, n, k, m, s); }
"""


@functools.cache
def _softmax_module(device_id: int) -> Any:
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(
            code=_SOFTMAX_SOURCE,
            options=(
                "--std=c++14",
                f"-DTHREADS={THREADS}",
                f"-DVALUES_PER_LANE={VALUES_PER_LANE}",
                f"-DENTROPY_EPS={ENTROPY_EPS!r}",
            ),
            name_expressions=None,
        )


def penalized_softmax(
    xp: Any,
    similarity: Any,
    log_penalty: Any,
    codes: Any,
    cells: Any,
    assignments: Any,
    scale: float,
) -> tuple[Any, Any]:
    """R[cells] = softmax(scale (similarity - 1) + sum_c log_penalty[codes[:, c]]) row-wise.

    Parameters
    ----------
    similarity
        (n, K) working dtype, z_i . y_k of the block's cells.
    log_penalty
        (B, K) float64 penalty table.
    codes
        (n, C) int32 level codes of the block's cells.
    cells
        (n,) int64 rows of ``assignments`` to overwrite.
    assignments
        (N, K) R, updated in place.

    Returns
    -------
    The new rows as float64 (n, K) (the stored, dtype-rounded values) and each row's
    sum_k R log(R + eps), (n,) float64.
    """
    if xp is np:
        return _penalized_softmax_reference(
            similarity, log_penalty, codes, cells, assignments, scale
        )
    n, k = similarity.shape
    out64 = xp.empty((n, k), dtype=xp.float64)
    entropy = xp.empty(n, dtype=xp.float64)
    if n == 0:
        return out64, entropy
    suffix = "double" if similarity.dtype == xp.float64 else "float"
    module = _softmax_module(xp.cuda.Device().id)
    args = (
        xp.ascontiguousarray(similarity), xp.ascontiguousarray(log_penalty, dtype=xp.float64),
        xp.ascontiguousarray(codes, dtype=xp.int32), xp.ascontiguousarray(cells, dtype=xp.int64),
        assignments, out64, entropy, np.int32(n), np.int32(k), np.int32(codes.shape[1]), np.float64(scale),
    )  # fmt: skip
    if k <= 32 * VALUES_PER_LANE:
        grid = ((n + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK,)
        module.get_function(f"penalized_softmax_warp_{suffix}")(grid, (32 * ROWS_PER_BLOCK,), args)
    else:
        module.get_function(f"penalized_softmax_{suffix}")((n,), (THREADS,), args)
    return out64, entropy


def _penalized_softmax_reference(similarity, log_penalty, codes, cells, assignments, scale):
    logits = scale * (similarity.astype(np.float64) - 1.0)
    for c in range(codes.shape[1]):
        logits += log_penalty[codes[:, c]]
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    stored = logits.astype(assignments.dtype, copy=False)
    assignments[cells] = stored
    out64 = stored.astype(np.float64)
    return out64, (out64 * np.log(out64 + ENTROPY_EPS)).sum(axis=1)


@functools.cache
def _one_hot_kernel() -> Any:
    import cupy

    return cupy.ElementwiseKernel(
        "raw int32 codes, int32 n_keys, int32 n_levels",
        "float64 out",
        """
        const long long row = i / n_levels;
        const int level = i % n_levels;
        double hit = 0.0;
        for (int c = 0; c < n_keys; ++c) if (codes[row * n_keys + c] == level) hit = 1.0;
        out = hit;
        """,
        "harmony_one_hot",
    )


def one_hot(xp: Any, codes: Any, n_levels: int) -> Any:
    """Stacked one-hot (n, n_levels) float64 of codes (n, C): C ones per row, one per key."""
    if xp is np:
        out = np.zeros((codes.shape[0], n_levels))
        for c in range(codes.shape[1]):
            out[np.arange(codes.shape[0]), codes[:, c]] = 1.0
        return out
    out = xp.empty((codes.shape[0], n_levels), dtype=xp.float64)
    _one_hot_kernel()(
        xp.ascontiguousarray(codes, dtype=xp.int32),
        np.int32(codes.shape[1]),
        np.int32(n_levels),
        out,
    )
    return out


_PENALTY_SOURCE = r"""
extern "C" __global__ void log_penalty_table(
    const double* __restrict__ observed, const double* __restrict__ level_share,
    const double* __restrict__ theta, double* __restrict__ out,
    const int n_levels, const int n_clusters, const int first_key_levels, const int stabilized)
{
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n_clusters) return;
    double size = 0.0;  // n_k from key 0's rows, summed in level order
    for (int b = 0; b < first_key_levels; ++b) size += observed[(long long)b * n_clusters + k];
    for (int b = 0; b < n_levels; ++b) {
        const long long at = (long long)b * n_clusters + k;
        const double e = level_share[b] * size;
        const double o = observed[at];
        out[at] = theta[b] * (log1p(e) - log1p(stabilized ? o + e : o));
    }
}
"""


@functools.cache
def _penalty_kernel(device_id: int) -> Any:
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawKernel(_PENALTY_SOURCE, "log_penalty_table")


def log_penalty_table(
    xp: Any, observed: Any, level_share: Any, theta: Any, first_key_levels: int, flavor: str
) -> Any:
    """log P (B, K) from O: theta_b [log(E+1) - log(O+1)] (harmony1) or [... - log(O+E+1)] (harmony2).

    E_bk = Pr_b n_k with n_k summed over key 0's levels in level order.
    """
    if xp is np:
        return _log_penalty_reference(observed, level_share, theta, first_key_levels, flavor)
    n_levels, n_clusters = observed.shape
    out = xp.empty_like(observed)
    blocks = (n_clusters + THREADS - 1) // THREADS
    _penalty_kernel(xp.cuda.Device().id)(
        (blocks,), (THREADS,),
        (xp.ascontiguousarray(observed), level_share, theta, out, np.int32(n_levels),
         np.int32(n_clusters), np.int32(first_key_levels), np.int32(flavor == "harmony2")),
    )  # fmt: skip
    return out


def _log_penalty_reference(observed, level_share, theta, first_key_levels, flavor):
    size = np.zeros(observed.shape[1])
    for b in range(first_key_levels):  # the kernel's summation order
        size = size + observed[b]
    expected = level_share[:, None] * size[None, :]
    denominator = observed + expected if flavor == "harmony2" else observed
    return theta[:, None] * (np.log1p(expected) - np.log1p(denominator))
