"""The one integrate path shared by the Python API and the file step: AnnData in and out.

It checks the AnnData against already-checked parameters, hands arrays to the algorithm
(:func:`harmony_step._core.run_harmony`), and writes the corrected embedding and the run record
back. It moves data and does no arithmetic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from harmony_step._backend import select_backend
from harmony_step._batches import BatchDesign, encode_batches, normalize_keys
from harmony_step._core import run_harmony
from harmony_step._core.result import RoundRecord
from harmony_step._errors import MissingBasisError, WrongTypeError
from harmony_step._params import HarmonyParams, ObjectiveRoseWarning, warn_at_caller
from harmony_step._provenance import (
    build_provenance,
    log_timings,
    objective_rose_last_round,
    progress_log,
)

if TYPE_CHECKING:
    from anndata import AnnData


def integrate(
    adata: AnnData, key: str | list[str] | tuple[str, ...], params: HarmonyParams
) -> None:
    """Correct ``adata.obsm[params.basis]`` for the batches in ``key``; the body of
    :func:`harmony_step.harmony_integrate`, with the parameters already checked.

    Writes ``adata.obsm[params.adjusted_basis]``, in the container kind of the basis, and
    ``adata.uns['harmony']``, and logs the seconds of each phase; on any error, ``adata`` is left
    as it was. Raises and warns as :func:`harmony_step.harmony_integrate` documents.
    """
    embedding, design = _checked_inputs(adata, key, params)
    backend = select_backend(params.device)
    if backend.is_gpu or params.device == "cpu":  # a fall-back to the CPU has logged its own line
        progress_log.info(f"device: {backend.kind} ({backend.name}); {backend.reason}")
    if params.n_gpus > 1:
        # Imported only here: the one-GPU path starts no process and never imports NCCL.
        from harmony_step._distributed import run_sharded

        result = run_sharded(embedding, design, params, backend)
    else:
        result = run_harmony(embedding, design, params, backend)
    raw = adata.obsm[params.basis]
    adata.obsm[params.adjusted_basis] = _in_container_of(raw, result.embedding)
    adata.uns["harmony"] = build_provenance(result, design, params, backend)
    log_timings(result)
    if result.converged and objective_rose_last_round(result.rounds):
        # after the result is stored, so that warnings turned into errors do not discard it
        _warn_objective_rose(result.rounds)


def _checked_inputs(
    adata: AnnData, key: Any, params: HarmonyParams
) -> tuple[np.ndarray, BatchDesign]:
    """The embedding as stored and the batch design; raises on bad input.

    theta's length is checked against the design where it is expanded, at the start of the run.
    """
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        raise WrongTypeError(
            "The 'adata' parameter must be an AnnData object (or a view of one), with the "
            f"embedding in adata.obsm. Got {type(adata).__name__}: read an h5ad file with "
            "anndata.read_h5ad, or wrap an array with anndata.AnnData(obsm={'X_pca': array})."
        )
    keys = normalize_keys(key)
    if params.basis not in adata.obsm:
        raise MissingBasisError(
            f"Basis {params.basis!r} is not in adata.obsm. Available keys: {list(adata.obsm.keys())}. "
            "Run PCA first or pass basis=<key>."
        )
    embedding = _embedding_array(adata.obsm[params.basis], params)
    design = encode_batches(adata.obs, keys)
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


def _warn_objective_rose(rounds: list[RoundRecord]) -> None:
    before, last = rounds[-2].objective.total, rounds[-1].objective.total
    warn_at_caller(
        f"Harmony stopped as converged after {len(rounds) - 1} round(s) because the objective "
        f"rose in the last round ({before:.6g} -> {last:.6g}), not because it settled (the "
        "stopping rule of R harmony and rapids-singlecell). The result may not be settled: "
        "check uns['harmony']['rounds'], or try another random_state or more "
        "max_iter_clustering.",
        ObjectiveRoseWarning,
    )
