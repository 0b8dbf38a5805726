"""The ``harmony-step`` command: parse, read only what is needed, integrate, write atomically.

The user-facing description, precedence rules and exit codes are in :data:`RUN_DESCRIPTION`
(shown by ``harmony-step run --help``). Layers: this module parses arguments and maps errors to
exit codes; :mod:`harmony_step._io` reads and writes h5ad files; :func:`harmony_step.harmony_integrate`
does the work; :mod:`harmony_step._metrics` and :mod:`harmony_step._report` produce the reports.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import resource
import shutil
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from harmony_step._metrics import SAMPLE_SIZE
from harmony_step._params import (
    COLSUM_ALGOS,
    CORRECTION_METHODS,
    DEVICES,
    DTYPES,
    FLAVORS,
    PARAMETERS,
    HarmonyParams,
)

PROG = "harmony-step"
RUN_DESCRIPTION = """\
Correct obsm[basis] of IN.h5ad with Harmony and write OUT.h5ad: a copy of IN with
obsm[adjusted_basis] and uns['harmony'] added, or, with --embedding-only, a small h5ad holding
only obs (index and key columns), obsm (basis and adjusted basis) and uns['harmony']. Only the
embedding and the key columns are read; X is never loaded. Optional reports: convergence table
(TSV), run summary (JSON) and convergence plot (PNG). Every output is written to a temporary file
and renamed into place when all are complete; the input is never modified.

Parameters: built-in defaults < --params YAML file < flags on the command line.

