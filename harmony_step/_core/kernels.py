"""The clustering step's hot path: hand-written CuPy kernels, each beside its plain NumPy reference.

One block update is one pass over the block's rows (docs/algorithm.md §5): ``block_update`` forms
the penalised logits from the similarity, takes the row softmax, stores R, records each row's
entropy term and adds the new mass to O, and in the same launch removes the *next* block's old
mass from O, so the next penalty sees leave-block-out counts without another pass. There is no
host synchronisation, no one-hot matrix and no float64 copy of N x K or N x d data in the loop.

O is kept in fixed point (``FIXED_POINT_SCALE`` units per unit of mass, int64). Integer sums are
exact, so atomic accumulation in any order, on one GPU or several, gives the same bits on every
run, the CPU and the GPU agree exactly on O for the same R, and removing a block's mass undoes its
addition exactly (no drift over many block updates). The rounding step, 2^-32 of a cell, is far
below the float32 resolution of R.

CUDA source is compiled lazily per device (``functools.cache``); CuPy is never imported at module
level, so the package runs without it. On NumPy the numba kernels of ``cpu_kernels`` run (imported
on first use); the NumPy references here are what both are tested against.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

# Guard for row normalisation: a zero row stays zero instead of becoming NaN.
NORM_FLOOR = 1e-12
# Added inside log(R + eps) of the entropy term (here and in the objective) so R = 0 gives 0, not NaN.
ENTROPY_EPS = 1e-12
# One unit of R mass in O is 2^32 integer units: int64 then holds the mass of 2^31 cells exactly.
FIXED_POINT_BITS = 32
FIXED_POINT_SCALE = float(1 << FIXED_POINT_BITS)
# The warp-per-row softmax keeps K / 32 logits per lane in registers: the block update is compiled
# for each of these widths and runs the narrowest that holds K (fewer registers, more warps in
# flight). Beyond 32 * 16 clusters it recomputes the logits in each pass instead of caching them.
VALUES_PER_LANE = (4, 8, 16)
WARPS_PER_BLOCK = 4
# Each warp takes one contiguous run of rows, at least this many: a warp's rows run one after
# another, so small blocks are spread thinly to keep their latency short.
MIN_ROWS_PER_WARP = 2

_SOURCE = r"""
#define LANES 32

__device__ __forceinline__ long long fixed_point(const double r) {
    return __double2ll_rn(r * FIXED_POINT_SCALE);
}

// The same value as the double overload: scaling by a power of two is exact in float, and the
// rounding to the nearest integer (ties to even) is the same, without a conversion to double.
__device__ __forceinline__ long long fixed_point(const float r) {
    return __float2ll_rn(r * (float)FIXED_POINT_SCALE);
}

template <typename M>
__device__ __forceinline__ M warp_sum(M v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;  // butterfly: every lane ends with the same, fixed-order sum
}

