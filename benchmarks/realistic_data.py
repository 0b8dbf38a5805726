"""Realistic synthetic single-cell embeddings for benchmarks: many unequal batches, cell types with
batch-specific composition, and type-specific batch effects.

The model (``d`` dimensions, ``B`` batches, ``T`` cell types in ``L`` lineages; defaults 50, 64,
30 and 10; ``sd_j = 8 j^-0.6`` for dimension ``j = 1..d``, the spread of a PCA spectrum):

* Biology. Lineage centres ``m_l ~ N(0, (0.75 sd)^2)`` per dimension; type ``t`` belongs to
  lineage ``t // (T / L)`` and sits close to it, ``c_t = m_l + N(0, (0.35 sd)^2)``. A cell of type
  ``t`` is ``c_t + 0.3 sd * e + u * a_t`` with ``e ~ N(0, I)`` and ``u ~ N(0, 1)``: an anisotropic
  cloud (per-dimension spread ``0.3 sd_j``) elongated along the type's own direction
  ``a_t = 0.3 sd * N(0, I)`` (about three times the cloud's spread along that direction).
* Batches. Batch shares are ``f + (1 - B f) * Dirichlet(4)`` with the floor ``f`` =
  ``min_batch_fraction`` (default 0.2 %, so every batch holds at least that share; 64 batches of
  at least 2 % each would need 128 % of the cells). Each batch has its own cell-type composition,
  ``Dirichlet(1.5)`` over the types present in it; a share ``absent_fraction`` (15 %) of the
  (batch, type) pairs is absent, drawn at random such that every type occurs in at least two
  batches. Cell counts per (batch, type) pair are exact (largest remainder of ``n_cells`` times
  the pair's probability), with at least one cell in every present pair.
* Batch effect. The cell of type ``t`` from batch ``b`` is observed as
  ``x = s_b * biology + g_b + h_bt``: a per-batch shift ``g_b ~ N(0, (0.4 sd)^2)``, a smaller
  per-batch per-type shift ``h_bt ~ N(0, (0.15 sd)^2)`` and a per-batch per-dimension scale
  ``s_bj ~ Uniform(0.92, 1.08)`` (1 +- 8 %).
* Scale. Finally every dimension is centred and rescaled (one factor per dimension, applied to
  everything above) so that over the whole mixture its mean is 0 and its spread is exactly
  ``sd_j`` in expectation.
* Order. Cells are interleaved across batches and types: each chunk of rows draws its
  (batch, type) counts from what remains (multivariate hypergeometric) and shuffles them.

The embedding is float32 and is generated in chunks of :data:`CHUNK_ROWS` rows, in parallel
threads, each chunk from its own random stream (seed, chunk index): the output depends only on the
seed and ``n_cells``, not on the number of threads, and no temporary is larger than one chunk.
100 million cells x 50 take 20 GB for the embedding plus 200 MB for the codes.

    from realistic_data import generate
    data = generate(1_000_000, seed=0)
    data.embedding, data.batch, data.cell_type     # (n, 50) float32, (n,) int8, (n,) int8
    adata = data.to_anndata()                      # obsm["X_pca"], obs["batch"], obs["cell_type"]

    python benchmarks/realistic_data.py --cells 20000        # prints the model's properties
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

CHUNK_ROWS = 1 << 18
"""Rows per generated chunk (and per random stream)."""


@dataclasses.dataclass(frozen=True)
class Model:
    """The drawn parameters of the data model (everything except the cells themselves).

    A cell of pair ``p = b * T + t`` (batch ``b``, type ``t``) is
    ``pair_offset[p] + e * pair_scale[p] + u * pair_along[p]`` with ``e ~ N(0, I)``, ``u ~ N(0, 1)``:
    the module's model with the batch scale, the per-dimension normalisation and the centring
    folded into per-pair rows.
    """

    seed: int
    sd: np.ndarray  # (d,) per-dimension spread sd_j = 8 j^-0.6
    lineage: np.ndarray  # (T,) lineage of each type
    batch_share: np.ndarray  # (B,) float64, sums to 1
    present: np.ndarray  # (B, T) bool, (batch, type) pairs that occur
    composition: np.ndarray  # (B, T) float64, type shares per batch (0 where absent)
    pair_offset: np.ndarray  # (B * T, d) float32
    pair_scale: np.ndarray  # (B * T, d) float32
    pair_along: np.ndarray  # (B * T, d) float32

    @property
    def n_batches(self) -> int:
        return self.present.shape[0]

    @property
    def n_types(self) -> int:
        return self.present.shape[1]

    @property
    def n_dims(self) -> int:
        return self.sd.shape[0]

    def pair_counts(self, n_cells: int) -> np.ndarray:
        """(B, T) exact cell counts: at least one per present pair, the rest by largest remainder."""
        probability = self.batch_share[:, None] * self.composition
        present = self.present.ravel()
        base = present.astype(np.int64) if n_cells >= present.sum() else np.zeros(present.size, int)
        rest = n_cells - int(base.sum())
        target = rest * probability.ravel()
        counts = np.floor(target).astype(np.int64)
        short = rest - int(counts.sum())
        order = np.argsort(-(target - counts), kind="stable")
        counts[order[:short]] += 1
        return (base + counts).reshape(self.present.shape)


def make_model(
    seed: int = 0,
    *,
    n_dims: int = 50,
    n_batches: int = 64,
    n_types: int = 30,
    n_lineages: int = 10,
    min_batch_fraction: float = 0.002,
    absent_fraction: float = 0.15,
) -> Model:
    """Draw the model's parameters (see the module docstring) from ``seed``."""
    if n_types % n_lineages or n_batches * min_batch_fraction >= 1 or n_batches < 2:
        raise ValueError("need n_types divisible by n_lineages, n_batches * min_batch_fraction < 1")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    sd = 8.0 * np.arange(1, n_dims + 1) ** -0.6
    lineage = np.arange(n_types) // (n_types // n_lineages)
    lineage_centre = 0.75 * sd * rng.standard_normal((n_lineages, n_dims))
    type_centre = lineage_centre[lineage] + 0.35 * sd * rng.standard_normal((n_types, n_dims))
    elongation = 0.3 * sd * rng.standard_normal((n_types, n_dims))

    share = rng.dirichlet(np.full(n_batches, 4.0))
    share = min_batch_fraction + (1 - n_batches * min_batch_fraction) * share

    present = np.ones((n_batches, n_types), dtype=bool)
    target = round(absent_fraction * n_batches * n_types)
    removed = 0
    for pair in rng.permutation(n_batches * n_types):
        if removed == target:
            break
        b, t = divmod(int(pair), n_types)
        if present[:, t].sum() > 2 and present[b].sum() > 1:
            present[b, t] = False
            removed += 1
    composition = np.where(present, rng.gamma(1.5, size=present.shape), 0.0)
    composition /= composition.sum(axis=1, keepdims=True)

    batch_scale = rng.uniform(0.92, 1.08, size=(n_batches, 1, n_dims))
    batch_shift = 0.4 * sd * rng.standard_normal((n_batches, 1, n_dims))
    type_shift = 0.15 * sd * rng.standard_normal((n_batches, n_types, n_dims))
    within = 0.3 * sd

    # Per pair: mean s_b c_t + g_b + h_bt, spread s_b within (isotropic) and s_b a_t (long axis).
    mean = batch_scale * type_centre + batch_shift + type_shift
    scale = np.broadcast_to(batch_scale * within, mean.shape)
    along = batch_scale * elongation
    # Normalise: centre the mixture and give dimension j the expected spread sd_j exactly.
    weight = (share[:, None] * composition)[..., None]
    centre = (weight * mean).sum(axis=(0, 1))
    variance = (weight * (scale**2 + along**2 + (mean - centre) ** 2)).sum(axis=(0, 1))
    factor = sd / np.sqrt(variance)
    pairs = (n_batches * n_types, n_dims)
    f32 = np.float32
    return Model(
        seed=seed,
        sd=sd,
        lineage=lineage,
        batch_share=share,
        present=present,
        composition=composition,
        pair_offset=((mean - centre) * factor).reshape(pairs).astype(f32),
        pair_scale=(scale * factor).reshape(pairs).astype(f32),
        pair_along=(along * factor).reshape(pairs).astype(f32),
    )