Exit codes: 0 success; 2 bad input (unreadable or malformed file, bad parameters, missing basis or
key, unwritable output); 3 GPU requested but unavailable; 4 GPU out of memory; 5 internal error.
Errors are one 'harmony-step: error: ...' line on stderr (with a traceback under --debug).
"""
EXIT_OK, EXIT_BAD_INPUT, EXIT_NO_GPU, EXIT_GPU_MEMORY, EXIT_INTERNAL = 0, 2, 3, 4, 5
_PROGRESS_LOGGER = "harmony_step.progress"


class UsageError(Exception):
    """A malformed command line (exit code 2)."""


class Terminated(BaseException):
    """SIGTERM arrived; raised so that cleanup (removal of temporary files) runs before exiting."""


# --- flags -------------------------------------------------------------------------------------


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _or_none(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """Accept 'none' (or 'null') for parameters whose None means "automatic" or "off"."""

    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = convert.__name__
    return parse


def _choice_or_none(options: Sequence[str]) -> Callable[[str], str | None]:
    def parse(text: str) -> str | None:
        if text.lower() in ("none", "null"):
            return None
        if text not in options:
            raise argparse.ArgumentTypeError(
                f"expected one of {', '.join([*options, 'none'])}, got {text!r}"
            )
        return text

    return parse


# How each parameter is spelled on the command line. Defaults and help texts are not repeated
# here: they come from PARAMETERS.
_FLAG_SYNTAX: dict[str, dict[str, Any]] = {
    "basis": {"metavar": "KEY"},
    "adjusted_basis": {"metavar": "KEY"},
    "dtype": {"choices": DTYPES},
    "flavor": {"choices": FLAVORS},
    "n_clusters": {"type": _or_none(_integer), "metavar": "K|none"},
    "max_iter_harmony": {"type": _integer, "metavar": "N"},
    "max_iter_clustering": {"type": _integer, "metavar": "N"},
    "tol_harmony": {"type": _number, "metavar": "X"},
    "tol_clustering": {"type": _number, "metavar": "X"},
    "sigma": {"type": _number, "metavar": "X"},
    "theta": {"type": _number, "nargs": "+", "metavar": "X"},
    "tau": {"type": _number, "metavar": "X"},
    "ridge_lambda": {"type": _number, "metavar": "X"},
    "alpha": {"type": _number, "metavar": "X"},
    "batch_prune_threshold": {"type": _or_none(_number), "metavar": "X|none"},
    "correction_method": {
        "type": _choice_or_none(CORRECTION_METHODS),
        "metavar": "{" + ",".join([*CORRECTION_METHODS, "none"]) + "}",
    },
    "colsum_algo": {
        "type": _choice_or_none(COLSUM_ALGOS),
        "metavar": "{" + ",".join([*COLSUM_ALGOS, "none"]) + "}",
    },
    "block_proportion": {"type": _number, "metavar": "X"},
    "random_state": {"type": _or_none(_integer), "metavar": "SEED|none"},
    "verbose": {"action": argparse.BooleanOptionalAction},
    "device": {"choices": DEVICES},
}


def flag_name(parameter: str) -> str:
    """The command-line flag of a Harmony parameter: ``max_iter_harmony`` -> ``--max-iter-harmony``."""
    return "--" + parameter.replace("_", "-")


def _show_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reports errors as one line through :class:`UsageError`."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``harmony-step`` with its ``run`` command."""
    from harmony_step import __version__

    parser = _Parser(
        prog=PROG,
        description="Harmony batch integration of single-cell embeddings in h5ad files, "
        "on NVIDIA GPUs (CuPy) or CPUs (NumPy).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="correct an embedding of an h5ad file with Harmony",
        description=RUN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_io_arguments(run)
    _add_parameter_arguments(run)
    return parser


def _add_io_arguments(run: argparse.ArgumentParser) -> None:
    files = run.add_argument_group("input and output")
    files.add_argument("--input", required=True, metavar="IN.h5ad", help="h5ad file to read")
    files.add_argument(
        "--output",
        required=True,
        metavar="OUT.h5ad",
        help="h5ad file to write (never the input); written atomically",
    )
    files.add_argument(
        "--key",
        required=True,
        action="append",
        metavar="COLUMN",
        help="obs column with the batch of each cell; repeat for several batch variables",
    )
    files.add_argument(
        "--label-key",
        metavar="COLUMN",
        help="obs column with cell types; adds cLISI and label silhouette to the metrics",
    )
    files.add_argument(
        "--params",
        metavar="PARAMS.yaml",
        help="YAML mapping of Harmony parameter names to values; flags override it",
    )
    files.add_argument("--convergence", metavar="OUT.tsv", help="write the convergence table")
    files.add_argument("--summary", metavar="OUT.json", help="write the run summary")
    files.add_argument("--plot", metavar="OUT.png", help="write the convergence plot")
    files.add_argument(
        "--embedding-only",
        action="store_true",
        help="write only obs, obsm (basis and adjusted basis) and uns['harmony'], not a copy of the input",
    )
    files.add_argument(
        "--metrics-cells",
        type=_integer,
        default=SAMPLE_SIZE,
        metavar="N",
        help="most cells used for the integration metrics (iLISI, silhouette; cLISI with "
        f"--label-key); larger inputs are subsampled; 0 skips the metrics (default: {SAMPLE_SIZE})",
    )
    behaviour = run.add_argument_group("messages")
    behaviour.add_argument("--quiet", action="store_true", help="no progress messages")
    behaviour.add_argument(
        "--debug", action="store_true", help="show the traceback and all warnings on errors"
    )


def _add_parameter_arguments(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group(
        "Harmony parameters",
        "Defaults apply unless set in --params or here (flags win over --params).",
    )
    for spec in PARAMETERS:
        help_text = f"{spec.help} (default: {_show_default(spec.default)})".replace("%", "%%")
        group.add_argument(
            flag_name(spec.name),
            dest=spec.name,
            default=argparse.SUPPRESS,  # absent unless given, so --params values are not overridden
            help=help_text,
            **_FLAG_SYNTAX[spec.name],
        )


# --- parameters --------------------------------------------------------------------------------


def _yaml_loader() -> type:
    import yaml

    class ParamsLoader(yaml.SafeLoader):
        """YAML 1.1 reads ``1e-4`` as a string; accept it as the number everyone means."""

    ParamsLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )
    return ParamsLoader


def load_params_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parameter mapping of a ``--params`` YAML file, validated on its own.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Not valid YAML, or a value out of range.
    TypeError
        Not a mapping, an unknown parameter name or a value of the wrong type.
    """
    import yaml

    where = f"--params {str(path)!r}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"Parameter file {str(path)!r} (--params) does not exist."
        ) from None
    try:
        values = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        raise ValueError(f"{where} is not valid YAML: {detail}") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise TypeError(
            f"{where} must be a mapping of Harmony parameter names to values, "
            f"not a {type(values).__name__}."
        )
    try:
        with warnings.catch_warnings():  # flavour warnings are shown once, for the merged values
            warnings.simplefilter("ignore")
            HarmonyParams.create(**{str(k): v for k, v in values.items()})
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from err
    return values


def resolve_parameters(args: argparse.Namespace) -> HarmonyParams:
    """Defaults < ``--params`` file < flags, validated once."""
    values = load_params_file(args.params) if args.params else {}
    for spec in PARAMETERS:
        if hasattr(args, spec.name):
            given = getattr(args, spec.name)
            if spec.name == "theta" and len(given) == 1:
                given = given[0]
            values[spec.name] = given
    with warnings.catch_warnings():  # harmony_integrate validates again and warns then, once
        warnings.simplefilter("ignore")
        return HarmonyParams.create(**values)


# --- progress and messages ---------------------------------------------------------------------


class ProgressDisplay(logging.Handler):
    """Progress on stderr: one updating line with a bar on a terminal, plain lines otherwise."""

    _ROUND = re.compile(r"round (\d+)/(\d+)")
    _BAR_WIDTH = 20

    def __init__(self, stream: TextIO, *, quiet: bool) -> None:
        super().__init__(level=logging.INFO)
        self.stream = stream
        self.quiet = quiet
        self.live = not quiet and stream.isatty()
        self._line_open = False

    def emit(self, record: logging.LogRecord) -> None:
        self.show(record.getMessage())

    def show(self, message: str) -> None:
        """One progress message (dropped when quiet)."""
        if self.quiet:
            return
        if not self.live:
            self._write(f"{PROG}: {message}\n")
            return
        width = shutil.get_terminal_size((100, 24)).columns - 1
        line = f"{PROG}: {self._bar(message)}{message}"[:width]
        self._write("\r\x1b[K" + line)
        self._line_open = True

    def _bar(self, message: str) -> str:
        found = self._ROUND.search(message)
        if not found:
            return ""
        done, total = int(found[1]), max(int(found[2]), 1)
        filled = min(self._BAR_WIDTH, round(self._BAR_WIDTH * done / total))
        return "[" + "#" * filled + "." * (self._BAR_WIDTH - filled) + "] "

    def end_line(self) -> None:
        """Close the updating line so that the next message starts on a line of its own."""
        if self._line_open:
            self._write("\n")
            self._line_open = False

    def message(self, kind: str, text: str) -> None:
        """A warning or error line, shown even when quiet."""
        self.end_line()
        self._write(f"{PROG}: {kind}: {' '.join(str(text).split())}\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _in_package(filename: str) -> bool:
    package = Path(__file__).resolve().parent
    return Path(filename).resolve().is_relative_to(package)


@contextmanager
def _attached(display: ProgressDisplay, debug: bool) -> Iterator[None]:
    """Route the progress logger and this package's warnings to ``display`` for the run."""
    logger = logging.getLogger(_PROGRESS_LOGGER)
    saved = (logger.level, logger.propagate)
    logger.addHandler(display)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def show_warning(message: Any, category: type, filename: str, *_: Any, **__: Any) -> None:
        ours = category.__module__.startswith("harmony_step") or _in_package(filename)
        if ours or debug:
            display.message("warning", str(message))

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show_warning
        try:
            yield
        finally:
            display.end_line()
            logger.removeHandler(display)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]


