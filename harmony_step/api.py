"""``harmony_integrate``: AnnData in and out. Validation and data movement only, no arithmetic."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from harmony_step._backend import select_backend
from harmony_step._batches import BatchDesign, encode_batches, normalize_keys
from harmony_step._core import run_harmony
from harmony_step._core.setup import expand_theta
from harmony_step._errors import MissingBasisError, WrongTypeError
from harmony_step._params import HarmonyParams, ObjectiveRoseWarning
from harmony_step._provenance import build_provenance, objective_rose_last_round

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
        Annotated data with the embedding in ``adata.obsm[basis]``, shape (n_cells, n_pcs): a
        NumPy array (any memory order, float or integer), a DataFrame, a CuPy array or a Dask
        array; a view of an AnnData works too (it becomes an actual AnnData, as in anndata).
    key
        One ``obs`` column or a list of them; each column is its own batch variable.
    basis
        ``obsm`` key of the embedding to correct (never modified).
    adjusted_basis
        ``obsm`` key the corrected embedding is written to; must differ from ``basis`` and be a
        valid h5ad name (no ``/``).
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
        Integer seed in ``[0, 2**32)``: the same input, parameters and seed on the same device give
        bitwise-identical output. ``None`` draws a seed (recorded in ``uns['harmony']``).
    verbose
        Print one line per round and the convergence outcome.
    device
        ``'auto'`` (GPU when CuPy can use one, else CPU, saying why in the log and in
        ``uns['harmony']['resolved']['device_reason']``), ``'gpu'`` or ``'cpu'``.

    Returns
    -------
    None. Writes ``adata.obsm[adjusted_basis]`` (an array of ``dtype``, same shape as the basis, in
    the basis's container: NumPy, DataFrame, CuPy or Dask) and ``adata.uns['harmony']``
    (parameters used, convergence history, timings, versions).

    Raises
    ------
    MissingBasisError
        ``basis`` is not in ``adata.obsm`` (a ``KeyError`` and a ``ValueError``).
    MissingColumnError
        A key is not in ``adata.obs`` (a ``KeyError`` and a ``ValueError``).
    WrongTypeError
        A parameter or the embedding has the wrong type (a ``TypeError`` and a ``ValueError``).
    ValueError
        Any other bad value, named in the message.

    Warns
    -----
    HarmonyConvergenceWarning
        The outer loop reached ``max_iter_harmony`` rounds without converging.
    ObjectiveRoseWarning
        The loop stopped as converged because the objective rose in the last round
        (``uns['harmony']['objective_rose_last_round']``).
    BatchKeyWarning
        A key has about one cell per level.
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
    raw = adata.obsm[params.basis]
    adata.obsm[params.adjusted_basis] = _in_container_of(raw, result.embedding)
    adata.uns["harmony"] = build_provenance(result, design, params, backend)
    if result.converged and objective_rose_last_round(result.rounds):
        # after the result is stored, so that warnings turned into errors do not discard it
        _warn_objective_rose(result.rounds)


def _checked_inputs(
    adata: AnnData, key: Any, params: HarmonyParams
) -> tuple[np.ndarray, BatchDesign]:
    """The embedding as a C-contiguous array of the working dtype, and the batch design; raises on bad input."""
    keys = normalize_keys(key)
    if params.basis not in adata.obsm:
        raise MissingBasisError(
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
    """The embedding as a C-contiguous host array (shape and kind checked); finiteness, range and
    the dtype cast are checked on the device by the core, where they are cheap for large inputs.

    Accepts NumPy arrays of any memory order (anndata's ArrayView of a view included), DataFrames,
    CuPy arrays, Dask arrays and anything else NumPy can read; sparse matrices are refused.
    """
    name = f"adata.obsm[{params.basis!r}]"
    if _is_sparse(raw):
        raise WrongTypeError(
            f"{name} is a sparse matrix ({type(raw).__name__}); Harmony needs a dense embedding. "
            f"Convert it with adata.obsm[{params.basis!r}] = adata.obsm[{params.basis!r}].toarray()."
        )
    if _module_of(raw) == "dask":
        raw = raw.compute()
    if hasattr(raw, "to_numpy"):  # DataFrame
        raw = raw.to_numpy()
    if _module_of(raw) == "cupy":
        raw = raw.get()
    try:
        array = np.asarray(raw)
    except (TypeError, ValueError) as err:
        raise WrongTypeError(
            f"{name} of type {type(raw).__name__} cannot be read as an array ({err})."
        ) from err
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_cells, n_pcs). Got shape {array.shape}.")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise WrongTypeError(f"{name} must be numeric. Got dtype {array.dtype}.")
    if array.shape[0] < 2:
        raise ValueError(f"{name} has {array.shape[0]} cell(s); Harmony needs at least 2.")
    if array.shape[1] < 1:
        raise ValueError(f"{name} has no columns; Harmony needs at least one dimension.")
    return np.ascontiguousarray(array)


def _module_of(value: Any) -> str:
    """The top-level package of ``value``'s type: 'numpy', 'cupy', 'dask', 'pandas', ..."""
    return type(value).__module__.partition(".")[0]


def _is_sparse(value: Any) -> bool:
    """SciPy and CuPy sparse matrices and arrays, and anndata's backed sparse datasets.

    anndata's ArrayView (the obsm entry of a view) is a dense ndarray even though it has a
    ``toarray`` method, so that method alone says nothing.
    """
    if isinstance(value, np.ndarray):
        return False
    import scipy.sparse

    if scipy.sparse.issparse(value):
        return True
    module = type(value).__module__
    return ("sparse" in module) or type(value).__name__ in ("CSRDataset", "CSCDataset")


def _in_container_of(raw: Any, corrected: np.ndarray) -> Any:
    """The corrected embedding in the container kind of the input: CuPy, Dask, DataFrame, NumPy."""
    module = _module_of(raw)
    if module == "cupy":
        import cupy

        return cupy.asarray(corrected)
    if module == "dask":
        import dask.array

        return dask.array.from_array(corrected, chunks=(raw.chunks[0], corrected.shape[1]))
    import pandas as pd

    if isinstance(raw, pd.DataFrame):  # anndata's DataFrameView included
        return pd.DataFrame(corrected, index=raw.index, columns=raw.columns)
    return corrected


def _warn_objective_rose(rounds: Any) -> None:
    before, last = rounds[-2].objective.total, rounds[-1].objective.total
    warnings.warn(
        f"Harmony stopped as converged after {len(rounds) - 1} round(s) because the objective "
        f"rose in the last round ({before:.6g} -> {last:.6g}), not because it settled (the "
        "stopping rule of R harmony and rapids-singlecell). The result may not be settled: "
        "check uns['harmony']['rounds'], or try another random_state or more "
        "max_iter_clustering.",
        ObjectiveRoseWarning,
        stacklevel=3,
    )
