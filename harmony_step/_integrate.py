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
from harmony_step._params import HarmonyParams
from harmony_step._provenance import build_provenance, log_timings

if TYPE_CHECKING:
    from anndata import AnnData


def integrate(
    adata: AnnData, key: str | list[str] | tuple[str, ...], params: HarmonyParams
) -> None:
    """Correct ``adata.obsm[params.basis]`` for the batches in ``key``; the body of
    :func:`harmony_step.harmony_integrate`, with the parameters already checked.

    Writes ``adata.obsm[params.adjusted_basis]`` and ``adata.uns['harmony']`` and logs the seconds
    of each phase; on any error, ``adata`` is left as it was. Raises what :func:`harmony_step.harmony_integrate` documents.
    """
    embedding, design = _checked_inputs(adata, key, params)
    backend = select_backend(params.device)
    result = run_harmony(embedding, design, params, backend)
    adata.obsm[params.adjusted_basis] = result.embedding
    adata.uns["harmony"] = build_provenance(result, design, params, backend)
    log_timings(result)


def _checked_inputs(
    adata: AnnData, key: Any, params: HarmonyParams
) -> tuple[np.ndarray, BatchDesign]:
    """The embedding as stored and the batch design; raises on bad input.

    theta's length is checked against the design where it is expanded, at the start of the run.
    """
    keys = normalize_keys(key)
    if params.basis not in adata.obsm:
        raise KeyError(
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