# --- exit codes --------------------------------------------------------------------------------


def _is_gpu_out_of_memory(error: BaseException) -> bool:
    """CuPy's OutOfMemoryError (matched by name so CuPy stays optional) or a CUDA allocation failure."""
    for cls in type(error).__mro__:
        if cls.__name__ == "OutOfMemoryError" and cls.__module__.startswith("cupy"):
            return True
    text = str(error)
    return any(
        marker in text
        for marker in (
            "cudaErrorMemoryAllocation",
            "CUBLAS_STATUS_ALLOC_FAILED",
            "CUSOLVER_STATUS_ALLOC_FAILED",
        )
    )


def exit_code(error: BaseException) -> int:
    """The exit code for an exception raised during a run (see the module documentation)."""
    from harmony_step._backend import GPUUnavailableError

    if isinstance(error, GPUUnavailableError):
        return EXIT_NO_GPU
    if _is_gpu_out_of_memory(error):
        return EXIT_GPU_MEMORY
    if isinstance(error, UsageError | OSError | KeyError | ValueError | TypeError):
        return EXIT_BAD_INPUT
    return EXIT_INTERNAL


def _describe_error(error: BaseException, code: int) -> str:
    if isinstance(error, KeyError) and error.args:
        text = error.args[0]  # str() of a KeyError adds quotes
    elif isinstance(error, OSError) and error.strerror:
        text = error.strerror  # str() adds "[Errno N]"; the file name is added below
    else:
        text = str(error)
    text = " ".join(str(text).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    if code == EXIT_GPU_MEMORY:
        return (
            f"the GPU ran out of memory ({text}). Try --dtype float32, "
            "--correction-method batched, a GPU with more memory, or --device cpu."
        )
    if code == EXIT_INTERNAL:
        return (
            f"internal error: {type(error).__name__}: {text}. "
            "Run again with --debug for the traceback and report it."
        )
    return text


# --- the run -----------------------------------------------------------------------------------


@contextmanager
def _phase(seconds: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def _peak_host_mib() -> int:
    """High-water mark of this process's resident memory in MiB (ru_maxrss is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _planned_outputs(args: argparse.Namespace) -> dict[str, Path]:
    """Every file the run will write, by role, in the order they are written."""
    roles = {
        "output": args.output,
        "convergence table": args.convergence,
        "plot": args.plot,
        "summary": args.summary,
    }
    return {role: Path(path) for role, path in roles.items() if path}


def check_paths(input_path: Path, outputs: Mapping[str, Path]) -> None:
    """Fail before any work when the input is missing or an output cannot be written.

    Raises
    ------
    FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError
        See :func:`harmony_step._io.check_output_path`.
    ValueError
        An output is the input file, or two outputs share a path.
    """
    from harmony_step._io import check_output_path

    if not input_path.exists():
        raise FileNotFoundError(f"Input file {str(input_path)!r} does not exist.")
    seen: dict[Path, str] = {}
    for role, path in outputs.items():
        resolved = path.resolve()
        if resolved == input_path.resolve():
            raise ValueError(
                f"The {role} {str(path)!r} is the input file; the input is never modified, "
                "choose another file name."
            )
        if resolved in seen:
            raise ValueError(
                f"The {seen[resolved]} and the {role} are the same file {str(path)!r}."
            )
        seen[resolved] = role
        check_output_path(path, role)


def _check_labels(adata: Any, label_key: str | None) -> None:
    if label_key is None:
        return
    missing = int(adata.obs[label_key].isna().sum())
    if missing:
        raise ValueError(
            f"Label key {label_key!r} has {missing} missing value(s); fill them or drop those cells, "
            "or leave out --label-key."
        )


def _metrics_for_uns(value: Any) -> Any:
    """None -> "none", as everywhere in uns['harmony'] (h5ad cannot store None)."""
    if isinstance(value, dict):
        return {k: _metrics_for_uns(v) for k, v in value.items()}
    return "none" if value is None else value


def run(args: argparse.Namespace, display: ProgressDisplay, started: float) -> None:
    """Carry out ``harmony-step run`` (exceptions are mapped to exit codes by :func:`main`)."""
    from harmony_step import harmony_integrate
    from harmony_step._io import StagedOutputs, read_harmony_inputs, sha256_file
    from harmony_step._provenance import format_seconds

    seconds: dict[str, float] = {}
    if args.metrics_cells < 0:
        raise ValueError(f"--metrics-cells must be >= 0. Got {args.metrics_cells} instead.")
    params = resolve_parameters(args)
    outputs = _planned_outputs(args)
    input_path = Path(args.input)
    check_paths(input_path, outputs)
    columns = [*args.key, *([args.label_key] if args.label_key else [])]
    with _phase(seconds, "read"):
        adata = read_harmony_inputs(input_path, params.basis, columns)
    _check_labels(adata, args.label_key)
    before = adata.obsm[params.basis]
    with _phase(seconds, "compute"):
        harmony_integrate(adata, list(args.key), **params.to_dict())
    harmony = adata.uns["harmony"]
    with _phase(seconds, "metrics"):
        metrics = _integration_metrics(args, adata, before, params, harmony)
    harmony["metrics"] = _metrics_for_uns(metrics)
    with _phase(seconds, "hash"):
        input_sha256 = sha256_file(input_path)
    with StagedOutputs() as staged:
        with _phase(seconds, "write"):
            _write_h5ad(staged, args, adata, params)
            _write_reports(staged, args, harmony)
            if args.summary:
                _write_summary(staged, args, adata, params, metrics, input_sha256)
        staged.commit()
    seconds["total"] = time.perf_counter() - started
    # Timings and peak memory go to the log only: the files stay byte-identical across reruns.
    display.show(f"timings: {format_seconds(seconds)}; peak host memory {_peak_host_mib()} MiB")
    state = "converged" if harmony["converged"] else "did not converge"
    display.show(
        f"done: {state} after {int(harmony['n_rounds'])} round(s) in {seconds['total']:.1f} s; "
        f"wrote {args.output}"
    )


def _integration_metrics(
    args: argparse.Namespace,
    adata: Any,
    before: Any,
    params: HarmonyParams,
    harmony: Mapping[str, Any],
) -> dict[str, Any]:
    """Metrics before and after correction; empty before/after when --metrics-cells is 0."""
    from harmony_step._metrics import metrics_before_after

    if args.metrics_cells == 0:
        return {"before": {}, "after": {}, "settings": {"skipped": "--metrics-cells 0"}}
    return metrics_before_after(
        before,
        adata.obsm[params.adjusted_basis],
        adata.obs[args.key[0]],
        adata.obs[args.label_key] if args.label_key else None,
        batch_key=args.key[0],
        label_key=args.label_key,
        seed=int(harmony["resolved"]["random_state"]),
        sample_size=args.metrics_cells,
    )


def _write_h5ad(staged: Any, args: argparse.Namespace, adata: Any, params: HarmonyParams) -> None:
    from harmony_step._io import write_into_copy, write_small_h5ad

    target = staged.temporary(args.output)
    if args.embedding_only:
        write_small_h5ad(target, adata)
    else:
        adjusted = params.adjusted_basis
        write_into_copy(
            args.input, target, {adjusted: adata.obsm[adjusted]}, {"harmony": adata.uns["harmony"]}
        )


def _write_reports(staged: Any, args: argparse.Namespace, harmony: Mapping[str, Any]) -> None:
    from harmony_step._io import write_text
    from harmony_step._report import convergence_tsv, plot_convergence

    if args.convergence:
        write_text(staged.temporary(args.convergence), convergence_tsv(harmony))
    if args.plot:
        plot_convergence(harmony, staged.temporary(args.plot))


def _write_summary(
    staged: Any,
    args: argparse.Namespace,
    adata: Any,
    params: HarmonyParams,
    metrics: Mapping[str, Any],
    input_sha256: str,
) -> None:
    from harmony_step import __version__
    from harmony_step._io import write_text
    from harmony_step._report import build_summary, summary_json

    summary = build_summary(
        adata.uns["harmony"],
        parameters=params.to_dict(),
        metrics=metrics,
        input_sha256=input_sha256,
        extra={
            "harmony_step_version": __version__,
            "command": [PROG, *sys.argv[1:]],
            "input": str(args.input),
            "output": str(args.output),
            "embedding_only": bool(args.embedding_only),
            "keys": list(args.key),
            "label_key": args.label_key,
            "n_cells": int(adata.n_obs),
            "n_pcs": int(adata.obsm[params.basis].shape[1]),
        },
    )
    write_text(staged.temporary(args.summary), summary_json(summary))


# --- entry point -------------------------------------------------------------------------------


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    started = time.perf_counter()
    stderr = sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        stderr.write(f"{PROG}: error: {err} (see '{PROG} run --help')\n")
        return EXIT_BAD_INPUT
    except SystemExit as done:  # --help and --version
        return int(done.code or 0)
    if args.command is None:
        stderr.write(f"{PROG}: error: choose a command: run (see '{PROG} --help')\n")
        return EXIT_BAD_INPUT
    display = ProgressDisplay(stderr, quiet=args.quiet)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with _attached(display, args.debug):
            run(args, display, started)
        return EXIT_OK
    except Terminated:
        display.message("error", "terminated (SIGTERM); no output was written")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        display.message("error", "interrupted; no output was written")
        return 130
    except Exception as err:
        code = exit_code(err)
        if args.debug:
            display.end_line()
            traceback.print_exc(file=stderr)
        display.message("error", _describe_error(err, code))
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
