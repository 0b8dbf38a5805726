"""The Harmony parameters: one table that holds each parameter's default, help text and kind.

:class:`HarmonyParams` *is* the table: every field carries its default, a one-line help text and a
*kind* (for example "a number > 0" or "one of these words, or null"). The kind is the only place
where a parameter's allowed values are written; from it come

* the checks of :meth:`HarmonyParams.create` and :meth:`HarmonyParams.resolve` (Python API, command
  line, workflow: values are validated once, here);
* the ``harmony-step run`` flags (:meth:`Kind.flag_options`);
* the Harmony part of ``workflow/schemas/config.schema.yaml`` (:meth:`Kind.schema`, assembled by
  :mod:`harmony_step._schema`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from harmony_step._errors import WrongTypeError

FLAVORS = ("harmony1", "harmony2")
CORRECTION_METHODS = ("original", "fast", "batched")
DEVICES = ("auto", "gpu", "cpu")
DTYPES = ("float32", "float64")


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first frame outside this package (the user's call),
    however many of the package's frames lie between."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


class HarmonyConvergenceWarning(UserWarning):
    """Harmony stopped at ``max_iter_harmony`` rounds before the objective settled."""


class ObjectiveRoseWarning(HarmonyConvergenceWarning):
    """The outer loop stopped because the objective rose in the last round, not because it settled."""


class HarmonyParameterWarning(UserWarning):
    """A parameter was set that has no effect with the other settings (for example the flavor)."""


# Seeds are stored in uns['harmony'] and must be the same for every generator that reads them.
SEED_LIMIT = 2**32
# Every integer parameter is written into the h5ad file as int64.
INT_LIMIT = 2**63


# --- kinds: what a parameter accepts, as a check, a flag and a schema -----------------------------


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer_flag(text: str) -> int:
    """An integer flag value; argparse reports anything else as a usage error."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def count_flag(text: str) -> int:
    """A whole-number flag value, 0 or more; argparse reports anything else as a usage error."""
    value = integer_flag(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _or_none(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """Accept 'none' (or 'null') on the command line for parameters whose None means auto or off."""

    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = convert.__name__
    return parse


def _words(options: Sequence[str], last: str = "or") -> str:
    return ", ".join(options[:-1]) + f" {last} {options[-1]}" if len(options) > 1 else options[0]


class Kind:
    """What a parameter accepts. Subclasses check values and describe them to argparse and JSON Schema."""

    none_allowed: bool = False

    def check(self, name: str, value: Any) -> Any:
        """The normalised value; raises WrongTypeError or ValueError naming the parameter."""
        raise NotImplementedError

    def flag_options(self) -> dict[str, Any]:
        """Keyword arguments of ``argparse.ArgumentParser.add_argument`` for the flag."""
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of the values a config file may give."""
        raise NotImplementedError

    def allowed(self) -> str:
        """What is allowed, in words, as shown in the config schema ("a number > 0")."""
        raise NotImplementedError

    def _nullable(self, schema: dict[str, Any]) -> dict[str, Any]:
        if self.none_allowed and "type" in schema:
            schema["type"] = [schema["type"], "null"]
        return schema


@dataclasses.dataclass(frozen=True)
class Text(Kind):
    """A non-empty string, such as an ``obsm`` key."""

    metavar: str = "KEY"

    def check(self, name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise WrongTypeError(
                f"The {name!r} parameter must be a non-empty str. Got {_describe(value)} instead."
            )
        if not value:
            raise ValueError(f"The {name!r} parameter must be a non-empty str. Got '' instead.")
        return value

    def flag_options(self) -> dict[str, Any]:
        return {"metavar": self.metavar}

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "minLength": 1}

    def allowed(self) -> str:
        return "a non-empty string"


@dataclasses.dataclass(frozen=True)
class ElementName(Text):
    """A non-empty string h5ad files can store as the name of one element: no '/', no NUL
    character, not '.' or '..' (a '/' would make a nested group that anndata cannot read back)."""

    def check(self, name: str, value: Any) -> str:
        value = super().check(name, value)
        if "/" in value or "\x00" in value or value in (".", ".."):
            raise ValueError(
                f"The {name!r} parameter must be a name h5ad files can store: no '/' (it would "
                "make a nested group that anndata cannot read back), no NUL, not '.' or '..'. "
                f"Got {value!r} instead; use for example {value.replace('/', '_')!r}."
            )
        return value

    def schema(self) -> dict[str, Any]:
        return {**super().schema(), "pattern": "^[^/]+$", "not": {"enum": [".", ".."]}}

    def allowed(self) -> str:
        return "a non-empty string without '/', other than '.' and '..'"


@dataclasses.dataclass(frozen=True)
class Choice(Kind):
    """One word of a fixed list, or None when ``none_allowed``."""

    options: tuple[str, ...]
    none_allowed: bool = False

    def check(self, name: str, value: Any) -> str | None:
        if value is None and self.none_allowed:
            return None
        if not isinstance(value, str) or value not in self.options:
            allowed = ", ".join(repr(o) for o in self.options)
            allowed += " or None" if self.none_allowed else ""
            raise ValueError(
                f"The {name!r} parameter must be one of {allowed}. Got {value!r} instead."
            )
        return value

    def flag_options(self) -> dict[str, Any]:
        if not self.none_allowed:
            return {"choices": self.options}
        options = self.options

        def parse(text: str) -> str | None:
            if text.lower() in ("none", "null"):
                return None
            if text not in options:
                raise argparse.ArgumentTypeError(
                    f"expected one of {', '.join([*options, 'none'])}, got {text!r}"
                )
            return text

        return {"type": parse, "metavar": "{" + ",".join([*options, "none"]) + "}"}

    def schema(self) -> dict[str, Any]:
        return {"enum": [*self.options, *([None] if self.none_allowed else [])]}

    def allowed(self) -> str:
        return _words([*self.options, *(["null"] if self.none_allowed else [])])


@dataclasses.dataclass(frozen=True)
class Dtype(Choice):
    """A floating-point dtype, given as a NumPy dtype, a type or its name."""

    options: tuple[str, ...] = DTYPES

    def check(self, name: str, value: Any) -> str:
        try:
            dtype = np.dtype(value)
        except TypeError:
            dtype = None
        if dtype is None or dtype.name not in self.options:
            raise ValueError(
                f"The {name!r} parameter must be numpy.float32 or numpy.float64. "
                f"Got {value!r} instead."
            )
        return dtype.name


@dataclasses.dataclass(frozen=True)
class Integer(Kind):
    """An int with ``low <= value < limit``, or None when ``none_allowed``.

    The default limit is that of int64, the type every integer parameter is stored as in the
    h5ad file; it is left out of the words of :meth:`allowed`.
    """

    low: int = 1
    none_allowed: bool = False
    metavar: str = "N"
    limit: int = INT_LIMIT
    limit_text: str = "2**63"

    def check(self, name: str, value: Any) -> int | None:
        if value is None and self.none_allowed:
            return None
        allowed = f"an int in the range [{self.low}, {self.limit_text})"
        allowed += " or None" if self.none_allowed else ""
        if not _is_int(value):
            raise WrongTypeError(
                f"The {name!r} parameter must be {allowed}. Got {_describe(value)} instead."
            )
        if not self.low <= value < self.limit:
            raise ValueError(f"The {name!r} parameter must be {allowed}. Got {value!r} instead.")
        return int(value)

    def flag_options(self) -> dict[str, Any]:
        if self.none_allowed:
            return {"type": _or_none(integer_flag), "metavar": f"{self.metavar}|none"}
        return {"type": integer_flag, "metavar": self.metavar}

    def schema(self) -> dict[str, Any]:
        return self._nullable(
            {"type": "integer", "minimum": self.low, "exclusiveMaximum": self.limit}
        )

    def allowed(self) -> str:
        text = f"an integer >= {self.low}"
        if self.limit != INT_LIMIT:
            text += f" and < {self.limit_text}"
        return text + (", or null" if self.none_allowed else "")


@dataclasses.dataclass(frozen=True)
class Seed(Integer):
    """An integer seed in ``[0, 2**32)``, or None for a seed drawn at random."""

    low: int = 0
    none_allowed: bool = True
    metavar: str = "SEED"
    limit: int = SEED_LIMIT
    limit_text: str = "2**32"


@dataclasses.dataclass(frozen=True)
class Real(Kind):
    """A float in an interval, each end open or closed; None as well when ``none_allowed``."""

    low: float = 0.0
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True
    none_allowed: bool = False

    def check(self, name: str, value: Any) -> float | None:
        if value is None and self.none_allowed:
            return None
        lo, hi = ("(" if self.low_open else "["), (")" if self.high_open else "]")
        allowed = f"a float in the range {lo}{_show(self.low)}, {_show(self.high)}{hi}"
        if not _is_real(value):
            raise WrongTypeError(
                f"The {name!r} parameter must be {allowed}. Got {_describe(value)} instead."
            )
        value = float(value)
        below = value <= self.low if self.low_open else value < self.low
        above = value >= self.high if self.high_open else value > self.high
        if math.isnan(value) or below or above:
            raise ValueError(f"The {name!r} parameter must be {allowed}. Got {value!r} instead.")
        return value

    def flag_options(self) -> dict[str, Any]:
        if self.none_allowed:
            return {"type": _or_none(_number), "metavar": "X|none"}
        return {"type": _number, "metavar": "X"}

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "number"}
        schema["exclusiveMinimum" if self.low_open else "minimum"] = _show(self.low)
        if math.isfinite(self.high):
            schema["exclusiveMaximum" if self.high_open else "maximum"] = _show(self.high)
        return self._nullable(schema)

    def allowed(self) -> str:
        if math.isinf(self.high):
            text = f"a number {'>' if self.low_open else '>='} {_show(self.low)}"
        elif not self.low_open and not self.high_open:
            text = f"a number from {_show(self.low)} to {_show(self.high)}"
        else:
            lo, hi = ("(" if self.low_open else "["), (")" if self.high_open else "]")
            text = f"a number in {lo}{_show(self.low)}, {_show(self.high)}{hi}"
        return text + (", or null" if self.none_allowed else "")


def _show(bound: float) -> int | float:
    """A bound as written by people: 0 rather than 0.0, inf kept as a float."""
    return int(bound) if math.isfinite(bound) and float(bound).is_integer() else bound


@dataclasses.dataclass(frozen=True)
class Weights(Kind):
    """One non-negative number or a non-empty 1-D sequence of them (theta)."""

    def check(self, name: str, value: Any) -> float | tuple[float, ...]:
        if isinstance(value, str | bytes) or not (
            _is_real(value) or isinstance(value, Sequence | np.ndarray)
        ):
            raise WrongTypeError(
                f"The {name!r} parameter must be a non-negative float or a sequence of them. "
                f"Got {_describe(value)} instead."
            )
        values = np.atleast_1d(np.asarray(value))
        numeric = np.issubdtype(values.dtype, np.integer) or np.issubdtype(
            values.dtype, np.floating
        )
        if values.ndim != 1 or values.size == 0 or not numeric or values.dtype == np.bool_:
            raise WrongTypeError(
                f"The {name!r} parameter must be a non-negative float or a 1-D sequence of them. "
                f"Got {value!r} instead."
            )
        values = values.astype(np.float64)
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ValueError(
                f"The {name!r} parameter must be finite and >= 0. Got {value!r} instead."
            )
        return float(values[0]) if _is_real(value) else tuple(float(v) for v in values)

    def flag_options(self) -> dict[str, Any]:
        return {"type": _number, "nargs": "+", "metavar": "X"}

    def schema(self) -> dict[str, Any]:
        number = {"type": "number", "minimum": 0}
        return {"oneOf": [number, {"type": "array", "minItems": 1, "items": number}]}

    def allowed(self) -> str:
        return "a number >= 0, or a non-empty list of numbers >= 0"


@dataclasses.dataclass(frozen=True)
class Switch(Kind):
    """True or False."""

    def check(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool | np.bool_):
            raise WrongTypeError(
                f"The {name!r} parameter must be a bool. Got {_describe(value)} instead."
            )
        return bool(value)

    def flag_options(self) -> dict[str, Any]:
        return {"action": argparse.BooleanOptionalAction}

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}

    def allowed(self) -> str:
        return "true or false"


# --- the table ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParameterSpec:
    """One row of the table: name, default, help text and kind.

    ``key`` names the parameter on the command line (``--`` + key with ``-`` for ``_``) and in the
    workflow config; it is the name itself unless the table gives a shorter one (``n_gpus`` is
    ``--gpus`` and ``gpus:``). ``--params`` files use the name.
    """

    name: str
    default: Any
    help: str
    kind: Kind
    key: str


def _parameter(default: Any, kind: Kind, help: str, key: str | None = None) -> Any:
    return dataclasses.field(default=default, metadata={"kind": kind, "help": help, "key": key})


@dataclasses.dataclass(frozen=True)
class HarmonyParams:
    """Validated Harmony parameters: build with :meth:`create` or :meth:`resolve`, which check them.

    Each field is one parameter: its default, what it accepts and its help text. The order and
    the defaults are those of :func:`harmony_step.harmony_integrate`.
    """

    basis: str = _parameter(
        "X_pca", Text(), "obsm key of the embedding to correct, shape (n_cells, n_pcs)"
    )
    adjusted_basis: str = _parameter(
        "X_pca_harmony",
        ElementName(),
        "obsm key the corrected embedding is written to; must differ from basis and contain no '/'",
    )
    dtype: str = _parameter(
        "float64", Dtype(), "working precision: float64, or float32 (faster, half the memory)"
    )
    flavor: str = _parameter(
        "harmony2",
        Choice(FLAVORS),
        "harmony2 (stabilized diversity penalty, dynamic ridge alpha*E, batch pruning) or "
        "harmony1 (original penalty, fixed ridge ridge_lambda)",
    )
    n_clusters: int | None = _parameter(
        None,
        Integer(1, none_allowed=True, metavar="K"),
        "number of clusters K; null = min(100, n_cells / 30), at least 2, at most n_cells",
    )
    max_iter_harmony: int = _parameter(
        10, Integer(1), "maximum outer rounds of clustering plus correction"
    )
    max_iter_clustering: int = _parameter(
        200, Integer(1), "maximum inner clustering iterations per round"
    )
    tol_harmony: float = _parameter(
        1e-4, Real(0), "relative objective decrease below which the outer loop stops"
    )
    tol_clustering: float = _parameter(
        1e-5, Real(0), "relative windowed objective decrease below which clustering stops"
    )
    sigma: float = _parameter(
        0.1,
        Real(0, low_open=True),
        "soft k-means temperature; larger values give softer cluster assignments",
    )
    theta: float | tuple[float, ...] = _parameter(
        2.0,
        Weights(),
        "diversity penalty weight: one number, one per key, or one per batch level; larger "
        "values mix batches more strongly",
    )
    tau: float = _parameter(
        0, Real(0), "discount of theta for small batches (expected cells per cluster); 0 = off"
    )
    ridge_lambda: float = _parameter(
        1.0,
        Real(0, low_open=True),
        "ridge penalty of the correction (harmony1 only); larger values correct less",
    )
    alpha: float = _parameter(
        0.2, Real(0, low_open=True), "dynamic ridge = alpha * expected counts (harmony2 only)"
    )
    batch_prune_threshold: float | None = _parameter(
        1e-5,
        Real(0, 1, high_open=False, none_allowed=True),
        "harmony2: leave a batch out of a cluster's correction when the cluster holds less than "
        "this share of the batch; null = off",
    )
    correction_method: str | None = _parameter(
        None,
        Choice(CORRECTION_METHODS, none_allowed=True),
        "original, fast, batched or null (chosen by memory); all give the same result up to "
        "rounding",
    )
    block_proportion: float = _parameter(
        0.05,
        Real(0, 1, low_open=True, high_open=False),
        "fraction of cells updated per block in the clustering step",
    )
    random_state: int | None = _parameter(
        0,
        Seed(),
        "integer seed in [0, 2**32); the same seed gives bitwise-identical output; null = random",
    )
    verbose: bool = _parameter(
        False,
        Switch(),
        "print one line per round and the convergence outcome (the command and the workflow "
        "always log them)",
    )
    device: str = _parameter(
        "auto",
        Choice(DEVICES),
        "where Harmony runs: auto (the GPU when CuPy can use one, else the CPU), gpu (an error "
        "when no GPU is usable) or cpu",
    )
    n_gpus: int = _parameter(
        1,
        Integer(1),
        "GPUs one run is spread over: one process per GPU, each holding an equal share of the "
        "cells, the sums between them added through NCCL; more than 1 needs device gpu or auto "
        "and that many GPUs visible",
        key="gpus",
    )

    # Settings that a flavor ignores: (flavor, the parameters it ignores, the advice).
    _IGNORED: ClassVar[tuple[tuple[str, tuple[str, ...], str], ...]] = (
        (
            "harmony2",
            ("ridge_lambda",),
            "'ridge_lambda' is ignored by flavor='harmony2' (its ridge is alpha * E); "
            "use flavor='harmony1' for a fixed ridge.",
        ),
        (
            "harmony1",
            ("alpha", "batch_prune_threshold"),
            "'alpha' and 'batch_prune_threshold' are ignored by flavor='harmony1'; "
            "use flavor='harmony2' for the dynamic ridge and pruning.",
        ),
    )

    @classmethod
    def create(cls, **values: Any) -> HarmonyParams:
        """Check ``values`` (any subset of the parameters) and return the parameters object.

        Raises
        ------
        WrongTypeError
            An unknown parameter name, or a value of the wrong type (a ``TypeError`` and a
            ``ValueError``).
        ValueError
            A value outside its allowed range, an ``adjusted_basis`` h5ad files cannot store as a
            name, or an ``adjusted_basis`` equal to ``basis``.

        Warns
        -----
        HarmonyParameterWarning
            A parameter is set that the chosen flavor ignores.
        """
        return cls.resolve([("", values)], stacklevel=2)

    @classmethod
    def resolve(
        cls, layers: Iterable[tuple[str, Mapping[str, Any]]], *, stacklevel: int = 1
    ) -> HarmonyParams:
        """Check every given value once, where it is given, and merge the layers (later ones win
        over earlier ones and over the defaults) into the parameters object.

        A value that a later layer replaces is still checked, so a bad entry in a parameter file
        is an error even when a flag overrides it.

        Parameters
        ----------
        layers
            ``(origin, values)`` pairs, for example ``("--params 'p.yaml'", {...})``; an error
            about a value is prefixed with the origin of the layer that gave it ("" for none).
        stacklevel
            Which frame the flavour warnings point at: 1 is the caller of this method, 2 its caller.

        Raises
        ------
        WrongTypeError, ValueError
            As :meth:`create`, prefixed with the origin of the offending value.
        """
        checked = dict(DEFAULTS)
        origins = dict.fromkeys(DEFAULTS, "")
        for where, values in layers:
            unknown = sorted(set(values) - set(DEFAULTS), key=str)
            if unknown:
                raise WrongTypeError(
                    _prefixed(
                        where,
                        f"Unknown Harmony parameter(s) {unknown}. "
                        f"Known parameters: {sorted(DEFAULTS)}.",
                    )
                )
            for name, value in values.items():
                try:
                    checked[name] = KINDS[name].check(name, value)
                except (TypeError, ValueError) as err:
                    if not where:
                        raise
                    raise type(err)(_prefixed(where, str(err))) from err
                origins[name] = where
        params = cls(**checked)
        params._check_output_name(origins["adjusted_basis"] or origins["basis"])
        params._check_gpus(origins["n_gpus"] or origins["device"])
        for message in params._ignored_settings():
            warnings.warn(message, HarmonyParameterWarning, stacklevel=stacklevel + 1)
        return params

    def _check_output_name(self, where: str) -> None:
        """The corrected embedding must not overwrite the original one."""
        if self.adjusted_basis == self.basis:
            raise ValueError(
                _prefixed(
                    where,
                    f"The 'adjusted_basis' parameter must differ from 'basis' ({self.basis!r}): "
                    "the corrected embedding would overwrite the original. Choose another name, "
                    f"such as {self.basis + '_harmony'!r}.",
                )
            )

    def _check_gpus(self, where: str) -> None:
        """Several GPUs need the GPU backend: the CPU backend runs in one process."""
        if self.n_gpus > 1 and self.device == "cpu":
            raise ValueError(
                _prefixed(
                    where,
                    f"The 'n_gpus' parameter must be 1 with device='cpu' (the CPU backend runs in "
                    f"one process). Got {self.n_gpus} instead: use device='gpu' or 'auto' to "
                    "spread the run over GPUs, or n_gpus=1.",
                )
            )

    def _ignored_settings(self) -> list[str]:
        """One message per group of parameters set away from its default but ignored by the flavor."""
        return [
            message
            for flavor, names, message in self._IGNORED
            if self.flavor == flavor and any(getattr(self, n) != DEFAULTS[n] for n in names)
        ]

    @property
    def numpy_dtype(self) -> np.dtype:
        """The working dtype as a NumPy dtype."""
        return np.dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """Plain values by name (theta as a list), as written into outputs."""
        out = dataclasses.asdict(self)
        if isinstance(self.theta, tuple):
            out["theta"] = list(self.theta)
        return out


def _prefixed(where: str, message: str) -> str:
    return f"{where}: {message}" if where else message


PARAMETERS: tuple[ParameterSpec, ...] = tuple(
    ParameterSpec(
        f.name, f.default, f.metadata["help"], f.metadata["kind"], f.metadata["key"] or f.name
    )
    for f in dataclasses.fields(HarmonyParams)
)
"""The table, in the order of the public signature of ``harmony_integrate``."""

DEFAULTS: dict[str, Any] = {p.name: p.default for p in PARAMETERS}
KINDS: dict[str, Kind] = {p.name: p.kind for p in PARAMETERS}
KEYS: dict[str, str] = {p.name: p.key for p in PARAMETERS}
"""The command-line and config name of each parameter, by parameter name."""
