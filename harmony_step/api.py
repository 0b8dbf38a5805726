"""``harmony_integrate``: the public Python entry point. AnnData in and out, no arithmetic."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from harmony_step._integrate import integrate
from harmony_step._params import HarmonyParameterWarning, HarmonyParams

if TYPE_CHECKING:
    from anndata import AnnData


def harmony_integrate(
    adata: AnnData,
    key: str | list[str],
    *,
    basis: str = "X_pca",
    adjusted_basis: str = "X_pca_harmony",
    dtype: Any = np.float64,
    flavor: str = "harmony2",
    n_clusters: int | None = None,
    max_iter_harmony: int = 10,
    max_iter_clustering: int = 200,
    tol_harmony: float = 1e-4,
    tol_clustering: float = 1e-5,
    sigma: float = 0.1,
    theta: float | list[float] = 2.0,
    tau: float = 0,
    ridge_lambda: float = 1.0,
    alpha: float = 0.2,
    batch_prune_threshold: float | None = 1e-5,
    correction_method: str | None = None,
    colsum_algo: str | None = None,
    block_proportion: float = 0.05,
    random_state: int | None = 0,
    verbose: bool = False,
    device: str = "auto",
    n_gpus: int = 1,
) -> None:
    """Remove batch effects from an embedding with Harmony, on a GPU (CuPy) or the CPU (NumPy).

    Harmony alternates two steps for up to ``max_iter_harmony`` rounds: a soft k-means
    clustering of the cells that favours clusters mixing all batches, and a correction that
    removes from each cell the batch offsets estimated within its clusters (a mixture of ridge
    regressions). The default flavor, harmony2, bounds the diversity penalty, scales the ridge
    with the expected counts and prunes rare batch-cluster pairs, which keeps distinct cell types
    apart; ``flavor='harmony1'`` is the original algorithm. docs/algorithm.md in the source
    repository describes every step and the numerical choices.

    Parameters
    ----------
    adata
        Annotated data with the embedding in ``adata.obsm[basis]``, shape (n_cells, n_pcs),
        usually a PCA: a NumPy array (any memory order, float or integer), a DataFrame, a CuPy
        array or a Dask array. A view of an AnnData works too (it becomes an actual AnnData, as
        in anndata). Only ``obs``, ``obsm[basis]`` and, on output, ``obsm[adjusted_basis]`` and
        ``uns['harmony']`` are touched; ``X`` is never read.
    key
        One ``obs`` column or a list of them, each a batch variable (for example donor and
        chemistry); missing values, a column listed twice and a float column with fractional
        values are errors, and a warning says when a key has about one cell per level.
        Categories of a categorical column that no cell uses are kept as empty levels.
    basis
        ``obsm`` key of the embedding to correct (never modified).
    adjusted_basis
        ``obsm`` key the corrected embedding is written to (replaced when it exists); must
        differ from ``basis`` and be a name h5ad files can store (no ``/``).
    dtype
        Working precision, ``numpy.float64`` or ``numpy.float32`` (half the memory, faster on
        GPUs; sums over cells are accumulated in float64 either way).
    flavor
        ``'harmony2'``: stabilized diversity penalty, ridge ``alpha * E`` and pruning of rare
        batch-cluster pairs (Patikas et al. 2026). ``'harmony1'``: the original penalty with a
        fixed ridge ``ridge_lambda`` (Korsunsky et al. 2019).
    n_clusters
        Number of soft clusters K. ``None``: ``min(100, n_cells / 30)``, at least 2, at most
        n_cells. More clusters correct more locally.
    max_iter_harmony
        Maximum outer rounds (clustering, then correction).
    max_iter_clustering
        Maximum clustering iterations per round.
    tol_harmony
        The rounds stop when the objective falls by less than this fraction of its value between
        two rounds. Smaller runs more rounds.
    tol_clustering
        Clustering in a round stops when the objective, summed over the last three iterations,
        falls by less than this fraction. Smaller runs more iterations.
    sigma
        Soft k-means temperature (on squared cosine distances, so unitless). Larger values give
        softer assignments, spreading each cell over more clusters.
    theta
        Diversity penalty weight (unitless): one number, one per key, or one per batch level.
        Larger values mix batches more strongly; 0 switches the penalty off for those levels.
    tau
        Discounts ``theta`` for batches with few cells: a batch with about ``K * tau`` cells
        keeps 63 % of its weight, a much smaller one almost none. 0 switches the discount off.
    ridge_lambda
        Ridge penalty of the correction, harmony1 only; larger values correct less.
    alpha
        harmony2's ridge is ``alpha`` times the expected batch-cluster counts; larger values
        correct less.
    batch_prune_threshold
        harmony2: a batch takes no part in a cluster's correction when less than this fraction
        of its cells is in the cluster. ``None`` switches pruning off.
    correction_method
        ``'original'``, ``'fast'``, ``'batched'``, or ``None`` to choose by memory. All give the
        same result up to rounding.
    colsum_algo
        Accepted so that calls written for rapids-singlecell keep working; it has no effect here
        (every sum is computed in a fixed order), and a warning says so when it is set.
    block_proportion
        Fraction of cells updated together in each block of the clustering step, in (0, 1].
    random_state
        Integer seed in ``[0, 2**32)``: the same input, parameters and seed on the same device
        give bitwise-identical output. ``None`` draws a seed, recorded in ``uns['harmony']``.
    verbose
        Print one line per round and the convergence outcome.
    device
        ``'auto'`` (the GPU when CuPy can use one, else the CPU, saying why in the log and in
        ``uns['harmony']['resolved']['device_reason']``), ``'gpu'`` or ``'cpu'``.
    n_gpus
        GPUs to spread the run over, for embeddings one GPU cannot hold or to finish sooner.
        1 (the default) runs in this process on one GPU. With more, this process drives the first
        GPU and starts one worker process per further GPU (on this machine); each holds a
        contiguous, equal share of the cells, and the small sums that couple the cells (cluster
        counts, centroid sums, the correction's systems) are added over GPUs through NCCL
        (CuPy's ``cupyx.distributed``; needs the NCCL library, for example
        ``pip install nvidia-nccl-cu12``). The result agrees with the one-GPU run to rounding
        (about 1e-12 relative in float64) and is the same on every rerun. Needs ``device='gpu'``
        or ``'auto'``; under Slurm's ``srun``, one task per GPU, rank 0 calls this function and
        the other tasks run ``python -m harmony_step._distributed.worker --slurm`` (the
        ``harmony-step run`` command does this by itself).

    Returns
    -------
    None
        Writes ``adata.obsm[adjusted_basis]``, an array of ``dtype`` with the shape of the basis
        in the basis's container (NumPy, DataFrame, CuPy or Dask), and ``adata.uns['harmony']``:
        the parameters used, the resolved settings, the objective of every iteration, software
        versions and the device. The seconds of each phase are logged (logger
        ``harmony_step.progress``), not stored, so the record is the same on every rerun. On any
        error ``adata`` is left as it was.

    Raises
    ------
    harmony_step.MissingBasisError
        ``basis`` is not in ``adata.obsm``; the message lists what exists. A ``KeyError`` and
        a ``ValueError``, so code written for scanpy or rapids-singlecell catches it.
    harmony_step.MissingColumnError
        A ``key`` is not a column of ``adata.obs``; the message lists what exists. A
        ``KeyError`` and a ``ValueError``.
    harmony_step.WrongTypeError
        A parameter of the wrong type, or a sparse, non-numeric or unreadable embedding. A
        ``TypeError`` and a ``ValueError``.
    ValueError
        A parameter out of range (for example ``sigma <= 0``, ``n_clusters`` above n_cells,
        ``random_state`` outside ``[0, 2**32)``, ``theta`` of a length that is neither 1, the
        number of keys nor the number of levels), ``adjusted_basis`` equal to ``basis`` or
        containing ``/``, an embedding that is not 2-D, has fewer than 2 cells, holds NaN or
        infinite values or values whose squares overflow ``dtype``, a key column with missing
        values, a key listed twice or a continuous float key, or an unknown ``colsum_algo``.
    harmony_step._backend.GPUUnavailableError
        ``device='gpu'`` and CuPy cannot use a GPU here, or ``n_gpus > 1`` and no GPU is usable.
    harmony_step.MultiGPUSetupError
        ``n_gpus`` is more than the GPUs visible here, or NCCL cannot be loaded; raised before
        any process is started.
    harmony_step.MultiGPUError
        A worker process died or failed during the run (the message names its rank, exit status
        and last error lines; the others are stopped, nothing hangs), or the processes did not
        all meet within the rendezvous timeout. ``adata`` is left as it was.

    Warns
    -----
    HarmonyConvergenceWarning
        The outer loop reached ``max_iter_harmony`` rounds without converging.
    ObjectiveRoseWarning
        The loop stopped as converged because the objective rose in the last round
        (``uns['harmony']['objective_rose_last_round']``); a ``HarmonyConvergenceWarning``.
    BatchKeyWarning
        A key has about one cell per level, so nearly every cell would be a batch of its own.
    HarmonyParameterWarning
        A parameter is set that the flavor ignores (``ridge_lambda`` with harmony2, ``alpha`` or
        ``batch_prune_threshold`` with harmony1), or ``colsum_algo`` is set.

    References
    ----------
    Korsunsky I, Millard N, Fan J, Slowikowski K, Zhang F, Wei K, Baglaenko Y, Brenner M, Loh P,
    Raychaudhuri S. Fast, sensitive and accurate integration of single-cell data with Harmony.
    Nat Methods 16, 1289-1296 (2019). doi:10.1038/s41592-019-0619-0

    Patikas N, et al. Harmony2 (2026), the stabilized penalty, dynamic ridge and pruning of the
    default flavor. bioRxiv preprint, doi:10.64898/2026.03.16.711825

    Examples
    --------
    >>> import anndata as ad
    >>> import numpy as np
    >>> import pandas as pd
    >>> from harmony_step import harmony_integrate
    >>> rng = np.random.default_rng(0)
    >>> obs = pd.DataFrame(
    ...     {"donor": rng.choice(["a", "b", "c"], 600), "chemistry": rng.choice(["v2", "v3"], 600)},
    ...     index=[f"cell{i}" for i in range(600)],
    ... )
    >>> adata = ad.AnnData(obs=obs, obsm={"X_pca": rng.normal(size=(600, 20))})
    >>> harmony_integrate(adata, "donor", device="cpu")
    >>> adata.obsm["X_pca_harmony"].shape
    (600, 20)
    >>> adata.uns["harmony"]["resolved"]["n_clusters"]
    20

    Two batch variables, one penalty weight each, in single precision:

    >>> harmony_integrate(adata, ["donor", "chemistry"], theta=[2.0, 1.0], dtype=np.float32)
    >>> adata.obsm["X_pca_harmony"].dtype
    dtype('float32')
    """
    if colsum_algo is not None:
        if colsum_algo not in _COLSUM_ALGOS:
            allowed = ", ".join(repr(a) for a in _COLSUM_ALGOS)
            raise ValueError(
                f"The 'colsum_algo' parameter must be one of {allowed} or None. "
                f"Got {colsum_algo!r} instead."
            )
        warnings.warn(
            f"colsum_algo={colsum_algo!r} has no effect in harmony-step: every sum is computed in "
            "a fixed order. Leave it out.",
            HarmonyParameterWarning,
            stacklevel=2,
        )
    values = {
        "basis": basis, "adjusted_basis": adjusted_basis, "dtype": dtype, "flavor": flavor,
        "n_clusters": n_clusters, "max_iter_harmony": max_iter_harmony,
        "max_iter_clustering": max_iter_clustering, "tol_harmony": tol_harmony,
        "tol_clustering": tol_clustering, "sigma": sigma, "theta": theta, "tau": tau,
        "ridge_lambda": ridge_lambda, "alpha": alpha,
        "batch_prune_threshold": batch_prune_threshold, "correction_method": correction_method,
        "block_proportion": block_proportion, "random_state": random_state, "verbose": verbose,
        "device": device, "n_gpus": n_gpus,
    }  # fmt: skip
    integrate(adata, key, HarmonyParams.resolve([("", values)], stacklevel=2))


# rapids-singlecell's names for its column-sum kernels; accepted and ignored.
_COLSUM_ALGOS = ("columns", "atomics", "gemm", "benchmark")
