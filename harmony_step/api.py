"""``harmony_integrate``: AnnData in and out. Validation and data movement only, no arithmetic."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from harmony_step._backend import select_backend
from harmony_step._batches import BatchDesign, encode_batches, normalize_keys
from harmony_step._core import run_harmony
from harmony_step._core.setup import expand_theta
from harmony_step._params import HarmonyParams
from harmony_step._provenance import build_provenance, log_timings

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
) -> None:
    """Remove batch effects from an embedding with Harmony (Korsunsky et al. 2019).

    Parameters
    ----------
    adata
        Annotated data with the embedding in ``adata.obsm[basis]``, shape (n_cells, n_pcs).
    key
        One ``obs`` column or a list of them; each column is its own batch variable.
    basis
        ``obsm`` key of the embedding to correct (never modified).
    adjusted_basis
        ``obsm`` key the corrected embedding is written to.
    dtype
        Working precision, ``numpy.float64`` or ``numpy.float32`` (half the memory, faster on GPUs).
    flavor
        ``'harmony2'``: stabilized diversity penalty, ridge ``alpha * E`` and pruning of rare
        batch-cluster pairs. ``'harmony1'``: the original penalty with a fixed ridge.
    n_clusters
        Number of soft clusters K. Default ``min(100, N / 30)``, at least 2, at most N.
    max_iter_harmony
        Maximum outer rounds (clustering, then correction).
    max_iter_clustering
        Maximum clustering iterations per round.
    tol_harmony
        Outer loop stops when the objective falls by less than this fraction between rounds.
    tol_clustering
        Clustering stops when the windowed objective falls by less than this fraction.
    sigma
        Soft k-means temperature; larger values give softer assignments.
    theta
        Diversity penalty weight: one number, one per key, or one per batch level. Larger values
        mix batches more strongly; 0 switches the penalty off for those levels.
    tau
        Discount of ``theta`` for batches with few cells (expected cells per cluster); 0 = off.
    ridge_lambda
        Ridge penalty of the correction, harmony1 only; larger values correct less.
    alpha
        harmony2's ridge is ``alpha`` times the expected batch-cluster counts.
    batch_prune_threshold
        harmony2: a batch takes no part in a cluster's correction when less than this fraction of
        its cells is in the cluster. ``None`` switches pruning off.
    correction_method
        ``'original'``, ``'fast'``, ``'batched'``, or ``None`` to choose by memory. All give the
        same result up to rounding.
    colsum_algo
        Accepted for compatibility with rapids-singlecell; every sum here is computed in a fixed
        order, so it does not change results.
    block_proportion
        Fraction of cells updated together in each block of the clustering step.
    random_state
        Integer seed: the same input, parameters and seed on the same device give bitwise-identical
        output. ``None`` draws a seed (recorded in ``uns['harmony']``).
    verbose
        Print one line per round and the convergence outcome.
    device
        ``'auto'`` (GPU when CuPy can use one, else CPU), ``'gpu'`` or ``'cpu'``.

    Returns
    -------
    None. Writes ``adata.obsm[adjusted_basis]`` (NumPy array of ``dtype``, same shape as the basis)
    and ``adata.uns['harmony']`` (parameters used, convergence history, versions). The seconds of each phase are logged
    (logger ``harmony_step.progress``), not stored, so the record is the same on every rerun.

    Warns
    -----
    HarmonyConvergenceWarning
        The outer loop reached ``max_iter_harmony`` rounds without converging.
    """
    params = HarmonyParams.create(
        basis=basis, adjusted_basis=adjusted_basis, dtype=dtype, flavor=flavor,
        n_clusters=n_clusters, max_iter_harmony=max_iter_harmony,
        max_iter_clustering=max_iter_clustering, tol_harmony=tol_harmony,
        tol_clustering=tol_clustering, sigma=sigma, theta=theta, tau=tau,
        ridge_lambda=ridge_lambda, alpha=alpha, batch_prune_threshold=batch_prune_threshold,
        correction_method=correction_method, colsum_algo=colsum_algo,
        block_proportion=block_proportion, random_state=random_state, verbose=verbose,
        device=device,
    )  # fmt: skip
    embedding, design = _checked_inputs(adata, key, params)
    backend = select_backend(params.device)
    result = run_harmony(embedding, design, params, backend)
    adata.obsm[params.adjusted_basis] = result.embedding
    adata.uns["harmony"] = build_provenance(result, design, params, backend)
    log_timings(result)


def _checked_inputs(
    adata: AnnData, key: Any, params: HarmonyParams
) -> tuple[np.ndarray, BatchDesign]:
    """The embedding as a C-contiguous array of the working dtype, and the batch design; raises on bad input."""
    keys = normalize_keys(key)
    if params.basis not in adata.obsm:
        raise KeyError(
            f"Basis {params.basis!r} is not in adata.obsm. Available keys: {list(adata.obsm.keys())}. "
            "Run PCA first or pass basis=<key>."
        )
    embedding = _embedding_array(adata.obsm[params.basis], params)
    design = encode_batches(adata.obs, keys)
    expand_theta(params.theta, design)  # raises on a wrong length
    if params.n_clusters is not None and params.n_clusters > embedding.shape[0]:
        raise ValueError(
            f"The 'n_clusters' parameter must be in [1, n_cells={embedding.shape[0]}]. "
            f"Got {params.n_clusters} instead."
        )
    return embedding, design


def _embedding_array(raw: Any, params: HarmonyParams) -> np.ndarray:
    """The embedding as stored (shape and kind checked); finiteness and the dtype cast are checked
    on the device by the core, where they are cheap for large inputs."""
    if hasattr(raw, "toarray") or hasattr(raw, "tocsr"):
        raise TypeError(f"adata.obsm[{params.basis!r}] is sparse; Harmony needs a dense embedding.")
    if hasattr(raw, "to_numpy"):
        raw = raw.to_numpy()
    if hasattr(raw, "get") and not isinstance(raw, np.ndarray):
        raw = raw.get()  # a CuPy array
    array = np.asarray(raw)
    name = f"adata.obsm[{params.basis!r}]"
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_cells, n_pcs). Got shape {array.shape}.")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name} must be numeric. Got dtype {array.dtype}.")
    if array.shape[0] < 2:
        raise ValueError(f"{name} has {array.shape[0]} cell(s); Harmony needs at least 2.")
    if array.shape[1] < 1:
        raise ValueError(f"{name} has no columns; Harmony needs at least one dimension.")
    return np.ascontiguousarray(array)
