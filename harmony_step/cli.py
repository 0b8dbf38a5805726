"""The ``harmony-step`` command: parse the command line, resolve the parameters, map errors to exit codes.

The user-facing description, precedence rules and exit codes are in :data:`RUN_DESCRIPTION`
(shown by ``harmony-step run --help``). The flags come from the parameter table
(:mod:`harmony_step._params`); the work is done by the step on files (:mod:`harmony_step._step`),
which gets a :class:`~harmony_step._step.StepRequest` and the checked parameters.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harmony_step._errors import Terminated
from harmony_step._params import (
    KEYS,
    PARAMETERS,
    HarmonyParams,
    ParameterSpec,
    count_flag,
    integer_flag,
)
from harmony_step._step import StepRequest, run_step
from harmony_step._step.metrics import SAMPLE_SIZE
from harmony_step._step.progress import PROG, ProgressDisplay, attached

RUN_DESCRIPTION = """\
Correct obsm[basis] of IN.h5ad with Harmony and write OUT.h5ad: a copy of IN with
obsm[adjusted_basis] and uns['harmony'] added, or, with --embedding-only, a small h5ad holding
only obs (index and key columns), obsm (basis and adjusted basis) and uns['harmony']. Only the
embedding and the key columns are read; X is never loaded. Optional reports: convergence table
(TSV), run summary (JSON) and convergence plot (PNG). Every output is written to a temporary file
and renamed into place when all are complete; the input is never modified.

Parameters: built-in defaults < --params YAML file < flags on the command line.

--gpus N spreads the run over N GPUs of this machine (one process each, NCCL between them).
Under srun with one task per GPU, every task runs this same command with --gpus N (N = the
number of tasks): task 0 reads and writes the files, the others only compute.

