"""Batch encoding: obs columns -> per-cell level codes (one column per batch key)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd


@dataclasses.dataclass(frozen=True)
class BatchDesign:
    """Stacked one-hot design of all batch keys, stored as codes.

    ``codes[i, c]`` is the global level index of cell i for key c: key c's levels occupy
    ``offsets[c] .. offsets[c] + n_levels[c] - 1``. Unused categories stay as empty levels.
    """

    keys: tuple[str, ...]
    codes: np.ndarray  # (n_cells, n_keys) int32
    n_levels: tuple[int, ...]
    level_names: tuple[tuple[str, ...], ...]

    @property
    def n_keys(self) -> int:
        return len(self.keys)

    @property
    def n_levels_total(self) -> int:
        return int(sum(self.n_levels))

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(v) for v in np.concatenate([[0], np.cumsum(self.n_levels)[:-1]]))

    def level_counts(self) -> np.ndarray:
        """N_b, cells per level, shape (n_levels_total,)."""
        return np.bincount(self.codes.ravel(), minlength=self.n_levels_total).astype(np.int64)

    def joint_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """Observed level combinations: per-cell combination index and the (n_combinations, n_keys) table."""
        table, joint = np.unique(self.codes, axis=0, return_inverse=True)
        return joint.reshape(-1).astype(np.int64), table


def normalize_keys(key: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The batch keys as a tuple of column names; an empty list is an error."""
    keys = (key,) if isinstance(key, str) else tuple(key)
    if not keys:
        raise ValueError(
            "The 'key' parameter must name at least one obs column. Got an empty list."
        )
    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"The 'key' parameter must be a str or a list of str. Got {k!r}.")
    return keys


def encode_batches(obs: pd.DataFrame, keys: tuple[str, ...]) -> BatchDesign:
    """Encode each key column on its own (per covariate), keeping unused categories as levels.

    Raises
    ------
    KeyError
        A key is not a column of ``obs``.
    ValueError
        A key column has missing values.
    """
    codes, n_levels, names = [], [], []
    offset = 0
    for key in keys:
        if key not in obs.columns:
            raise KeyError(
                f"Batch key {key!r} is not a column of adata.obs. Available columns: {list(obs.columns)}."
            )
        column = obs[key]
        if column.isna().any():
            raise ValueError(
                f"Batch key {key!r} has {int(column.isna().sum())} missing value(s). "
                "Fill or drop those cells before running Harmony."
            )
        categorical = (
            column if isinstance(column.dtype, pd.CategoricalDtype) else column.astype("category")
        )
        cats = categorical.cat.categories
        codes.append(categorical.cat.codes.to_numpy().astype(np.int32) + offset)
        n_levels.append(len(cats))
        names.append(tuple(str(c) for c in cats))
        offset += len(cats)
    return BatchDesign(
        keys=keys,
        codes=np.ascontiguousarray(np.stack(codes, axis=1)),
        n_levels=tuple(n_levels),
        level_names=tuple(names),
    )