@dataclasses.dataclass(frozen=True)
class RealisticData:
    """Generated cells: embedding (n, d) float32, batch and cell-type codes (n,) int8."""

    embedding: np.ndarray
    batch: np.ndarray
    cell_type: np.ndarray
    model: Model

    @property
    def n_cells(self) -> int:
        return self.embedding.shape[0]

    def batch_names(self) -> list[str]:
        return [f"batch{i:02d}" for i in range(self.model.n_batches)]

    def type_names(self) -> list[str]:
        return [f"type{t:02d}_lin{self.model.lineage[t]}" for t in range(self.model.n_types)]

    def to_anndata(
        self, basis: str = "X_pca", batch_key: str = "batch", label_key: str = "cell_type"
    ):
        """AnnData with ``obsm[basis]`` (the embedding, not copied) and categorical obs columns."""
        import anndata as ad
        import pandas as pd

        obs = pd.DataFrame(
            {
                batch_key: pd.Categorical.from_codes(self.batch, self.batch_names()),
                label_key: pd.Categorical.from_codes(self.cell_type, self.type_names()),
            },
            index=pd.RangeIndex(self.n_cells).astype(str),
        )
        return ad.AnnData(obs=obs, obsm={basis: self.embedding})


def _chunk_counts(model: Model, n_cells: int, chunk_rows: int) -> np.ndarray:
    """(n_chunks, B * T) pair counts per chunk, drawn without replacement from the exact totals."""
    rng = np.random.default_rng(np.random.SeedSequence([model.seed, 1]))
    remaining = model.pair_counts(n_cells).ravel()
    n_chunks = -(-n_cells // chunk_rows)
    counts = np.empty((n_chunks, remaining.size), dtype=np.int64)
    for i in range(n_chunks):
        rows = min(chunk_rows, n_cells - i * chunk_rows)
        if i == n_chunks - 1:
            counts[i] = remaining
        else:
            counts[i] = rng.multivariate_hypergeometric(remaining, rows, method="marginals")
        remaining = remaining - counts[i]
    return counts


def _fill_chunk(model: Model, index: int, start: int, counts: np.ndarray, data: RealisticData):
    rng = np.random.default_rng(np.random.SeedSequence([model.seed, 2, index]))
    pair = np.repeat(np.arange(counts.size, dtype=np.int16), counts)
    rng.shuffle(pair)
    stop = start + pair.size
    batch, cell_type = np.divmod(pair, np.int16(model.n_types))
    data.batch[start:stop] = batch
    data.cell_type[start:stop] = cell_type
    out = data.embedding[start:stop]
    rng.standard_normal(dtype=np.float32, out=out)
    buffer = np.take(model.pair_scale, pair, axis=0)
    out *= buffer
    along = rng.standard_normal(pair.size, dtype=np.float32)
    np.take(model.pair_along, pair, axis=0, out=buffer)
    buffer *= along[:, None]
    out += buffer
    np.take(model.pair_offset, pair, axis=0, out=buffer)
    out += buffer


def generate(
    n_cells: int,
    seed: int = 0,
    *,
    model: Model | None = None,
    n_threads: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> RealisticData:
    """``n_cells`` cells of the model drawn from ``seed`` (or of ``model``); deterministic for a seed."""
    model = make_model(seed) if model is None else model
    counts = _chunk_counts(model, n_cells, chunk_rows)
    data = RealisticData(
        embedding=np.empty((n_cells, model.n_dims), dtype=np.float32),
        batch=np.empty(n_cells, dtype=np.int8),
        cell_type=np.empty(n_cells, dtype=np.int8),
        model=model,
    )
    threads = n_threads or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        jobs = [
            pool.submit(_fill_chunk, model, i, i * chunk_rows, counts[i], data)
            for i in range(counts.shape[0])
        ]
        for job in jobs:
            job.result()
    return data


def describe(data: RealisticData) -> dict:
    """The realised properties of the data, to check against the model."""
    model = data.model
    n_b, n_t = model.n_batches, model.n_types
    pairs = np.bincount(
        data.batch.astype(np.int64) * n_t + data.cell_type, minlength=n_b * n_t
    ).reshape(n_b, n_t)
    share = pairs.sum(axis=1) / data.n_cells
    occupied = pairs > 0
    rows = data.embedding[: min(data.n_cells, 200_000)].astype(np.float64)
    spread = rows.std(axis=0)
    head = data.batch[: min(data.n_cells, 200_001)]
    transitions = np.mean(head[1:] != head[:-1])
    return {
        "cells": data.n_cells,
        "dims": model.n_dims,
        "batches": n_b,
        "types": n_t,
        "batch_share_min": float(share.min()),
        "batch_share_max": float(share.max()),
        "batch_share_sum": float(share.sum()),
        "absent_pair_fraction": float(1 - occupied.mean()),
        "absent_pair_fraction_model": float(1 - model.present.mean()),
        "min_batches_per_type": int(occupied.sum(axis=0).min()),
        "types_per_batch_min_median_max": [
            int(np.min(occupied.sum(1))),
            float(np.median(occupied.sum(1))),
            int(np.max(occupied.sum(1))),
        ],
        "type_share_min_max": [
            float(pairs.sum(0).min() / data.n_cells),
            float(pairs.sum(0).max() / data.n_cells),
        ],
        "sd_first_dims": [round(float(v), 3) for v in spread[:5]],
        "sd_model_first_dims": [round(float(v), 3) for v in model.sd[:5]],
        "sd_ratio_to_model_min_max": [
            float((spread / model.sd).min()),
            float((spread / model.sd).max()),
        ],
        "neighbour_rows_in_other_batch": float(transitions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[20_000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    for n_cells in args.cells:
        start = time.perf_counter()
        data = generate(n_cells, args.seed, n_threads=args.threads)
        seconds = time.perf_counter() - start
        print(json.dumps({"generate_seconds": round(seconds, 3), **describe(data)}), flush=True)


if __name__ == "__main__":
    main()