Exit codes: 0 success; 2 bad input (unreadable or malformed file, bad parameters, missing basis or
key, unwritable output); 3 GPU requested but unavailable (or, with --gpus, fewer GPUs visible
than asked for, or no NCCL); 4 GPU out of memory; 5 internal error; 6 a run over several GPUs
failed (a GPU process died, or the processes did not all start).
Errors are one 'harmony-step: error: ...' line on stderr (with a traceback under --debug).
"""
EXIT_OK, EXIT_BAD_INPUT, EXIT_NO_GPU, EXIT_GPU_MEMORY, EXIT_INTERNAL = 0, 2, 3, 4, 5
EXIT_MULTI_GPU = 6
# What a failed GPU process's own error means for the exit code (it reports the class name).
_BAD_INPUT_ERRORS = frozenset({"ValueError", "TypeError", "KeyError", "WrongTypeError"})


class UsageError(Exception):
    """A malformed command line (exit code 2)."""


# --- flags -------------------------------------------------------------------------------------


def flag_name(parameter: str) -> str:
    """The command-line flag of a Harmony parameter: ``max_iter_harmony`` -> ``--max-iter-harmony``,
    ``n_gpus`` -> ``--gpus`` (the table's key where it gives one)."""
    return "--" + KEYS.get(parameter, parameter).replace("_", "-")


def flag_help(spec: ParameterSpec) -> str:
    """The help of a parameter's flag: its description, in the command line's spelling (``none``,
    where a YAML file says ``null``), and its default."""
    text = re.sub(r"\bnull\b", "none", spec.help)
    return f"{text} (default: {_show_default(spec.default)})"


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
    from harmony_step._version import __version__

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
        type=count_flag,
        default=SAMPLE_SIZE,
        metavar="N",
        help="most cells used for the integration metrics (iLISI, silhouette; cLISI with "
        f"--label-key); larger inputs are subsampled; 0 skips the metrics (default: {SAMPLE_SIZE})",
    )
    run.add_argument_group("resources").add_argument(
        "--threads",
        type=integer_flag,
        metavar="N",
        help="CPU threads of the CPU backend (numba kernels and BLAS products) and the metrics "
        "(default: the CPUs this process may use: $SLURM_CPUS_PER_TASK if set, else its CPU "
        "affinity)",
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
        help_text = flag_help(spec).replace("%", "%%")
        group.add_argument(
            flag_name(spec.name),
            dest=spec.name,
            default=argparse.SUPPRESS,  # absent unless given, so --params values are not overridden
            help=help_text,
            **spec.kind.flag_options(),
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
    """The mapping of a ``--params`` YAML file, as written (its values are checked with the flags).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Not valid YAML.
    TypeError
        Not a mapping.
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
    return {str(name): value for name, value in values.items()}


def resolve_parameters(args: argparse.Namespace) -> HarmonyParams:
    """Defaults < ``--params`` file < flags, checked once; an error names the file when the value
    came from it."""
    layers = []
    if args.params:
        layers.append((f"--params {str(args.params)!r}", load_params_file(args.params)))
    flags = {spec.name: getattr(args, spec.name) for spec in PARAMETERS if hasattr(args, spec.name)}
    if len(flags.get("theta", ())) == 1:
        flags["theta"] = flags["theta"][0]
    layers.append(("", flags))
    return HarmonyParams.resolve(layers)


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
    from harmony_step._errors import MultiGPUError, MultiGPUSetupError, WorkerFailedError

    if isinstance(error, GPUUnavailableError | MultiGPUSetupError):
        return EXIT_NO_GPU
    if isinstance(error, WorkerFailedError):
        if error.error_type == "OutOfMemoryError":
            return EXIT_GPU_MEMORY
        if error.error_type in _BAD_INPUT_ERRORS:
            return EXIT_BAD_INPUT
    if isinstance(error, MultiGPUError):
        return EXIT_MULTI_GPU
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
            "--correction-method batched, more GPUs (--gpus), a GPU with more memory, or "
            "--device cpu."
        )
    if code == EXIT_INTERNAL:
        return (
            f"internal error: {type(error).__name__}: {text}. "
            "Run again with --debug for the traceback and report it."
        )
    return text


# --- the run ------------------------------------------------------------------------------------


def step_request(args: argparse.Namespace, argv: Sequence[str]) -> StepRequest:
    """The step's request from the parsed command line."""
    return StepRequest(
        input=args.input,
        output=args.output,
        keys=tuple(args.key),
        label_key=args.label_key,
        convergence=args.convergence,
        summary=args.summary,
        plot=args.plot,
        embedding_only=args.embedding_only,
        metrics_cells=args.metrics_cells,
        threads=args.threads,
        command=(PROG, *argv),
    )


# --- entry point -------------------------------------------------------------------------------


def _run(request: StepRequest, params: HarmonyParams, started: float) -> None:
    """The step; with several GPUs under ``srun``, this task's part of it (task 0 runs the step
    with the run's communicator joined first; the other tasks only compute)."""
    if params.n_gpus > 1:
        from harmony_step._distributed import srun

        task = srun.command_task()
        if task is not None and task.rank > 0:
            srun.serve_task(task, params.n_gpus)
            return
        if task is not None:
            with srun.leader_session(task, params.n_gpus):
                run_step(request, params, started=started)
            return
    run_step(request, params, started=started)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def _outputs_state(stop: BaseException, finished: bool = False) -> str:
    """What a run stopped by a signal leaves: ``run_step`` marks a stop after its commit, and
    ``finished`` says the step had returned."""
    if finished or getattr(stop, "outputs_written", False):
        return "the outputs were written"
    return "no output was written"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    started = time.perf_counter()
    stderr = sys.stderr
    argv = sys.argv[1:] if argv is None else list(argv)
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
    finished = False  # the step returned: its outputs are in place
    try:
        with attached(display, debug=args.debug):
            _run(step_request(args, argv), resolve_parameters(args), started)
            finished = True
        return EXIT_OK
    except Terminated as stop:
        display.message("error", f"terminated (SIGTERM); {_outputs_state(stop, finished)}")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt as stop:
        display.message("error", f"interrupted; {_outputs_state(stop, finished)}")
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