template <typename M>
__device__ __forceinline__ M warp_max(M v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ void add_mass(
    unsigned long long* sink, const int* code, const int n_keys, const int n_clusters, const int k,
    const long long q)
{
    for (int c = 0; c < n_keys; ++c)
        atomicAdd(sink + (long long)code[c] * n_clusters + k, (unsigned long long)q);
}

__device__ __forceinline__ void flush_mass(
    unsigned long long* observed, long long* mass, const int level, const int n_clusters,
    const int lane)
{
#pragma unroll
    for (int j = 0; j < VALUES_PER_LANE; ++j) {
        const int k = lane + LANES * j;
        if (level >= 0 && k < n_clusters && mass[j] != 0)
            atomicAdd(observed + (long long)level * n_clusters + k, (unsigned long long)mass[j]);
        mass[j] = 0;
    }
}

template <typename T>
__device__ __forceinline__ double logit_at(
    const T* sim, const double* log_penalty, const int* code, const int n_keys,
    const int n_clusters, const int k, const double scale)
{
    double logit = scale * ((double)sim[k] - 1.0);
    for (int c = 0; c < n_keys; ++c) logit += log_penalty[(long long)code[c] * n_clusters + k];
    return logit;
}

// One warp computes one row: softmax of the penalised logits, stored in R. Its key-0 mass goes
// to the warp's run sums (``cached``) or straight to O; returns sum_k R log(R + eps) of the stored
// (dtype-rounded) values.
template <typename T>
__device__ double softmax_row(
    const T* sim, const double* log_penalty, const int* code, T* r, unsigned long long* observed,
    long long* mass, const bool cached, const int n_clusters, const int n_keys, const double scale,
    const int lane)
{
    double entropy = 0.0;
    if (cached) {
        // The softmax runs in the working dtype T (float math for float32 runs: R is stored
        // in T anyway); the logits' penalty sum stays in float64. The entropy term needs no
        // logarithm per entry: log R_k = (v_k - max) - log(total), so
        // sum_k R_k log R_k = sum_k R_k (v_k - max) - (sum_k R_k) log(total), with the stored R.
        T v[VALUES_PER_LANE];
        T row_max = -3.0e38;
#pragma unroll
        for (int j = 0; j < VALUES_PER_LANE; ++j) {
            const int k = lane + LANES * j;
            v[j] = 0;
            if (k < n_clusters) {
                v[j] = (T)logit_at<T>(sim, log_penalty, code, n_keys, n_clusters, k, scale);
                row_max = fmax(row_max, v[j]);
            }
        }
        row_max = warp_max<T>(row_max);
        T total = 0, e[VALUES_PER_LANE];
#pragma unroll
        for (int j = 0; j < VALUES_PER_LANE; ++j) {
            v[j] -= row_max;
            e[j] = lane + LANES * j < n_clusters ? exp(v[j]) : (T)0;
            total += e[j];
        }
        total = warp_sum<T>(total);
        const T inverse = (T)1 / total;
        T weighted = 0, mass_sum = 0;
#pragma unroll
        for (int j = 0; j < VALUES_PER_LANE; ++j) {
            const int k = lane + LANES * j;
            if (k < n_clusters) {
                const T stored = e[j] * inverse;
                r[k] = stored;
                weighted += stored * v[j];
                mass_sum += stored;
                const long long q = fixed_point(stored);
                mass[j] += q;
                add_mass(observed, code + 1, n_keys - 1, n_clusters, k, q);
            }
        }
        return (double)warp_sum<T>(weighted) - (double)warp_sum<T>(mass_sum) * log((double)total);
    }
    // Many clusters: recompute the logits in each pass rather than keep them.
    double row_max = -1.7976931348623157e308;
    for (int k = lane; k < n_clusters; k += LANES)
        row_max = fmax(row_max, logit_at<T>(sim, log_penalty, code, n_keys, n_clusters, k, scale));
    row_max = warp_max<double>(row_max);
    double total = 0.0;
    for (int k = lane; k < n_clusters; k += LANES)
        total += exp(logit_at<T>(sim, log_penalty, code, n_keys, n_clusters, k, scale) - row_max);
    total = warp_sum<double>(total);
    for (int k = lane; k < n_clusters; k += LANES) {
        const double e = exp(logit_at<T>(sim, log_penalty, code, n_keys, n_clusters, k, scale) - row_max);
        const T stored = (T)(e / total);
        const double r64 = (double)stored;
        r[k] = stored;
        entropy += r64 * log(r64 + ENTROPY_EPS);
        add_mass(observed, code, n_keys, n_clusters, k, fixed_point(r64));
    }
    return warp_sum<double>(entropy);
}

// Rows [0, n_update) of ``cells`` get new assignments; rows [n_update, n_rows) add
// ``other_sign`` times their current mass to O. ``identity`` means row i is cell i.
// Each warp takes one contiguous run of the updated rows and one of the other rows (an update
// costs several times a removal, so splitting all rows evenly would leave the warps that drew
// updates working while the others wait). Rows arrive grouped by their key-0 level
// (``permutation.cell_order``), so the key-0 mass of a run of equal levels is summed in registers
// and flushed with one atomic per cluster when the level changes; other keys add per row.
template <typename T>
__device__ void block_update(
    const T* __restrict__ similarity, const double* __restrict__ log_penalty,
    const int* __restrict__ codes, const long long* __restrict__ cells, T* __restrict__ assignments,
    double* __restrict__ row_entropy, unsigned long long* __restrict__ observed,
    const long long n_update, const long long n_rows, const int n_clusters, const int n_keys,
    const double scale, const long long other_sign, const int identity)
{
    const int lane = threadIdx.x & (LANES - 1);
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / LANES;
    const long long n_warps = (long long)gridDim.x * blockDim.x / LANES;
    const bool cached = n_clusters <= LANES * VALUES_PER_LANE;
    long long mass[VALUES_PER_LANE];
#pragma unroll
    for (int j = 0; j < VALUES_PER_LANE; ++j) mass[j] = 0;
    int run_level = -1;
    for (int part = 0; part < 2; ++part) {
    const long long begin = part == 0 ? 0 : n_update, end = part == 0 ? n_update : n_rows;
    const long long per_warp = (end - begin + n_warps - 1) / n_warps;
    const long long first = begin + warp * per_warp;
    const long long last = min(first + per_warp, end);
    // Loads run ahead of the rows that use them: the cell index two rows ahead, its key-0 level
    // one row ahead, so their latencies overlap this row's work.
    long long cell = first < last ? (identity ? first : cells[first]) : 0;
    long long cell_after = first + 1 < last ? (identity ? first + 1 : cells[first + 1]) : 0;
    int level = first < last ? codes[cell * n_keys] : 0;
    for (long long row = first; row < last; ++row) {
        const long long ahead = row + 2;
        const long long cell_later = ahead < last ? (identity ? ahead : cells[ahead]) : 0;
        const int level_after = row + 1 < last ? codes[cell_after * n_keys] : 0;
        T* r = assignments + cell * n_clusters;
        const int* code = codes + cell * n_keys;
        if (cached && level != run_level) {
            flush_mass(observed, mass, run_level, n_clusters, lane);
            run_level = level;
        }
        if (row < n_update) {
            const double entropy = softmax_row<T>(
                similarity + row * n_clusters, log_penalty, code, r, observed, mass, cached,
                n_clusters, n_keys, scale, lane);
            if (lane == 0) row_entropy[cell] = entropy;
        } else if (cached) {
#pragma unroll
            for (int j = 0; j < VALUES_PER_LANE; ++j) {
                const int k = lane + LANES * j;
                if (k < n_clusters) {
                    const long long q = other_sign * fixed_point(r[k]);
                    mass[j] += q;
                    add_mass(observed, code + 1, n_keys - 1, n_clusters, k, q);
                }
            }
        } else {
            for (int k = lane; k < n_clusters; k += LANES)
                add_mass(observed, code, n_keys, n_clusters, k, other_sign * fixed_point(r[k]));
        }
        cell = cell_after;
        cell_after = cell_later;
        level = level_after;
    }
    }
    if (cached) flush_mass(observed, mass, run_level, n_clusters, lane);
}

#define BLOCK_UPDATE_ENTRY(NAME, T)                                                              \
extern "C" __global__ void __launch_bounds__(BLOCK_THREADS, MIN_BLOCKS) NAME(                   \
    const T* a, const double* b, const int* c, const long long* d, T* e, double* f,              \
    unsigned long long* g, const long long h, const long long i, const int j, const int k,       \
    const double m, const long long n, const int p)                                              \
{ block_update<T>(a, b, c, d, e, f, g, h, i, j, k, m, n, p); }

BLOCK_UPDATE_ENTRY(block_update_float, float)
BLOCK_UPDATE_ENTRY(block_update_double, double)

// dst[i] = src[rows[i]] for rows of n_cols values: each block copies GATHER_ROWS consecutive
// output rows, its threads striding over their elements (int32 index arithmetic within a block).
template <typename T>
__device__ void gather_rows(
    const T* __restrict__ src, const long long* __restrict__ rows, T* __restrict__ dst,
    const long long n_rows, const int n_cols)
{
    const long long first = (long long)blockIdx.x * GATHER_ROWS;
    const int count = (int)min((long long)GATHER_ROWS, n_rows - first);
    for (int e = threadIdx.x; e < count * n_cols; e += blockDim.x) {
        const int r = e / n_cols, c = e - r * n_cols;
        dst[(first + r) * n_cols + c] = src[rows[first + r] * n_cols + c];
    }
}

extern "C" __global__ void gather_rows_float(
    const float* a, const long long* b, float* c, const long long d, const int e)
{ gather_rows<float>(a, b, c, d, e); }

extern "C" __global__ void gather_rows_double(
    const double* a, const long long* b, double* c, const long long d, const int e)
{ gather_rows<double>(a, b, c, d, e); }

// The three objective parts from carried sums, in one block of SMALL_THREADS threads with a fixed
// reduction order: k-means 2 (sum_k n_k - sum_kd y_kd (R^T Z)_kd), sigma * entropy, and
// -sigma sum_bk O_bk log P_bk. n_k (dynamic shared memory, K doubles) is summed exactly.
extern "C" __global__ void objective_parts(
    const long long* __restrict__ observed, const double* __restrict__ level_share,
    const double* __restrict__ theta, const double* __restrict__ centroids,
    const double* __restrict__ centroid_sums, const double* __restrict__ entropy,
    double* __restrict__ out, const int n_levels, const int n_clusters, const int n_pcs,
    const int first_key_levels, const int stabilized, const double sigma)
{
    extern __shared__ double cluster_size[];
    __shared__ double dots[SMALL_THREADS], penalties[SMALL_THREADS];
    __shared__ long long masses[SMALL_THREADS];
    const int t = threadIdx.x;
    long long mass = 0;
    for (int k = t; k < n_clusters; k += SMALL_THREADS) {
        long long size = 0;
        for (int b = 0; b < first_key_levels; ++b) size += observed[(long long)b * n_clusters + k];
        cluster_size[k] = (double)size / FIXED_POINT_SCALE;
        mass += size;
    }
    __syncthreads();
    double dot = 0.0, penalty = 0.0;
    for (long long i = t; i < (long long)n_clusters * n_pcs; i += SMALL_THREADS)
        dot += centroids[i] * centroid_sums[i];
    for (long long at = t; at < (long long)n_levels * n_clusters; at += SMALL_THREADS) {
        const int b = (int)(at / n_clusters), k = (int)(at % n_clusters);
        const double e = level_share[b] * cluster_size[k];
        const double o = (double)observed[at] / FIXED_POINT_SCALE;
        penalty += o * theta[b] * (log1p(e) - log1p(stabilized ? o + e : o));
    }
    dots[t] = dot;
    penalties[t] = penalty;
    masses[t] = mass;
    __syncthreads();
    for (int half = SMALL_THREADS / 2; half > 0; half >>= 1) {
        if (t < half) {
            dots[t] += dots[t + half];
            penalties[t] += penalties[t + half];
            masses[t] += masses[t + half];
        }
        __syncthreads();
    }
    if (t == 0) {
        out[0] = 2.0 * ((double)masses[0] / FIXED_POINT_SCALE - dots[0]);
        out[1] = sigma * entropy[0];
        out[2] = -sigma * penalties[0];
    }
}

// Centroids from R^T Z: each row scaled to unit norm (a zero row stays zero), in float64 (K, d)
// and transposed in the working dtype (d, K) for the similarity GEMM. One block per cluster.
template <typename T>
__device__ void unit_centroids(
    const double* __restrict__ sums, double* __restrict__ unit, T* __restrict__ transposed,
    const int n_clusters, const int n_pcs, const double floor)
{
    __shared__ double squares[SMALL_THREADS];
    const int k = blockIdx.x, t = threadIdx.x;
    double square = 0.0;
    for (int j = t; j < n_pcs; j += SMALL_THREADS) square += sums[(long long)k * n_pcs + j] * sums[(long long)k * n_pcs + j];
    squares[t] = square;
    __syncthreads();
    for (int half = SMALL_THREADS / 2; half > 0; half >>= 1) {
        if (t < half) squares[t] += squares[t + half];
        __syncthreads();
    }
    const double norm = fmax(sqrt(squares[0]), floor);
    for (int j = t; j < n_pcs; j += SMALL_THREADS) {
        const double y = sums[(long long)k * n_pcs + j] / norm;
        unit[(long long)k * n_pcs + j] = y;
        transposed[(long long)j * n_clusters + k] = (T)y;
    }
}

extern "C" __global__ void unit_centroids_float(
    const double* a, double* b, float* c, const int d, const int e, const double f)
{ unit_centroids<float>(a, b, c, d, e, f); }

extern "C" __global__ void unit_centroids_double(
    const double* a, double* b, double* c, const int d, const int e, const double f)
{ unit_centroids<double>(a, b, c, d, e, f); }

// log P (B, K) from fixed-point O, one thread per entry; n_k is summed exactly in integers over
// key 0's levels (by each thread of the cluster: B x K threads keep the latency short).
extern "C" __global__ void log_penalty_table(
    const long long* __restrict__ observed, const double* __restrict__ level_share,
    const double* __restrict__ theta, double* __restrict__ out,
    const int n_levels, const int n_clusters, const int first_key_levels, const int stabilized)
{
    const long long at = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (at >= (long long)n_levels * n_clusters) return;
    const int b = (int)(at / n_clusters), k = (int)(at % n_clusters);
    long long size = 0;
    for (int c = 0; c < first_key_levels; ++c) size += observed[(long long)c * n_clusters + k];
    const double e = level_share[b] * ((double)size / FIXED_POINT_SCALE);
    const double o = (double)observed[at] / FIXED_POINT_SCALE;
    out[at] = theta[b] * (log1p(e) - log1p(stabilized ? o + e : o));
}
"""

PENALTY_THREADS = 128
# Threads of the one-block kernels over K x d and B x K sums (a power of two).
SMALL_THREADS = 256
# Rows copied by one block of ``gather_rows`` (GATHER_THREADS threads).
GATHER_ROWS, GATHER_THREADS = 32, 256


@functools.cache
def cpu() -> Any:
    """The numba kernels (``cpu_kernels``), imported and compiled on first use."""
    from harmony_step._core import cpu_kernels

    return cpu_kernels


@functools.cache
def _kernel(
    device_id: int, name: str, values_per_lane: int = VALUES_PER_LANE[0], min_blocks: int = 1
) -> Any:
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawKernel(
            _SOURCE,
            name,
            options=(
                "--std=c++14",
                f"-DVALUES_PER_LANE={values_per_lane}",
                f"-DBLOCK_THREADS={32 * WARPS_PER_BLOCK}",
                f"-DMIN_BLOCKS={min_blocks}",
                f"-DSMALL_THREADS={SMALL_THREADS}",
                f"-DGATHER_ROWS={GATHER_ROWS}",
                f"-DENTROPY_EPS={ENTROPY_EPS!r}",
                f"-DFIXED_POINT_SCALE={FIXED_POINT_SCALE!r}",
            ),
        )


@functools.cache
def _block_update_kernel(device_id: int, dtype_name: str, n_clusters: int) -> tuple[Any, int]:
    """The block update compiled for K, and how many of its warps the device holds at once."""
    import cupy

    width = next((v for v in VALUES_PER_LANE if 32 * v >= n_clusters), VALUES_PER_LANE[0])
    # Register cap from the blocks of 128 threads kept resident per multiprocessor: 72 registers
    # per thread for the narrowest width (7 blocks; at 64 it spills), 128 and 256 for the wider.
    min_blocks = 7 if width == VALUES_PER_LANE[0] else 32 // width
    kernel = _kernel(device_id, f"block_update_{dtype_name}", width, min_blocks)
    attributes = cupy.cuda.Device(device_id).attributes
    threads = 32 * WARPS_PER_BLOCK
    registers = max(int(kernel.attributes["num_regs"]), 1)
    per_sm = max(1, min(attributes["MaxThreadsPerMultiProcessor"] // threads,
                        attributes["MaxRegistersPerMultiprocessor"] // (registers * threads)))  # fmt: skip
    return kernel, per_sm * WARPS_PER_BLOCK * attributes["MultiProcessorCount"]


def block_update(
    xp: Any,
    similarity: Any,
    log_penalty: Any,
    codes: Any,
    cells: Any,
    n_update: int,
    assignments: Any,
    row_entropy: Any,
    observed: Any,
    scale: float,
    other_sign: int = -1,
) -> None:
    """One block update of the clustering step, in place.

    For the first ``n_update`` rows of ``cells``: R[cell] = softmax(scale (similarity - 1) +
    sum_c log_penalty[codes[cell, c]]), row_entropy[cell] = sum_k R log(R + eps), and the new mass
    is added to O. The remaining rows of ``cells`` add ``other_sign`` times their current mass.

    Parameters
    ----------
    similarity
        (n_update, K) working dtype, z_i . y_k of the updated cells, in the order of ``cells``.
    log_penalty
        (B, K) float64 penalty table (``log_penalty_table``).
    codes
        (N, C) int32 level codes of every cell, one column per key (levels offset per key).
    cells
        (n_rows,) int64 cell indices; ``None`` means every cell in order (then n_rows = N).
    assignments
        R, (N, K) working dtype, C-contiguous; updated in place.
    row_entropy
        (N,) float64, updated in place for the updated cells.
    observed
        O in fixed point, (B, K) int64 (``FIXED_POINT_SCALE`` units per unit of mass), in place.
    """
    n_rows = assignments.shape[0] if cells is None else int(cells.shape[0])
    if n_update and similarity.shape[0] < n_update:
        raise ValueError(f"{n_update} rows to update but {similarity.shape[0]} similarity rows")
    if xp is np:
        cpu().block_update(
            similarity, log_penalty, codes, cells, n_update, assignments, row_entropy, observed,
            scale, other_sign,
        )  # fmt: skip
        return
    if n_rows == 0:
        return
    suffix = "double" if assignments.dtype == xp.float64 else "float"
    kernel, resident = _block_update_kernel(xp.cuda.Device().id, suffix, assignments.shape[1])
    warps = min(resident, -(-n_rows // MIN_ROWS_PER_WARP))
    unused = observed  # stands in for the pointers a launch does not read
    args = (
        similarity if n_update else unused, unused if log_penalty is None else log_penalty, codes,
        unused if cells is None else cells, assignments,
        unused if row_entropy is None else row_entropy, observed, np.int64(n_update),
        np.int64(n_rows), np.int32(assignments.shape[1]), np.int32(codes.shape[1]),
        np.float64(scale), np.int64(other_sign), np.int32(cells is None),
    )  # fmt: skip
    kernel((-(-warps // WARPS_PER_BLOCK),), (32 * WARPS_PER_BLOCK,), args)


def fixed_point(values: np.ndarray) -> np.ndarray:
    """R values as int64 fixed-point mass, rounded to nearest even like the kernel's __double2ll_rn."""
    return np.rint(values.astype(np.float64, copy=False) * FIXED_POINT_SCALE).astype(np.int64)


def _add_mass(observed: np.ndarray, codes: np.ndarray, mass: np.ndarray) -> None:
    for c in range(codes.shape[1]):
        np.add.at(observed, codes[:, c], mass)


def _block_update_reference(
    similarity, log_penalty, codes, cells, n_update, assignments, row_entropy, observed, scale,
    other_sign,
):  # fmt: skip
    cells = np.arange(assignments.shape[0]) if cells is None else cells
    update, other = cells[:n_update], cells[n_update:]
    if update.size:
        block_codes = codes[update]
        logits = scale * (similarity.astype(np.float64) - 1.0)
        for c in range(block_codes.shape[1]):
            logits += log_penalty[block_codes[:, c]]
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        stored = logits.astype(assignments.dtype, copy=False)
        assignments[update] = stored
        r64 = stored.astype(np.float64)
        row_entropy[update] = (r64 * np.log(r64 + ENTROPY_EPS)).sum(axis=1)
        _add_mass(observed, block_codes, fixed_point(r64))
    if other.size:
        _add_mass(observed, codes[other], other_sign * fixed_point(assignments[other]))


def log_penalty_table(
    xp: Any,
    observed: Any,
    level_share: Any,
    theta: Any,
    first_key_levels: int,
    flavor: str,
    out: Any = None,
) -> Any:
    """log P (B, K) from fixed-point O: theta_b [log(E+1) - log(O+1)] (harmony1) or
    theta_b [log(E+1) - log(O+E+1)] (harmony2), with E_bk = Pr_b n_k (docs/algorithm.md §6).

    ``observed`` is (B, K) int64 fixed point; n_k is summed exactly over key 0's levels. ``out``,
    if given, is a (B, K) float64 array to write into (no allocation: the launch can be recorded).
    """
    if xp is np:
        return cpu().log_penalty_table(
            observed, level_share, theta, first_key_levels, flavor == "harmony2", out
        )
    n_levels, n_clusters = observed.shape
    if out is None:
        out = xp.empty(observed.shape, dtype=xp.float64)
    _kernel(xp.cuda.Device().id, "log_penalty_table")(
        (-(-n_levels * n_clusters // PENALTY_THREADS),), (PENALTY_THREADS,),
        (observed, level_share, theta, out, np.int32(n_levels), np.int32(n_clusters),
         np.int32(first_key_levels), np.int32(flavor == "harmony2")),
    )  # fmt: skip
    return out


def _log_penalty_reference(observed, level_share, theta, first_key_levels, flavor):
    size = observed[:first_key_levels].sum(axis=0).astype(np.float64) / FIXED_POINT_SCALE
    counts = observed.astype(np.float64) / FIXED_POINT_SCALE
    expected = level_share[:, None] * size[None, :]
    denominator = counts + expected if flavor == "harmony2" else counts
    return theta[:, None] * (np.log1p(expected) - np.log1p(denominator))


def gather_rows(xp: Any, src: Any, rows: Any, out: Any) -> Any:
    """out[i] = src[rows[i]]: ``src`` (N, d) C-contiguous, ``rows`` (n,) int64, ``out`` (n, d)."""
    if xp is np:
        cpu().gather_rows(src, rows, out)
        return out
    if rows.shape[0]:
        name = "gather_rows_" + ("double" if src.dtype == xp.float64 else "float")
        _kernel(xp.cuda.Device().id, name)(
            (-(-rows.shape[0] // GATHER_ROWS),), (GATHER_THREADS,),
            (src, rows, out, np.int64(rows.shape[0]), np.int32(src.shape[1])),
        )  # fmt: skip
    return out


def objective_parts(
    xp: Any, observed: Any, level_share: Any, theta: Any, centroids: Any, centroid_sums: Any,
    entropy: Any, first_key_levels: int, flavor: str, sigma: float,
) -> Any:  # fmt: skip
    """(k-means, entropy, diversity) float64 (3,) on the GPU in one launch (``objective`` has the
    formulas and the NumPy form). ``observed`` (B, K) int64 fixed point, ``centroids`` and
    ``centroid_sums`` (K, d) float64, ``entropy`` a one-element float64 array."""
    n_levels, n_clusters = observed.shape
    out = xp.empty(3, dtype=xp.float64)
    _kernel(xp.cuda.Device().id, "objective_parts")(
        (1,), (SMALL_THREADS,),
        (observed, level_share, theta, centroids, centroid_sums, entropy, out,
         np.int32(n_levels), np.int32(n_clusters), np.int32(centroids.shape[1]),
         np.int32(first_key_levels), np.int32(flavor == "harmony2"), np.float64(sigma)),
        shared_mem=8 * n_clusters,
    )  # fmt: skip
    return out


def unit_centroids(xp: Any, sums: Any, dtype: Any) -> tuple[Any, Any]:
    """Rows of ``sums`` (K, d) float64 scaled to unit norm (zero rows stay zero): the float64
    centroids (K, d) and their contiguous transpose (d, K) in ``dtype``; one launch on the GPU."""
    if xp is np:
        norms = np.sqrt((sums * sums).sum(axis=1, keepdims=True))
        unit = sums / np.maximum(norms, NORM_FLOOR)
        # A contiguous copy: NumPy multiplies by a transposed view far more slowly.
        return unit, np.ascontiguousarray(unit.astype(dtype).T)
    floor = NORM_FLOOR
    n_clusters, n_pcs = sums.shape
    unit = xp.empty((n_clusters, n_pcs), dtype=xp.float64)
    transposed = xp.empty((n_pcs, n_clusters), dtype=dtype)
    name = "unit_centroids_" + ("double" if transposed.dtype == xp.float64 else "float")
    _kernel(xp.cuda.Device().id, name)(
        (n_clusters,), (SMALL_THREADS,),
        (xp.ascontiguousarray(sums), unit, transposed, np.int32(n_clusters), np.int32(n_pcs),
         np.float64(floor)),
    )  # fmt: skip
    return unit, transposed


@functools.cache
def _correct_rows_kernel() -> Any:
    import cupy

    return cupy.ElementwiseKernel(
        "raw T x, raw T assignments, raw T weights, raw int32 codes, int32 n_clusters, "
        "int32 n_pcs, int32 n_keys",
        "T out",
        """
        const long long row = i / n_pcs;
        const int j = i % n_pcs;
        const T* r = &assignments[row * n_clusters];
        T effect = 0;
        for (int c = 0; c < n_keys; ++c) {
            const T* w = &weights[(long long)codes[row * n_keys + c] * n_clusters * n_pcs + j];
            for (int k = 0; k < n_clusters; ++k) effect += r[k] * w[(long long)k * n_pcs];
        }
        out = x[i] - effect;
        """,
        "harmony_correct_rows",
    )


def correct_rows(
    xp: Any, x: Any, assignments: Any, weights: Any, codes: Any, level_cells: Any, out: Any
) -> None:
    """out_i = x_i - sum_c R_i W[b_c(i)] for every cell, in one pass (docs/algorithm.md §8).

    ``x`` and ``out`` (N, d), ``assignments`` (N, K), ``weights`` (B, K, d), all in the working
    dtype; ``codes`` (N, C) int32; ``level_cells`` the cells of each level (on the CPU with one key,
    products per level; the NumPy reference's GEMM per level) or None.
    """
    if xp is np:
        if level_cells is not None and codes.shape[1] == 1:
            cpu().correct_rows_by_level(x, assignments, weights, level_cells, out)
        else:  # several keys: each cell's shifts summed in one pass
            cpu().correct_rows(x, assignments, weights, codes, out)
        return
    n_pcs = x.shape[1]
    _correct_rows_kernel()(
        x, assignments, weights, codes, np.int32(assignments.shape[1]), np.int32(n_pcs),
        np.int32(codes.shape[1]), out,
    )  # fmt: skip


def _correct_rows_reference(x, assignments, weights, level_cells, out):
    out[...] = x
    for b, cells in enumerate(level_cells):
        out[cells] -= assignments[cells] @ weights[b]


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
