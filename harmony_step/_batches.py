"""Batch encoding: obs columns -> per-cell level codes (one column per batch key)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from harmony_step._errors import BatchKeyWarning, MissingColumnError, WrongTypeError
from harmony_step._params import warn_at_caller

# A key with fewer cells per used level than this, and at least MANY_LEVELS levels, is flagged:
# Harmony would treat almost every cell as a batch of its own.
FEW_CELLS_PER_LEVEL = 2
MANY_LEVELS = 10


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
    """The batch keys as a tuple of column names; an empty list or a repeated name is an error."""
    if isinstance(key, str):
        keys: tuple[str, ...] = (key,)
    elif isinstance(key, Iterable) and not isinstance(key, (bytes, Mapping)):
        keys = tuple(key)
    else:
        raise WrongTypeError(
            "The 'key' parameter must be the name of an obs column (a str) or a list of names. "
            f"Got {key!r} ({type(key).__name__})."
        )
    if not keys:
        raise ValueError(
            "The 'key' parameter must name at least one obs column. Got an empty list."
        )
    for k in keys:
        if not isinstance(k, str):
            raise WrongTypeError(
                "The 'key' parameter must be the name of an obs column (a str) or a list of "
                f"names. Got {k!r} ({type(k).__name__}) in the list."
            )
    repeated = [k for k, n in Counter(keys).items() if n > 1]
    if repeated:
        raise ValueError(
            f"Batch key(s) {repeated} are listed more than once; each listing adds its own penalty "
            "and correction, which changes the result rather than strengthening it. List each key "
            "once; to weight a key more, raise its theta."
        )
    return keys


def encode_batches(obs: pd.DataFrame, keys: tuple[str, ...]) -> BatchDesign:
    """Encode each key column on its own (per covariate), keeping unused categories as levels.

    Raises
    ------
    MissingColumnError
        A key is not a column of ``obs`` (a ``KeyError`` and a ``ValueError``).
    ValueError
        A key column has missing values, or is a float column with fractional values.

    Warns
    -----
    BatchKeyWarning
        A key has fewer than two cells per level on average (and at least ten levels).
    """
    codes, n_levels, names = [], [], []
    offset = 0
    for key in keys:
        if key not in obs.columns:
            raise MissingColumnError(
                f"Batch key {key!r} is not a column of adata.obs. Available columns: {list(obs.columns)}."
            )
        column = obs[key]
        if column.isna().any():
            raise ValueError(
                f"Batch key {key!r} has {int(column.isna().sum())} missing value(s). "
                "Fill or drop those cells before running Harmony."
            )
        _refuse_continuous(key, column)
        categorical = (
            column if isinstance(column.dtype, pd.CategoricalDtype) else column.astype("category")
        )
        cats = categorical.cat.categories
        codes.append(categorical.cat.codes.to_numpy().astype(np.int32) + offset)
        n_levels.append(len(cats))
        names.append(tuple(str(c) for c in cats))
        offset += len(cats)
        _warn_one_cell_per_level(key, codes[-1], len(obs))
    return BatchDesign(
        keys=keys,
        codes=np.ascontiguousarray(np.stack(codes, axis=1)),
        n_levels=tuple(n_levels),
        level_names=tuple(names),
    )


def _refuse_continuous(key: str, column: pd.Series) -> None:
    """A float column with fractional values (a QC metric, a score) is not a batch label."""
    if isinstance(column.dtype, pd.CategoricalDtype) or column.dtype.kind != "f":
        return
    values = column.to_numpy(dtype=np.float64)
    if np.all(values == np.round(values)):
        return  # batch numbers stored as floats, e.g. 1.0, 2.0
    n_values = len(np.unique(values))
    raise ValueError(
        f"Batch key {key!r} is a continuous float column ({n_values} distinct values in "
        f"{len(values)} cells), not a batch label. Harmony would make each value a batch of its "
        "own, with its own correction in every cluster: many times the time and memory, and "
        "per-cell variation removed instead of batch effects. Pass the batch column; if this "
        "column really holds batch labels, convert it to categorical first "
        f"(adata.obs[{key!r}] = adata.obs[{key!r}].astype('category'))."
    )


def _warn_one_cell_per_level(key: str, codes: np.ndarray, n_cells: int) -> None:
    """Warn when almost every cell is a batch of its own (cell names, well IDs, rounded QC values)."""
    used = len(np.unique(codes))
    if used < MANY_LEVELS or n_cells >= FEW_CELLS_PER_LEVEL * used:
        return
    warn_at_caller(
        f"Batch key {key!r} has {used} levels for {n_cells} cells (about "
        f"{n_cells / used:.1f} cells per level), so nearly every cell is a batch of its own. "
        "Each level gets its own correction in every cluster: the run takes many times longer "
        "and more memory, and removes per-cell variation instead of batch effects. Check that "
        f"{key!r} is the batch column (sample, donor, library).",
        BatchKeyWarning,
    )
