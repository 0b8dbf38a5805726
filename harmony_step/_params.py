"""The Harmony parameters: one frozen object with the defaults, their documentation and validation.

Everything that exposes a Harmony parameter (the Python API, the command-line flags, the workflow's
config schema and the provenance written into outputs) reads the defaults and help texts from
:data:`PARAMETERS` here, so a default is written exactly once.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from harmony_step._errors import WrongTypeError

FLAVORS = ("harmony1", "harmony2")
CORRECTION_METHODS = ("original", "fast", "batched")
COLSUM_ALGOS = ("columns", "atomics", "gemm", "benchmark")
DEVICES = ("auto", "gpu", "cpu")
DTYPES = ("float32", "float64")


@dataclasses.dataclass(frozen=True)
class ParameterSpec:
    """Default and help text of one parameter (the single source for API, CLI and schema)."""

    name: str
    default: Any
    help: str


# Order and defaults follow the public signature of ``harmony_integrate``.
PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("basis", "X_pca", "obsm key of the embedding to correct, shape (n_cells, n_pcs)"),
    ParameterSpec(
        "adjusted_basis",
        "X_pca_harmony",
        "obsm key the corrected embedding is written to; not the basis, no '/'",
    ),
    ParameterSpec(
        "dtype", "float64", "working precision: float64 or float32 (faster, half the memory)"
    ),
    ParameterSpec(
        "flavor",
        "harmony2",
        "harmony2 (stabilized penalty, ridge alpha*E, pruning) or harmony1 (original penalty, fixed ridge)",
    ),
    ParameterSpec(
        "n_clusters", None, "number of clusters K; default min(100, N/30), at least 2, at most N"
    ),
    ParameterSpec("max_iter_harmony", 10, "maximum outer rounds of clustering plus correction"),
    ParameterSpec("max_iter_clustering", 200, "maximum inner clustering iterations per round"),
    ParameterSpec(
        "tol_harmony", 1e-4, "relative objective decrease below which the outer loop stops"
    ),
    ParameterSpec(
        "tol_clustering", 1e-5, "relative windowed objective decrease below which clustering stops"
    ),
    ParameterSpec("sigma", 0.1, "soft k-means temperature; larger values give softer assignments"),
    ParameterSpec(
        "theta",
        2.0,
        "diversity penalty weight: one number, one per key, or one per batch level; larger mixes more",
    ),
    ParameterSpec(
        "tau", 0, "discount of theta for small batches (expected cells per cluster); 0 = off"
    ),
    ParameterSpec(
        "ridge_lambda", 1.0, "ridge penalty of the correction (harmony1 only); larger corrects less"
    ),
    ParameterSpec("alpha", 0.2, "dynamic ridge lambda = alpha * expected counts (harmony2 only)"),
    ParameterSpec(
        "batch_prune_threshold",
        1e-5,
        "harmony2: drop a batch from a cluster's correction when its share of the batch is below this; null = off",
    ),
    ParameterSpec(
        "correction_method",
        None,
        "original, fast, batched or null (automatic by memory); all give the same result up to rounding",
    ),
    ParameterSpec(
        "colsum_algo",
        None,
        "accepted for compatibility (columns, atomics, gemm, benchmark); sums here are always fixed-order",
    ),
    ParameterSpec(
        "block_proportion", 0.05, "fraction of cells updated per block in the clustering step"
    ),
    ParameterSpec(
        "random_state",
        0,
        "integer seed in [0, 2**32); the same seed gives bitwise-identical output; null = random",
    ),
    ParameterSpec("verbose", False, "print one line per round and the convergence outcome"),
    ParameterSpec("device", "auto", "auto (GPU when usable, else CPU), gpu or cpu"),
)

DEFAULTS: dict[str, Any] = {p.name: p.default for p in PARAMETERS}


class HarmonyConvergenceWarning(UserWarning):
    """Harmony stopped at ``max_iter_harmony`` rounds before the objective settled."""


class ObjectiveRoseWarning(HarmonyConvergenceWarning):
    """The outer loop stopped because the objective rose in the last round, not because it settled."""


# Seeds are stored in uns['harmony'] and must be the same for every generator that reads them.
SEED_LIMIT = 2**32
# Every integer parameter is written into the h5ad file as int64.
INT_LIMIT = 2**63


@dataclasses.dataclass(frozen=True)
class HarmonyParams:
    """Validated Harmony parameters. Build with :meth:`create`, which checks every value."""

    basis: str = DEFAULTS["basis"]
    adjusted_basis: str = DEFAULTS["adjusted_basis"]
    dtype: str = DEFAULTS["dtype"]
    flavor: str = DEFAULTS["flavor"]
    n_clusters: int | None = DEFAULTS["n_clusters"]
    max_iter_harmony: int = DEFAULTS["max_iter_harmony"]
    max_iter_clustering: int = DEFAULTS["max_iter_clustering"]
    tol_harmony: float = DEFAULTS["tol_harmony"]
    tol_clustering: float = DEFAULTS["tol_clustering"]
    sigma: float = DEFAULTS["sigma"]
    theta: float | tuple[float, ...] = DEFAULTS["theta"]
    tau: float = DEFAULTS["tau"]
    ridge_lambda: float = DEFAULTS["ridge_lambda"]
    alpha: float = DEFAULTS["alpha"]
    batch_prune_threshold: float | None = DEFAULTS["batch_prune_threshold"]
    correction_method: str | None = DEFAULTS["correction_method"]
    colsum_algo: str | None = DEFAULTS["colsum_algo"]
    block_proportion: float = DEFAULTS["block_proportion"]
    random_state: int | None = DEFAULTS["random_state"]
    verbose: bool = DEFAULTS["verbose"]
    device: str = DEFAULTS["device"]

    @classmethod
    def create(cls, **values: Any) -> HarmonyParams:
        """Validate ``values`` (any subset of :data:`PARAMETERS`) and return the parameters object.

        Raises
        ------
        WrongTypeError
            An unknown parameter name, or a value of the wrong type (a ``TypeError`` and a
            ``ValueError``).
        ValueError
            A value outside its allowed range, an ``adjusted_basis`` h5ad cannot store as a name,
            or an ``adjusted_basis`` equal to ``basis``.
        """
        unknown = sorted(set(values) - set(DEFAULTS))
        if unknown:
            raise WrongTypeError(
                f"Unknown Harmony parameter(s) {unknown}. Known parameters: {sorted(DEFAULTS)}."
            )
        merged = {**DEFAULTS, **values}
        checked = {name: _CHECKS[name](name, merged[name]) for name in DEFAULTS}
        params = cls(**checked)
        params._check_output_name()
        params._check_flavor_specific()
        return params

    def _check_output_name(self) -> None:
        if self.adjusted_basis == self.basis:
            raise ValueError(
                f"The 'adjusted_basis' parameter must differ from 'basis' ({self.basis!r}): the "
                "corrected embedding would overwrite the original. Choose another name, such as "
                f"{self.basis + '_harmony'!r}."
            )

    def _check_flavor_specific(self) -> None:
        if self.flavor == "harmony2":
            if self.ridge_lambda != DEFAULTS["ridge_lambda"]:
                warnings.warn(
                    "'ridge_lambda' is ignored by flavor='harmony2' (its ridge is alpha * E); "
                    "use flavor='harmony1' for a fixed ridge.",
                    UserWarning,
                    stacklevel=4,
                )
        else:
            if (
                self.alpha != DEFAULTS["alpha"]
                or self.batch_prune_threshold != DEFAULTS["batch_prune_threshold"]
            ):
                warnings.warn(
                    "'alpha' and 'batch_prune_threshold' are ignored by flavor='harmony1'; "
                    "use flavor='harmony2' for the dynamic ridge and pruning.",
                    UserWarning,
                    stacklevel=4,
                )

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """Plain, serialisable values (theta as a list)."""
        out = dataclasses.asdict(self)
        if isinstance(self.theta, tuple):
            out["theta"] = list(self.theta)
        return out


# --- per-parameter checks: each returns the normalised value or raises ---------------------------


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(
    name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool
) -> float:
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    allowed = f"a float in the range {lo}{low}, {high}{hi}"
    if not _is_real(value):
        raise WrongTypeError(
            f"The {name!r} parameter must be {allowed}. Got {_describe(value)} instead."
        )
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if math.isnan(value) or below or above:
        raise ValueError(f"The {name!r} parameter must be {allowed}. Got {value!r} instead.")
    return value


def _positive(name: str, value: Any) -> float:
    return _real(name, value, 0, math.inf, low_open=True, high_open=True)


def _non_negative(name: str, value: Any) -> float:
    return _real(name, value, 0, math.inf, low_open=False, high_open=True)


def _int_in_range(
    name: str, value: Any, low: int, limit: int, limit_text: str, *, or_none: bool = False
) -> int:
    """An int with ``low <= value < limit``."""
    allowed = f"an int in the range [{low}, {limit_text})" + (" or None" if or_none else "")
    if not _is_int(value):
        raise WrongTypeError(
            f"The {name!r} parameter must be {allowed}. Got {_describe(value)} instead."
        )
    if not low <= value < limit:
        raise ValueError(f"The {name!r} parameter must be {allowed}. Got {value!r} instead.")
    return int(value)


def _int_at_least(name: str, value: Any, low: int = 1) -> int:
    return _int_in_range(name, value, low, INT_LIMIT, "2**63")


def _choice(options: Sequence[str], *, allow_none: bool = False):
    def check(name: str, value: Any) -> str | None:
        if value is None and allow_none:
            return None
        if not isinstance(value, str) or value not in options:
            allowed = ", ".join(repr(o) for o in options) + (" or None" if allow_none else "")
            raise ValueError(
                f"The {name!r} parameter must be one of {allowed}. Got {value!r} instead."
            )
        return value

    return check


def _check_dtype(name: str, value: Any) -> str:
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in DTYPES:
        raise ValueError(
            f"The {name!r} parameter must be numpy.float32 or numpy.float64. Got {value!r} instead."
        )
    return dtype.name


def _check_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise WrongTypeError(
            f"The {name!r} parameter must be a non-empty str. Got {_describe(value)} instead."
        )
    if not value:
        raise ValueError(f"The {name!r} parameter must be a non-empty str. Got '' instead.")
    return value


def _check_element_name(name: str, value: Any) -> str:
    """A name that h5ad can store as one element: no '/', not '.' or '..', no NUL character."""
    value = _check_str(name, value)
    if "/" in value or "\x00" in value or value in (".", ".."):
        raise ValueError(
            f"The {name!r} parameter must be a name h5ad files can store: no '/' (it would make "
            f"a nested group that anndata cannot read back), no NUL, not '.' or '..'. "
            f"Got {value!r} instead; use for example {value.replace('/', '_')!r}."
        )
    return value


def _check_theta(name: str, value: Any) -> float | tuple[float, ...]:
    if isinstance(value, str | bytes) or not (
        _is_real(value) or isinstance(value, Sequence | np.ndarray)
    ):
        raise WrongTypeError(
            f"The {name!r} parameter must be a non-negative float or a sequence of them. "
            f"Got {_describe(value)} instead."
        )
    values = np.atleast_1d(np.asarray(value))
    if (
        values.ndim != 1
        or values.size == 0
        or not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating))
        or values.dtype == np.bool_
    ):
        raise WrongTypeError(
            f"The {name!r} parameter must be a non-negative float or a 1-D sequence of them. "
            f"Got {value!r} instead."
        )
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"The {name!r} parameter must be finite and >= 0. Got {value!r} instead.")
    return float(values[0]) if _is_real(value) else tuple(float(v) for v in values)


def _check_n_clusters(name: str, value: Any) -> int | None:
    return None if value is None else _int_at_least(name, value, 1)


def _check_threshold(name: str, value: Any) -> float | None:
    if value is None:
        return None
    return _real(name, value, 0, 1, low_open=False, high_open=False)


def _check_seed(name: str, value: Any) -> int | None:
    if value is None:
        return None
    return _int_in_range(name, value, 0, SEED_LIMIT, "2**32", or_none=True)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise WrongTypeError(
            f"The {name!r} parameter must be a bool. Got {_describe(value)} instead."
        )
    return bool(value)


_CHECKS = {
    "basis": _check_str,
    "adjusted_basis": _check_element_name,
    "dtype": _check_dtype,
    "flavor": _choice(FLAVORS),
    "n_clusters": _check_n_clusters,
    "max_iter_harmony": _int_at_least,
    "max_iter_clustering": _int_at_least,
    "tol_harmony": _non_negative,
    "tol_clustering": _non_negative,
    "sigma": _positive,
    "theta": _check_theta,
    "tau": _non_negative,
    "ridge_lambda": _positive,
    "alpha": _positive,
    "batch_prune_threshold": _check_threshold,
    "correction_method": _choice(CORRECTION_METHODS, allow_none=True),
    "colsum_algo": _choice(COLSUM_ALGOS, allow_none=True),
    "block_proportion": lambda n, v: _real(n, v, 0, 1, low_open=True, high_open=False),
    "random_state": _check_seed,
    "verbose": _check_bool,
    "device": _choice(DEVICES),
}


def params_from_mapping(values: Mapping[str, Any]) -> HarmonyParams:
    """Parameters from a config mapping (YAML), rejecting unknown keys by name."""
    return HarmonyParams.create(**dict(values))
