"""Adversarial pass through the Python API, the ``harmony-step run`` command and the workflow.

Every case feeds harmony-step something a real user might: odd embeddings, implausible batch
keys, out-of-range parameters, awkward output paths, kills during the write, broken workflow
configs. A case passes when the outcome is right for that input:

- a bad input gives a clear error (an exception catchable as ``ValueError`` from the API; exit
  code 2, or the documented code, and one ``harmony-step: error:`` line naming the problem from
  the command; a failed run naming the problem from the workflow), leaves no output and no
  temporary file behind, and leaves the input untouched;
- a good but unusual input gives a correct result (finite, the right shape, in the caller's
  container, equal to the plain run where it should be).

"Data lost" counts cases in which an input (the AnnData, the input file by SHA-256, or an output
of an earlier run) was changed or removed.

Run from the repository root (about 5-10 minutes on two cores):

    python tests/adversarial/run_pass.py            # every case
    python tests/adversarial/run_pass.py --only api # one entry point: api, command or workflow

It prints the counts and writes tests/adversarial/results.md. The file is not a pytest test.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[2]
RESULTS_MD = Path(__file__).resolve().parent / "results.md"
CELL_LINES = REPO / "tests/data/cell_lines/cell_lines.h5ad"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A console script next to this Python, else the one on PATH."""
    candidate = BIN / name
    return str(candidate) if candidate.exists() else name


HARMONY_STEP = tool("harmony-step")
SNAKEMAKE = tool("snakemake")


@dataclass
class Case:
    entry: str
    name: str
    expected: str
    happened: str = ""
    passed: bool = False
    lost: bool = False


CASES: list[Case] = []


WORK = {"path": None}


def record(entry, name, expected, happened, passed, lost=False):
    happened = " ".join(str(happened).split())
    if WORK["path"]:
        happened = happened.replace(str(WORK["path"]), "<tmp>")
    if len(happened) > 300:
        happened = happened[:297] + "..."
    CASES.append(Case(entry, name, expected, happened, bool(passed), bool(lost)))
    mark = "pass" if passed else "FAIL"
    print(f"[{mark}] {time.strftime('%H:%M:%S')} {entry:8s} {name}: {happened[:160]}", flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# synthetic data


def make_adata(n=240, d=8, batches=3, seed=0, key="batch") -> ad.AnnData:
    """``n`` cells in ``batches`` shifted groups, a ``d``-column embedding, a label column."""
    rng = np.random.default_rng(seed)
    levels = np.array([f"b{i}" for i in range(batches)])
    batch = levels[np.arange(n) % batches] if n else np.array([], dtype=str)
    labels = np.where(np.arange(n) % 2 == 0, "T", "B") if n else np.array([], dtype=str)
    x = rng.normal(size=(n, d))
    for i, level in enumerate(levels):
        x[batch == level] += i * 0.8
    x[labels == "T", 0] += 3.0
    obs = pd.DataFrame(
        {key: pd.Categorical(batch), "cell_type": pd.Categorical(labels)},
        index=[f"cell{i}" for i in range(n)],
    )
    adata = ad.AnnData(obs=obs)
    adata.obsm["X_pca"] = x
    return adata


# ---------------------------------------------------------------------------------------------
# the Python API


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    def handler(signum, frame):
        raise Timeout(f"no answer in {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def snapshot(adata):
    """Copies of everything a failed call must leave as it was."""
    if not isinstance(adata, ad.AnnData):
        return None
    obsm = {}
    for name in list(adata.obsm.keys()):
        value = adata.obsm[name]
        if isinstance(value, pd.DataFrame) or sp.issparse(value):
            obsm[name] = value.copy()
        else:
            obsm[name] = np.array(value, copy=True)
    return obsm, adata.obs.copy(), set(adata.uns.keys())


def unchanged(adata, snap, basis="X_pca"):
    """Whether the input embedding and obs are as before (None when they cannot be compared)."""
    if snap is None:
        return None
    obsm, obs, _ = snap
    if basis in obsm:
        before = obsm[basis]
        if basis not in adata.obsm:
            return False
        after = adata.obsm[basis]
        if sp.issparse(before):
            if (before != after).nnz:
                return False
        else:
            a = np.asarray(before)
            b = np.asarray(after)
            if a.shape != b.shape or not np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"):
                return False
    for name in obsm:
        if name not in adata.obsm:
            return False
    return adata.obs.equals(obs)


def one_line(text: str) -> bool:
    return bool(text.strip()) and "\n" not in text.strip() and "Traceback" not in text


def call_api(adata, key, **kwargs):
    from harmony_step import harmony_integrate

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with time_limit(120):
            harmony_integrate(adata, key, **kwargs)
    return caught


def api_error(name, make, key="batch", match=None, cls=ValueError, **kwargs):
    """The call must raise ``cls`` (default: catchable as ValueError) and change nothing."""
    expected = f"{cls.__name__} naming the problem; input untouched"
    try:
        adata = make()
    except Exception as error:  # pragma: no cover - the case itself is broken
        record("api", name, expected, f"could not build the input: {error}", False)
        return
    snap = snapshot(adata)
    basis = kwargs.get("basis", "X_pca")
    adjusted = kwargs.get("adjusted_basis", "X_pca_harmony")
    try:
        call_api(adata, key, **kwargs)
    except Timeout as error:
        record("api", name, expected, f"hung: {error}", False)
        return
    except Exception as error:
        message = str(error)
        lost = unchanged(adata, snap, basis) is False
        added = snap is not None and (
            (adjusted in adata.obsm and adjusted not in snap[0])
            or ("harmony" in adata.uns and "harmony" not in snap[2])
        )
        ok = isinstance(error, cls) and one_line(message) and not lost and not added
        if match and not re.search(match, message, re.I):
            ok = False
        happened = f"{type(error).__name__}: {message}"
        if added:
            happened += " [partial result left in the AnnData]"
        if lost:
            happened += " [input changed]"
        record("api", name, expected, happened, ok, lost)
        return
    lost = unchanged(adata, snap, basis) is False
    out = adata.obsm.get(adjusted) if snap is not None and adjusted in adata.obsm else None
    finite = out is not None and np.isfinite(np.asarray(out, dtype=float)).all()
    record(
        "api",
        name,
        expected,
        f"no error; result {'finite' if finite else 'NOT finite'}",
        False,
        lost,
    )


def api_ok(name, make, key="batch", check=None, warn=None, allow_error=None, **kwargs):
    """The call must succeed with a finite result of the right shape (and pass ``check``).

    ``warn``: a warning class that must be raised. ``allow_error``: a regex; a clear
    ValueError whose message matches it is an acceptable answer too.
    """
    expected = "finite corrected embedding, input untouched"
    if warn:
        expected += f", {warn.__name__}"
    if allow_error:
        expected += " (or a clear ValueError)"
    try:
        adata = make()
    except Exception as error:  # pragma: no cover
        record("api", name, expected, f"could not build the input: {error}", False)
        return
    snap = snapshot(adata)
    basis = kwargs.get("basis", "X_pca")
    adjusted = kwargs.get("adjusted_basis", "X_pca_harmony")
    try:
        caught = call_api(adata, key, **kwargs)
    except Timeout as error:
        record("api", name, expected, f"hung: {error}", False)
        return
    except Exception as error:
        message = str(error)
        lost = unchanged(adata, snap, basis) is False
        ok = bool(
            allow_error
            and isinstance(error, ValueError)
            and re.search(allow_error, message, re.I)
            and one_line(message)
            and not lost
        )
        record("api", name, expected, f"{type(error).__name__}: {message}", ok, lost)
        return
    lost = unchanged(adata, snap, basis) is False
    problems = []
    if adjusted not in adata.obsm:
        problems.append(f"no obsm[{adjusted!r}]")
    else:
        out = adata.obsm[adjusted]
        values = np.asarray(out.to_numpy() if isinstance(out, pd.DataFrame) else out, dtype=float)
        if values.shape != (adata.n_obs, np.asarray(snap[0][basis]).shape[1]):
            problems.append(f"shape {values.shape}")
        elif not np.isfinite(values).all():
            problems.append(f"{int((~np.isfinite(values)).sum())} non-finite values")
    if warn and not any(issubclass(w.category, warn) for w in caught):
        problems.append(f"no {warn.__name__}")
    if check and not problems:
        try:
            note = check(adata, caught)
        except Exception as error:
            note = f"check raised {type(error).__name__}: {error}"
        if note:
            problems.append(note)
    if lost:
        problems.append("input embedding or obs changed")
    warned = sorted({w.category.__name__ for w in caught})
    happened = "ok" if not problems else "; ".join(problems)
    if warned:
        happened += f" (warnings: {', '.join(warned)})"
    record("api", name, expected, happened, not problems, lost)


def plain_result(**kwargs):
    adata = make_adata()
    call_api(adata, "batch", **kwargs)
    return np.asarray(adata.obsm["X_pca_harmony"])


def same_as_plain(rtol=0.0, atol=0.0, **kwargs):
    reference = plain_result(**kwargs)

    def check(adata, caught):
        out = adata.obsm["X_pca_harmony"]
        out = np.asarray(out.to_numpy() if isinstance(out, pd.DataFrame) else out, dtype=float)
        if rtol == 0 and atol == 0:
            if not np.array_equal(out, reference):
                return f"differs from the plain run by {np.abs(out - reference).max():.3g}"
        elif not np.allclose(out, reference, rtol=rtol, atol=atol):
            return f"differs from the plain run by {np.abs(out - reference).max():.3g}"
        return None

    return check


def with_obsm(x, **obs_columns):
    def make():
        adata = make_adata()
        for column, values in obs_columns.items():
            adata.obs[column] = values
        adata.obsm["X_pca"] = x() if callable(x) else x
        return adata

    return make


def with_obs(**columns):
    def make():
        adata = make_adata()
        for column, values in columns.items():
            adata.obs[column] = values(adata) if callable(values) else values
        return adata

    return make


def api_cases(work: Path):
    from harmony_step import BatchKeyWarning, MissingBasisError, MissingColumnError

    base = make_adata()
    x = np.asarray(base.obsm["X_pca"])
    n = base.n_obs

    # --- embeddings in every container and shape
    api_ok("baseline: NumPy float64 C-order", make_adata)
    api_ok(
        "same seed twice gives identical bits",
        make_adata,
        check=same_as_plain(),
    )
    api_ok(
        "F-order embedding",
        with_obsm(lambda: np.asfortranarray(x)),
        check=same_as_plain(),
    )
    api_ok(
        "strided (non-contiguous) embedding",
        with_obsm(lambda: np.repeat(x, 2, axis=1)[:, ::2]),
        check=same_as_plain(),
    )
    api_ok(
        "read-only embedding array",
        with_obsm(lambda: (lambda a: (a.setflags(write=False), a)[1])(x.copy())),
        check=same_as_plain(),
    )
    api_ok(
        "int64 embedding",
        with_obsm(lambda: np.rint(x * 100).astype(np.int64)),
    )
    api_ok("int32 embedding", with_obsm(lambda: np.rint(x * 100).astype(np.int32)))
    api_ok("float32 embedding", with_obsm(lambda: x.astype(np.float32)))
    api_ok(
        "float16 embedding",
        with_obsm(lambda: x.astype(np.float16)),
        allow_error=r"float16|dtype",
    )

    def df_check(adata, caught):
        out = adata.obsm["X_pca_harmony"]
        if not isinstance(out, pd.DataFrame):
            return f"came back as {type(out).__name__}, not a DataFrame"
        if not out.index.equals(adata.obs_names):
            return "DataFrame index is not the cell names"
        return None

    api_ok(
        "DataFrame embedding",
        with_obsm(
            lambda: pd.DataFrame(x, index=base.obs_names, columns=[f"PC{i}" for i in range(8)])
        ),
        check=df_check,
    )

    def view_make():
        full = make_adata(n=360)
        return full[full.obs["batch"] != "b0"]

    api_ok("AnnData view (adata[mask])", view_make)

    def parent_untouched():
        full = make_adata(n=360)
        view = full[:n]
        call_api(view, "batch")
        return "X_pca_harmony" not in full.obsm and "harmony" not in full.uns

    try:
        ok = parent_untouched()
        record(
            "api",
            "AnnData view: the parent object is left as it was",
            "parent has no new obsm/uns entries",
            "parent untouched" if ok else "parent changed",
            ok,
            not ok,
        )
    except Exception as error:
        record(
            "api",
            "AnnData view: the parent object is left as it was",
            "parent untouched",
            f"{type(error).__name__}: {error}",
            False,
        )

    def backed_make():
        path = work / "backed.h5ad"
        make_adata().write_h5ad(path)
        return ad.read_h5ad(path, backed="r")

    api_ok("backed AnnData (read-only file)", backed_make, allow_error=r"backed|memory|to_memory")

    api_error(
        "NaN in the embedding",
        with_obsm(lambda: np.where(np.arange(n)[:, None] == 5, np.nan, x)),
        match=r"nan|finite",
    )
    api_error(
        "Inf in the embedding",
        with_obsm(lambda: np.where(np.arange(n)[:, None] == 5, np.inf, x)),
        match=r"inf|finite",
    )
    api_error(
        "-Inf in float32 embedding",
        with_obsm(lambda: np.where(np.arange(n)[:, None] == 5, -np.inf, x).astype(np.float32)),
        match=r"inf|finite",
    )
    api_error(
        "values whose squares overflow float64 (1e200)",
        with_obsm(lambda: x * 1e200),
        match=r"X_pca|overflow|large|limit",
    )
    api_error(
        "values whose squares overflow float32 (1e25) with dtype=float32",
        with_obsm(lambda: (x * 1e25).astype(np.float32)),
        match=r"X_pca|overflow|large|limit",
        dtype="float32",
    )
    api_ok(
        "tiny values (1e-200)",
        with_obsm(lambda: x * 1e-200),
        allow_error=r"X_pca|small|zero|underflow",
    )
    api_ok(
        "one all-zero row",
        with_obsm(lambda: np.where(np.arange(n)[:, None] == 3, 0.0, x)),
        allow_error=r"zero",
    )
    api_ok("all-zero embedding", with_obsm(lambda: np.zeros_like(x)), allow_error=r"zero|constant")
    api_ok(
        "constant embedding (every cell the same)",
        with_obsm(lambda: np.ones_like(x)),
        allow_error=r"zero|constant|identical",
    )
    api_ok("one PC (n_cells x 1)", with_obsm(lambda: x[:, :1]), allow_error=r"dimension|pc|column")
    api_error(
        "zero PCs (n_cells x 0)",
        with_obsm(lambda: x[:, :0]),
        match=r"X_pca|column|dimension|pc|empty",
    )
    api_error("zero cells", lambda: make_adata(n=0), match=r"cell|empty|0")
    api_ok("one cell", lambda: make_adata(n=1), allow_error=r"cell|batch|at least")
    api_ok(
        "two cells, two batches",
        lambda: make_adata(n=2, batches=2),
        allow_error=r"cell|at least|n_clusters",
    )
    api_ok(
        "one batch (every cell the same batch)",
        lambda: make_adata(batches=1),
        allow_error=r"batch|level",
    )
    api_ok(
        "one batch of a single cell among large ones",
        with_obs(batch=lambda a: pd.Categorical(["solo", *list(a.obs["batch"][1:])])),
    )
    api_ok(
        "categorical key with unused categories",
        with_obs(batch=lambda a: a.obs["batch"].cat.add_categories(["unused1", "unused2"])),
        check=same_as_plain(),
    )
    api_ok(
        "string (object) key column",
        with_obs(batch=lambda a: a.obs["batch"].astype(str).astype(object)),
        check=same_as_plain(),
    )
    api_ok(
        "integer key column",
        with_obs(batch=lambda a: a.obs["batch"].cat.codes.astype(np.int64)),
        check=same_as_plain(),
    )
    api_ok("bool key column", with_obs(flag=lambda a: np.arange(a.n_obs) % 2 == 0), key="flag")
    api_ok(
        "float key column holding whole numbers (0.0, 1.0, 2.0)",
        with_obs(batch=lambda a: a.obs["batch"].cat.codes.astype(float)),
        allow_error=r"float|continuous",
    )
    api_error(
        "continuous float key column (like percent_mito)",
        with_obs(pm=lambda a: np.linspace(0, 5, a.n_obs)),
        key="pm",
        match=r"pm.*(float|continuous)|(float|continuous).*pm",
    )
    api_error(
        "NaN in a categorical key column",
        with_obs(batch=lambda a: a.obs["batch"].where(np.arange(a.n_obs) != 7)),
        match=r"batch.*(nan|missing|na\b)|(nan|missing|na\b).*batch",
    )
    api_error(
        "None in a string key column",
        with_obs(
            batch=lambda a: pd.Series(
                [None, *list(a.obs["batch"].astype(str)[1:])], index=a.obs_names, dtype=object
            )
        ),
        match=r"batch.*(nan|missing|none|na\b)|(nan|missing|none|na\b).*batch",
    )
    api_error(
        "NaN in the second of two keys",
        with_obs(
            donor=lambda a: pd.Categorical(
                np.where(
                    np.arange(a.n_obs) == 9, None, np.where(np.arange(a.n_obs) % 2 == 0, "d1", "d2")
                )
            )
        ),
        key=["batch", "donor"],
        match=r"donor",
    )
    api_error(
        "key listed twice",
        make_adata,
        key=["batch", "batch"],
        match=r"batch.*(twice|duplicate|more than once)",
    )
    api_error(
        "key missing", make_adata, key="batchx", cls=MissingColumnError, match=r"batchx.*batch"
    )
    api_error(
        "key that is a near miss in case ('Batch')",
        make_adata,
        key="Batch",
        cls=MissingColumnError,
        match=r"Batch",
    )
    api_error("key is an empty list", make_adata, key=[], match=r"key")
    api_error("key is None", make_adata, key=None, match=r"key")
    api_error("key is an int", make_adata, key=3, match=r"key")
    api_ok("key as a tuple", make_adata, key=("batch",), allow_error=r"key")
    api_ok(
        "key with one cell per level (cell barcodes)",
        with_obs(barcode=lambda a: pd.Categorical(a.obs_names)),
        key="barcode",
        warn=BatchKeyWarning,
        allow_error=r"barcode",
    )
    api_ok(
        "duplicated cell names",
        lambda: (lambda a: (setattr(a, "obs_names", ["same"] * a.n_obs), a)[1])(make_adata()),
        allow_error=r"name|index|unique",
    )
    api_error(
        "basis missing", make_adata, basis="X_umap", cls=MissingBasisError, match=r"X_umap.*X_pca"
    )
    api_error(
        "embedding is a sparse matrix", with_obsm(lambda: sp.csr_matrix(x)), match=r"sparse|dense"
    )
    api_error(
        "embedding of object dtype",
        with_obsm(lambda: x.astype(object)),
        match=r"dtype|object|numeric",
    )
    api_error(
        "embedding of complex dtype", with_obsm(lambda: x.astype(complex)), match=r"dtype|complex"
    )
    api_error("embedding of strings", with_obsm(lambda: x.astype(str)), match=r"dtype|str|numeric")
    api_error("3-D embedding", with_obsm(lambda: x.reshape(n, 2, 4)), match=r"2|dimension|shape")
    api_error(
        "adjusted_basis equal to basis", make_adata, adjusted_basis="X_pca", match=r"adjusted_basis"
    )
    api_error(
        "adjusted_basis with '/'",
        make_adata,
        adjusted_basis="harmony/out",
        match=r"adjusted_basis|/",
    )
    api_error("adjusted_basis empty string", make_adata, adjusted_basis="", match=r"adjusted_basis")
    api_error(
        "adjusted_basis not a string (5)", make_adata, adjusted_basis=5, match=r"adjusted_basis"
    )
    api_error("adata is None", lambda: None, match=r"anndata|adata")
    api_error("adata is a NumPy array", lambda: x.copy(), match=r"anndata|adata")
    api_error("unknown keyword (nclust=10)", make_adata, cls=TypeError, nclust=10)

    # --- every parameter: wrong type, out of range, boundaries
    bad = [
        ("theta", -1.0),
        ("theta", "2"),
        ("theta", float("nan")),
        ("theta", float("inf")),
        ("theta", [1.0, 2.0]),
        ("theta", [[1.0]]),
        ("sigma", 0.0),
        ("sigma", -0.1),
        ("sigma", float("nan")),
        ("sigma", "0.1"),
        ("n_clusters", 0),
        ("n_clusters", n + 1),
        ("n_clusters", 2.5),
        ("n_clusters", True),
        ("n_clusters", "10"),
        ("n_clusters", 2**70),
        ("max_iter_harmony", 0),
        ("max_iter_harmony", -3),
        ("max_iter_harmony", 2.0),
        ("max_iter_harmony", None),
        ("max_iter_clustering", 0),
        ("tol_harmony", -1e-4),
        ("tol_harmony", float("nan")),
        ("tol_clustering", -1.0),
        ("tau", -1.0),
        ("ridge_lambda", -1.0),
        ("alpha", -0.2),
        ("alpha", float("inf")),
        ("batch_prune_threshold", -0.1),
        ("batch_prune_threshold", 1.5),
        ("correction_method", "quick"),
        ("block_proportion", 0.0),
        ("block_proportion", 1.5),
        ("block_proportion", -0.05),
        ("random_state", -1),
        ("random_state", 2**32),
        ("random_state", 2**64),
        ("random_state", 1.5),
        ("random_state", "0"),
        ("dtype", "float16"),
        ("dtype", np.int32),
        ("dtype", "double precision"),
        ("flavor", "harmony3"),
        ("device", "tpu"),
        ("verbose", "yes"),
        ("colsum_algo", "bogus"),
    ]
    for param, value in bad:
        api_error(f"{param}={value!r}", make_adata, match=param, **{param: value})

    good = [
        ("theta", 0.0),
        ("theta", [1.0, 2.0, 3.0]),
        ("theta", np.float32(2.0)),
        ("n_clusters", 1),
        ("n_clusters", 2),
        ("n_clusters", np.int64(5)),
        ("n_clusters", n),
        ("max_iter_harmony", 1),
        ("max_iter_clustering", 1),
        ("tol_harmony", 0.0),
        ("tau", 5.0),
        ("batch_prune_threshold", None),
        ("block_proportion", 1.0),
        ("random_state", 2**32 - 1),
        ("random_state", np.int64(7)),
        ("dtype", "float32"),
        ("dtype", np.float32),
        ("flavor", "harmony1"),
        ("device", "cpu"),
    ]
    for param, value in good:
        api_ok(
            f"{param}={value!r} (boundary or alternative spelling)", make_adata, **{param: value}
        )

    def seed_recorded(adata, caught):
        seed = adata.uns["harmony"].get("resolved", {}).get("random_state")
        return None if seed is not None else "the drawn seed is not recorded in uns['harmony']"

    api_ok(
        "random_state=None records the seed drawn",
        make_adata,
        random_state=None,
        check=seed_recorded,
    )
    for method in ("original", "fast", "batched"):
        api_ok(
            f"correction_method={method!r} agrees with the default",
            make_adata,
            correction_method=method,
            check=same_as_plain(rtol=1e-7, atol=1e-9),
        )

    def gpu_case():
        expected = "clear error naming the GPU (GPUUnavailableError), or a GPU run"
        adata = make_adata()
        try:
            import cupy  # noqa: F401

            has_cupy = True
        except Exception:
            has_cupy = False
        try:
            call_api(adata, "batch", device="gpu")
        except Exception as error:
            msg = str(error)
            ok = one_line(msg) and re.search(r"gpu|cuda|cupy", msg, re.I) is not None
            record(
                "api",
                "device='gpu' on a machine without a usable GPU",
                expected,
                f"{type(error).__name__}: {msg}",
                ok,
            )
            return
        record(
            "api",
            "device='gpu' on a machine without a usable GPU",
            expected,
            "ran" + (" on the GPU" if has_cupy else " WITHOUT CuPy"),
            has_cupy,
        )

    gpu_case()


# ---------------------------------------------------------------------------------------------
# the command


def run_cmd(args, cwd, timeout=240, env=None):
    full_env = dict(os.environ, **(env or {}))
    start = time.time()
    proc = subprocess.run(
        [HARMONY_STEP, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    return proc.returncode, proc.stdout, proc.stderr, time.time() - start


def temp_leftovers(folder: Path):
    if not folder.is_dir():
        return []
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and "harmony-step" in p.name]


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("harmony-step: error:")]
    return lines[-1] if lines else (stderr.strip().splitlines() or ["(no message)"])[-1]


def cmd_error(name, folder, args, inputs, outputs, match, code=2, keep=()):
    """The command must exit ``code`` with one clear error line; no output, input unchanged.

    ``keep``: existing files (earlier outputs) that must survive unchanged.
    """
    expected = f"exit {code}, one error line naming it, no output, inputs unchanged"
    before = {p: sha256(p) for p in [*inputs, *keep] if p.is_file()}
    for p in outputs:
        if p not in before and p.is_file() and not p.is_symlink():
            p.unlink()
    try:
        rc, _, err, _ = run_cmd(args, folder)
    except subprocess.TimeoutExpired:
        record("command", name, expected, "hung", False)
        return
    after_ok = all(p.is_file() and sha256(p) == h for p, h in before.items())
    lost = not after_ok
    line = error_line(err)
    errors = [x for x in err.splitlines() if x.startswith("harmony-step: error:")]
    created = [str(p.name) for p in outputs if (p.exists() or p.is_symlink()) and p not in before]
    leftovers = temp_leftovers(folder)
    problems = []
    if rc != code:
        problems.append(f"exit {rc}")
    if len(errors) != 1 and not (code == 2 and "usage:" in err):
        problems.append(f"{len(errors)} error lines")
    if match and not re.search(match, line, re.I):
        problems.append("message does not name the problem")
    if "Traceback" in err:
        problems.append("traceback")
    if created:
        problems.append(f"created {created}")
    if leftovers:
        problems.append(f"temp files left {leftovers}")
    if lost:
        problems.append("an input or earlier output changed")
    happened = f"exit {rc}: {line}" + (f" [{'; '.join(problems)}]" if problems else "")
    record("command", name, expected, happened, not problems, lost)


def cmd_ok(name, folder, args, inputs, output, check=None, extra_outputs=(), allow_error=None):
    """Exit 0 with a good output; or, where ``allow_error`` (a regex) is given, exit 2 with a
    clear error line matching it."""
    expected = "exit 0, readable output with a finite corrected embedding, inputs unchanged"
    if allow_error:
        expected += " (or exit 2 with a clear error)"
    before = {p: sha256(p) for p in inputs}
    try:
        rc, _, err, _ = run_cmd(args, folder)
    except subprocess.TimeoutExpired:
        record("command", name, expected, "hung", False)
        return
    lost = any(sha256(p) != h for p, h in before.items())
    problems = []
    if allow_error and rc == 2:
        line = error_line(err)
        ok = re.search(allow_error, line) is not None and not output.exists() and not lost
        record("command", name, expected, f"exit 2: {line}", ok, lost)
        return
    if rc != 0:
        problems.append(f"exit {rc}: {error_line(err)}")
    else:
        try:
            out = ad.read_h5ad(output)
            emb = np.asarray(out.obsm["X_pca_harmony"])
            if not np.isfinite(emb).all():
                problems.append("non-finite output")
            if check:
                note = check(out, err)
                if note:
                    problems.append(note)
        except Exception as error:
            problems.append(f"output unreadable: {type(error).__name__}: {error}")
        for extra in extra_outputs:
            if not extra.is_file():
                problems.append(f"missing {extra.name}")
    if temp_leftovers(output.parent):
        problems.append(f"temp files left {temp_leftovers(output.parent)}")
    if lost:
        problems.append("input changed")
    record(
        "command", name, expected, "ok" if not problems else "; ".join(problems), not problems, lost
    )


def write_bad_inputs(folder: Path):
    files = {}
    small = make_adata()
    files["small"] = folder / "small.h5ad"
    small.write_h5ad(files["small"])

    nan_emb = make_adata()
    nan_emb.obsm["X_pca"][4, 2] = np.nan
    files["nan_emb"] = folder / "nan_embedding.h5ad"
    nan_emb.write_h5ad(files["nan_emb"])

    nan_key = make_adata()
    nan_key.obs["batch"] = nan_key.obs["batch"].where(np.arange(nan_key.n_obs) != 3)
    files["nan_key"] = folder / "nan_key.h5ad"
    nan_key.write_h5ad(files["nan_key"])

    empty = make_adata(n=0)
    files["empty"] = folder / "zero_cells.h5ad"
    empty.write_h5ad(files["empty"])

    numeric = make_adata()
    numeric.obs["lane"] = (np.arange(numeric.n_obs) % 4).astype(np.int64)
    numeric.obs["is_ctrl"] = np.arange(numeric.n_obs) % 2 == 0
    files["numeric"] = folder / "numeric_keys.h5ad"
    numeric.write_h5ad(files["numeric"])

    files["text"] = folder / "notes.h5ad"
    files["text"].write_text("this is not an h5ad file\n")
    files["zero_bytes"] = folder / "zero_bytes.h5ad"
    files["zero_bytes"].write_bytes(b"")
    data = files["small"].read_bytes()
    files["truncated"] = folder / "truncated.h5ad"
    files["truncated"].write_bytes(data[: len(data) // 2])

    files["space"] = folder / "my data ü.h5ad"
    shutil.copyfile(files["small"], files["space"])

    files["readonly"] = folder / "readonly.h5ad"
    shutil.copyfile(files["small"], files["readonly"])
    os.chmod(files["readonly"], 0o444)
    return files


def command_cases(work: Path):
    folder = work / "cmd"
    folder.mkdir()
    f = write_bad_inputs(folder)
    small = f["small"]
    out = folder / "out.h5ad"
    fast = ["--metrics-cells", "0", "--quiet"]

    def fresh(p: Path):
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)

    # a real run on the bundled cell lines, full copy
    real = folder / "cell_lines_out.h5ad"
    real_input = folder / "cell_lines.h5ad"
    shutil.copyfile(CELL_LINES, real_input)
    summary = folder / "cl_summary.json"
    conv = folder / "cl_convergence.tsv"
    plot = folder / "cl_convergence.png"

    def keeps_everything(out_ad, err):
        source = ad.read_h5ad(real_input)
        if list(out_ad.obs.columns) != list(source.obs.columns):
            return "obs columns differ from the input"
        if not np.array_equal(out_ad.obsm["X_pca"], source.obsm["X_pca"]):
            return "obsm['X_pca'] changed in the output"
        if "harmony" not in out_ad.uns:
            return "no uns['harmony']"
        return None

    cmd_ok(
        "real data: cell_lines, full copy with every report",
        folder,
        [
            "run",
            "--input",
            str(real_input),
            "--output",
            str(real),
            "--key",
            "dataset",
            "--label-key",
            "cell_type",
            "--summary",
            str(summary),
            "--convergence",
            str(conv),
            "--plot",
            str(plot),
            "--max-iter-harmony",
            "20",
            "--quiet",
        ],
        [real_input],
        real,
        check=keeps_everything,
        extra_outputs=(summary, conv, plot),
    )

    def embedding_only(out_ad, err):
        if set(out_ad.obsm.keys()) != {"X_pca", "X_pca_harmony"}:
            return f"obsm holds {sorted(out_ad.obsm.keys())}"
        if list(out_ad.obs.columns) != ["batch"]:
            return f"obs holds {list(out_ad.obs.columns)}"
        return None

    fresh(out)
    cmd_ok(
        "--embedding-only holds only what it says",
        folder,
        [
            "run",
            "--input",
            str(small),
            "--output",
            str(out),
            "--key",
            "batch",
            "--embedding-only",
            *fast,
        ],
        [small],
        out,
        check=embedding_only,
    )

    def flag_wins(out_ad, err):
        record_ = out_ad.uns["harmony"]
        params = record_.get("params", record_)
        return (
            None
            if float(params.get("sigma", -1)) == 0.2
            else f"sigma recorded as {params.get('sigma')}"
        )

    params_file = folder / "params.yaml"
    params_file.write_text("sigma: 0.5\nmax_iter_harmony: 3\n")
    fresh(out)
    cmd_ok(
        "flag wins over --params",
        folder,
        [
            "run",
            "--input",
            str(small),
            "--output",
            str(out),
            "--key",
            "batch",
            "--params",
            str(params_file),
            "--sigma",
            "0.2",
            *fast,
        ],
        [small],
        out,
        check=flag_wins,
    )

    fresh(out)
    cmd_ok(
        "integer key column in the file",
        folder,
        ["run", "--input", str(f["numeric"]), "--output", str(out), "--key", "lane", *fast],
        [f["numeric"]],
        out,
    )
    fresh(out)
    cmd_ok(
        "bool key column in the file",
        folder,
        ["run", "--input", str(f["numeric"]), "--output", str(out), "--key", "is_ctrl", *fast],
        [f["numeric"]],
        out,
    )
    fresh(out)
    cmd_ok(
        "two keys",
        folder,
        [
            "run",
            "--input",
            str(f["numeric"]),
            "--output",
            str(out),
            "--key",
            "batch",
            "--key",
            "lane",
            "--theta",
            "2",
            "1",
            *fast,
        ],
        [f["numeric"]],
        out,
    )
    fresh(out)
    cmd_ok(
        "input path with a space and non-ASCII letters",
        folder,
        [
            "run",
            "--input",
            str(f["space"]),
            "--output",
            str(folder / "out ü.h5ad"),
            "--key",
            "batch",
            *fast,
        ],
        [f["space"]],
        folder / "out ü.h5ad",
    )
    fresh(out)
    cmd_ok(
        "read-only input file",
        folder,
        ["run", "--input", str(f["readonly"]), "--output", str(out), "--key", "batch", *fast],
        [f["readonly"]],
        out,
    )
    newdir = folder / "new" / "sub" / "out.h5ad"
    cmd_ok(
        "output in a folder that does not exist yet",
        folder,
        ["run", "--input", str(small), "--output", str(newdir), "--key", "batch", *fast],
        [small],
        newdir,
        allow_error=r"new/sub|folder|directory",
    )

    # an existing good output must survive a failed rerun
    fresh(out)
    run_cmd(["run", "--input", str(small), "--output", str(out), "--key", "batch", *fast], folder)
    cmd_error(
        "failed rerun over an existing output keeps the old output",
        folder,
        ["run", "--input", str(small), "--output", str(out), "--key", "batchx", *fast],
        [small],
        [],
        r"batchx",
        keep=[out],
    )
    cmd_error(
        "bad --summary path keeps the existing main output",
        folder,
        [
            "run",
            "--input",
            str(small),
            "--output",
            str(out),
            "--key",
            "batch",
            "--summary",
            str(folder / "no_dir_file.txt" / "s.json"),
            *fast,
        ],
        [small],
        [],
        r"s\.json|summary|no_dir_file|directory",
        keep=[out],
    )
    fresh(out)

    # inputs
    base_args = ["--output", str(out), "--key", "batch", *fast]
    cmd_error(
        "--input missing file",
        folder,
        ["run", "--input", str(folder / "nope.h5ad"), *base_args],
        [],
        [out],
        r"nope\.h5ad",
    )
    cmd_error(
        "--input is a text file",
        folder,
        ["run", "--input", str(f["text"]), *base_args],
        [f["text"]],
        [out],
        r"notes\.h5ad|h5ad|hdf5",
    )
    cmd_error(
        "--input is an empty file",
        folder,
        ["run", "--input", str(f["zero_bytes"]), *base_args],
        [f["zero_bytes"]],
        [out],
        r"zero_bytes|h5ad|hdf5|empty",
    )
    cmd_error(
        "--input is a truncated h5ad",
        folder,
        ["run", "--input", str(f["truncated"]), *base_args],
        [f["truncated"]],
        [out],
        r"truncated|h5ad|hdf5",
    )
    cmd_error(
        "--input is a folder",
        folder,
        ["run", "--input", str(folder), *base_args],
        [],
        [out],
        r"folder|directory|cmd",
    )
    cmd_error(
        "NaN in the embedding of the file",
        folder,
        ["run", "--input", str(f["nan_emb"]), *base_args],
        [f["nan_emb"]],
        [out],
        r"nan|finite",
    )
    cmd_error(
        "NaN in the key column of the file",
        folder,
        ["run", "--input", str(f["nan_key"]), *base_args],
        [f["nan_key"]],
        [out],
        r"batch",
    )
    cmd_error(
        "zero cells in the file",
        folder,
        ["run", "--input", str(f["empty"]), *base_args],
        [f["empty"]],
        [out],
        r"cell|empty|0",
    )
    cmd_error(
        "--key missing",
        folder,
        ["run", "--input", str(small), "--output", str(out), "--key", "donor", *fast],
        [small],
        [out],
        r"donor.*batch",
    )
    cmd_error(
        "--key given twice",
        folder,
        [
            "run",
            "--input",
            str(small),
            "--output",
            str(out),
            "--key",
            "batch",
            "--key",
            "batch",
            *fast,
        ],
        [small],
        [out],
        r"batch.*(twice|duplicate|more than once)",
    )
    cmd_error(
        "--key left out",
        folder,
        ["run", "--input", str(small), "--output", str(out), *fast],
        [small],
        [out],
        r"--key",
    )
    cmd_error(
        "--key continuous float column (percent_mito)",
        folder,
        ["run", "--input", str(real_input), "--output", str(out), "--key", "percent_mito", *fast],
        [real_input],
        [out],
        r"percent_mito",
    )
    cmd_error(
        "--label-key missing",
        folder,
        [
            "run",
            "--input",
            str(small),
            "--output",
            str(out),
            "--key",
            "batch",
            "--label-key",
            "celltype",
            *fast,
        ],
        [small],
        [out],
        r"celltype",
    )
    cmd_error(
        "--basis missing",
        folder,
        [
            "run",
            "--input",
            str(small),
            "--output",
            str(out),
            "--key",
            "batch",
            "--basis",
            "X_scvi",
            *fast,
        ],
        [small],
        [out],
        r"X_scvi.*X_pca",
    )
    cmd_error(
        "--adjusted-basis equal to --basis",
        folder,
        [
            "run",
            "--input",
            str(small),
            "--output",
            str(out),
            "--key",
            "batch",
            "--adjusted-basis",
            "X_pca",
            *fast,
        ],
        [small],
        [out],
        r"adjusted",
    )
    cmd_error(
        "--adjusted-basis with '/'",
        folder,
        [
            "run",
            "--input",
            str(small),
            "--output",
            str(out),
            "--key",
            "batch",
            "--adjusted-basis",
            "a/b",
            *fast,
        ],
        [small],
        [out],
        r"adjusted|/",
    )

    # parameters through flags and --params
    for flag, value, match in [
        ("--theta", "-1", "theta"),
        ("--theta", "abc", "theta"),
        ("--theta", "nan", "theta"),
        ("--sigma", "0", "sigma"),
        ("--n-clusters", "0", "n.clusters"),
        ("--n-clusters", "100000", "n.clusters"),
        ("--max-iter-harmony", "0", "max.iter.harmony"),
        ("--max-iter-harmony", "2.5", "max.iter.harmony"),
        ("--tol-harmony", "-1", "tol.harmony"),
        ("--block-proportion", "2", "block.proportion"),
        ("--random-state", "-1", "random.state"),
        ("--random-state", str(2**32), "random.state"),
        ("--random-state", str(2**64), "random.state"),
        ("--random-state", "1e3", "random.state"),
        ("--dtype", "float16", "dtype"),
        ("--flavor", "harmony3", "flavor"),
        ("--device", "tpu", "device"),
        ("--metrics-cells", "-1", "metrics.cells"),
        ("--batch-prune-threshold", "2", "batch.prune.threshold"),
    ]:
        cmd_error(
            f"{flag} {value}",
            folder,
            [
                "run",
                "--input",
                str(small),
                "--output",
                str(out),
                "--key",
                "batch",
                flag,
                value,
                *fast,
            ],
            [small],
            [out],
            match,
        )

    for label, text, match in [
        ("--params with an unknown key", "thetaa: 2\n", "thetaa"),
        ("--params with a bad value", "sigma: -1\n", "sigma"),
        ("--params that is a list", "- theta\n- 2\n", r"mapping|params"),
        ("--params with invalid YAML", "theta: [1, 2\n", r"params|yaml"),
        ("--params with a string seed", "random_state: 'seven'\n", "random.state"),
        ("--params setting basis to a missing key", "basis: X_umap\n", "X_umap"),
    ]:
        pfile = folder / f"params_{len(label)}_{abs(hash(text)) % 1000}.yaml"
        pfile.write_text(text)
        cmd_error(
            label,
            folder,
            [
                "run",
                "--input",
                str(small),
                "--output",
                str(out),
                "--key",
                "batch",
                "--params",
                str(pfile),
                *fast,
            ],
            [small, pfile],
            [out],
            match,
        )
    cmd_error(
        "--params file missing",
        folder,
        [
            "run",
            "--input",
            str(small),
            "--output",
            str(out),
            "--key",
            "batch",
            "--params",
            str(folder / "nope.yaml"),
            *fast,
        ],
        [small],
        [out],
        r"nope\.yaml",
    )

    cmd_error(
        "--device gpu without a usable GPU",
        folder,
        [
            "run",
            "--input",
            str(small),
            "--output",
            str(out),
            "--key",
            "batch",
            "--device",
            "gpu",
            *fast,
        ],
        [small],
        [out],
        r"gpu|cuda|cupy",
        code=3,
    ) if not _has_gpu() else None

    # output paths
    cmd_error(
        "--output same as --input",
        folder,
        ["run", "--input", str(small), "--output", str(small), "--key", "batch", *fast],
        [small],
        [],
        r"input|same",
    )
    link_to_input = folder / "link_to_input.h5ad"
    link_to_input.symlink_to(small)
    cmd_error(
        "--output is a symlink to the input",
        folder,
        ["run", "--input", str(small), "--output", str(link_to_input), "--key", "batch", *fast],
        [small],
        [],
        r"link|input|same",
    )
    target = folder / "target.h5ad"
    shutil.copyfile(small, target)
    link = folder / "link.h5ad"
    link.symlink_to(target)
    cmd_error(
        "--output is a symlink to another file",
        folder,
        ["run", "--input", str(small), "--output", str(link), "--key", "batch", *fast],
        [small, target],
        [],
        r"link",
    )
    existing_dir = folder / "a_folder.h5ad"
    existing_dir.mkdir()
    cmd_error(
        "--output is an existing folder",
        folder,
        ["run", "--input", str(small), "--output", str(existing_dir), "--key", "batch", *fast],
        [small],
        [],
        r"folder|directory|a_folder",
    )
    cmd_error(
        "--output /dev/null",
        folder,
        ["run", "--input", str(small), "--output", "/dev/null", "--key", "batch", *fast],
        [small],
        [],
        r"/dev/null",
    )
    cmd_error(
        "--output under a regular file",
        folder,
        ["run", "--input", str(small), "--output", str(small) + "/x.h5ad", "--key", "batch", *fast],
        [small],
        [],
        r"x\.h5ad|directory|folder|small",
    )
    cmd_error(
        "--summary same path as --output",
        folder,
        [
            "run",
            "--input",
            str(small),
            "--output",
            str(out),
            "--key",
            "batch",
            "--summary",
            str(out),
            *fast,
        ],
        [small],
        [out],
        r"same|out\.h5ad|summary",
    )
    cmd_error(
        "--convergence same path as --summary",
        folder,
        [
            "run",
            "--input",
            str(small),
            "--output",
            str(out),
            "--key",
            "batch",
            "--summary",
            str(folder / "s.json"),
            "--convergence",
            str(folder / "s.json"),
            *fast,
        ],
        [small],
        [out, folder / "s.json"],
        r"same|s\.json",
    )
    cmd_error(
        "--plot is the input file",
        folder,
        [
            "run",
            "--input",
            str(small),
            "--output",
            str(out),
            "--key",
            "batch",
            "--plot",
            str(small),
            *fast,
        ],
        [small],
        [out],
        r"input|small|same",
    )
    cmd_error(
        "--convergence is an existing folder (all-or-nothing)",
        folder,
        [
            "run",
            "--input",
            str(small),
            "--output",
            str(out),
            "--key",
            "batch",
            "--convergence",
            str(existing_dir),
            *fast,
        ],
        [small],
        [out],
        r"folder|directory|a_folder",
    )

    ro_dir = folder / "readonly_fs"
    ro_dir.mkdir()
    if _mount(ro_dir, "ro,size=1m"):
        try:
            cmd_error(
                "--output on a read-only file system",
                folder,
                [
                    "run",
                    "--input",
                    str(small),
                    "--output",
                    str(ro_dir / "out.h5ad"),
                    "--key",
                    "batch",
                    *fast,
                ],
                [small],
                [ro_dir / "out.h5ad"],
                r"readonly_fs|read-only|writ",
            )
        finally:
            _umount(ro_dir)
    else:
        ro_dir.chmod(0o555)
        cmd_error(
            "--output in a folder without write permission",
            folder,
            [
                "run",
                "--input",
                str(small),
                "--output",
                str(ro_dir / "out.h5ad"),
                "--key",
                "batch",
                *fast,
            ],
            [small],
            [ro_dir / "out.h5ad"],
            r"readonly_fs|permission|writ",
        )
        ro_dir.chmod(0o755)

    full_dir = folder / "full_fs"
    full_dir.mkdir()
    if _mount(full_dir, "size=64k"):
        try:
            cmd_error(
                "--output on a nearly full file system (64 KiB)",
                folder,
                [
                    "run",
                    "--input",
                    str(real_input),
                    "--output",
                    str(full_dir / "out.h5ad"),
                    "--key",
                    "dataset",
                    *fast,
                ],
                [real_input],
                [full_dir / "out.h5ad"],
                r"full_fs|space|room",
            )
            leftovers = [p.name for p in full_dir.iterdir()]
            if leftovers:
                record(
                    "command",
                    "nearly full file system leaves nothing behind",
                    "no files left",
                    f"left {leftovers}",
                    False,
                )
        finally:
            _umount(full_dir)

    kill_cases(folder)


def _has_gpu():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _mount(path: Path, options: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    return proc.returncode == 0


def _umount(path: Path):
    subprocess.run(["umount", str(path)], capture_output=True)


def kill_cases(folder: Path):
    """SIGTERM and SIGKILL during the write, then a rerun: temp files gone, output correct."""
    big = folder / "big.h5ad"
    rng = np.random.default_rng(1)
    n = 6000
    small = make_adata(n=n, d=10)
    adata = ad.AnnData(
        X=rng.normal(size=(n, 2000)).astype(np.float32), obs=small.obs, obsm=dict(small.obsm)
    )
    adata.write_h5ad(big)
    digest = sha256(big)

    for sig in (signal.SIGTERM, signal.SIGKILL):
        name = f"{signal.Signals(sig).name} during the write, then a rerun"
        expected = (
            "no output and, after the rerun, no temp file; rerun output correct; input unchanged"
        )
        sub = folder / f"kill_{sig}"
        sub.mkdir()
        out = sub / "out.h5ad"
        args = [
            HARMONY_STEP,
            "run",
            "--input",
            str(big),
            "--output",
            str(out),
            "--key",
            "batch",
            "--metrics-cells",
            "0",
            "--max-iter-harmony",
            "2",
        ]
        proc = subprocess.Popen(
            args, cwd=sub, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        hit = False
        deadline = time.time() + 200
        while time.time() < deadline and proc.poll() is None:
            tmp = [p for p in sub.iterdir() if p.name.startswith(".") and p.name.endswith("tmp")]
            if tmp and tmp[0].exists() and tmp[0].stat().st_size > 0:
                os.killpg(proc.pid, sig)
                hit = True
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
        proc.stderr.close()
        after_kill = [p.name for p in sub.iterdir()]
        if not hit:
            record(
                "command",
                name,
                expected,
                "the write finished before the signal could be sent",
                False,
            )
            continue
        problems = []
        if out.exists():
            problems.append("output exists after the kill")
        if sig == signal.SIGTERM and any(name_.startswith(".") for name_ in after_kill):
            problems.append(f"SIGTERM left {after_kill}")
        rc, _, err, _ = run_cmd(args[1:], sub)
        if rc != 0:
            problems.append(f"rerun exit {rc}: {error_line(err)}")
        leftovers = temp_leftovers(sub)
        if leftovers:
            problems.append(f"temp files after the rerun: {leftovers}")
        if (
            sig == signal.SIGKILL
            and not re.search(r"remov|stale|leftover", err, re.I)
            and after_kill != ["out.h5ad"]
            and any(p.startswith(".") for p in after_kill)
        ):
            problems.append("rerun did not log the removed leftover")
        try:
            emb = ad.read_h5ad(out).obsm["X_pca_harmony"]
            if not np.isfinite(emb).all():
                problems.append("rerun output not finite")
        except Exception as error:
            problems.append(f"rerun output unreadable: {error}")
        lost = sha256(big) != digest
        if lost:
            problems.append("input changed")
        happened = f"after kill: {after_kill}; " + (
            "rerun clean, output correct" if not problems else "; ".join(problems)
        )
        record("command", name, expected, happened, not problems, lost)


# ---------------------------------------------------------------------------------------------
# the workflow


def run_snakemake(folder: Path, configfile: str | None, timeout=400, extra=()):
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    args = [SNAKEMAKE, "--cores", "1", "--snakefile", str(REPO / "workflow/Snakefile"), *extra]
    if configfile:
        args += ["--configfile", configfile]
    proc = subprocess.run(
        args, cwd=folder, capture_output=True, text=True, timeout=timeout, env=env
    )
    return proc.returncode, proc.stdout + proc.stderr


RESTORE = {}


def wf_error(
    name, folder: Path, config_text: str, match: str, inputs=(), keep=(), job_started_ok=False
):
    expected = (
        "non-zero exit before any job, message naming the problem, no results, inputs unchanged"
    )
    if any(not p.is_file() for p in keep) and "config" in RESTORE:
        # an earlier case lost the good results: make them again so this case starts the same
        (folder / "config.yaml").write_text(RESTORE["config"])
        run_snakemake(folder, "config.yaml")
    (folder / "config.yaml").write_text(config_text)
    before = {p: sha256(p) for p in [*inputs, *keep]}
    results_before = set(_result_files(folder))
    try:
        rc, text = run_snakemake(folder, "config.yaml")
    except subprocess.TimeoutExpired:
        record("workflow", name, expected, "hung", False)
        return
    lost = any(not p.is_file() or sha256(p) != h for p, h in before.items())
    new_results = sorted(set(_result_files(folder)) - results_before)
    lines = [line for line in text.splitlines() if re.search(match, line, re.I)]
    problems = []
    if rc == 0:
        problems.append("exit 0")
    if not lines:
        problems.append("no line names the problem")
    if "Traceback" in text:
        problems.append("traceback on the console")
    jobs_ran = re.search(r"^\s*(local)?rule harmony:", text, re.M) is not None
    if jobs_ran and not job_started_ok:
        problems.append("a job started")
    if new_results:
        problems.append(f"wrote {new_results[:3]}")
    if lost:
        problems.append("an input or earlier result changed")
    clear = [line for line in lines if re.search(r"error|invalid|Dataset '", line, re.I)]
    if lines and not clear and rc != 0 and re.search(r"^\s*(local)?rule harmony:", text, re.M):
        problems.append("the reason is not on the console (only in the job's log)")
    shown = (clear or lines or text.strip().splitlines() or ["(no output)"])[0].strip()
    happened = f"exit {rc}" + (f" [{'; '.join(problems)}]" if problems else "") + f": {shown}"
    record("workflow", name, expected, happened, not problems, lost)


def _result_files(folder: Path):
    results = folder / "results"
    if not results.exists():
        return []
    return [
        str(p.relative_to(folder))
        for p in results.rglob("*")
        if p.is_file() and "logs" not in p.parts and "benchmarks" not in p.parts
    ]


def dataset_block(name, input_path, key="batch", extra=""):
    return f"  {name}:\n    input: {input_path}\n    key: {key}\n{extra}"


def workflow_cases(work: Path):
    folder = work / "wf"
    folder.mkdir()
    data = folder / "data"
    data.mkdir()
    small = data / "tiny.h5ad"
    make_adata().write_h5ad(small)
    other = data / "other.h5ad"
    make_adata(seed=3, key="donor").write_h5ad(other)
    settings = "plot: false\nresources:\n  threads: 1\nharmony:\n  max_iter_harmony: 3\n"
    inputs = (small, other)

    # a good run first
    cfg = (
        "datasets:\n"
        + dataset_block("tiny", "data/tiny.h5ad", extra="    label_key: cell_type\n")
        + settings
    )
    RESTORE["config"] = cfg
    (folder / "config.yaml").write_text(cfg)
    rc, text = run_snakemake(folder, "config.yaml")
    produced = folder / "results/tiny/integrated.h5ad"
    problems = []
    if rc != 0:
        problems.append(f"exit {rc}: {text.strip().splitlines()[-1] if text.strip() else ''}")
    for file in (
        "integrated.h5ad",
        "convergence.tsv",
        "summary.json",
        "params.yaml",
        "mixing_metrics.html",
    ):
        if not (folder / "results/tiny" / file).is_file():
            problems.append(f"missing {file}")
    record(
        "workflow",
        "baseline: one tiny dataset",
        "exit 0, every documented output",
        "ok" if not problems else "; ".join(problems),
        not problems,
    )

    rc2, text2 = run_snakemake(folder, "config.yaml")
    nothing = rc2 == 0 and re.search(r"Nothing to be done", text2) is not None
    record(
        "workflow",
        "unchanged rerun does nothing",
        "exit 0, nothing to be done",
        "nothing to be done" if nothing else f"exit {rc2}; jobs ran",
        nothing,
    )

    keep = [produced]
    wf_error(
        "misspelled batch column, after a good run (old results kept)",
        folder,
        "datasets:\n" + dataset_block("tiny", "data/tiny.h5ad", key="bacth") + settings,
        r"bacth",
        inputs,
        keep,
    )
    wf_error(
        "basis that is not in obsm",
        folder,
        "datasets:\n"
        + dataset_block("tiny", "data/tiny.h5ad", extra="    basis: X_scvi\n")
        + settings,
        r"X_scvi",
        inputs,
        keep,
    )
    wf_error(
        "label_key that is not in obs",
        folder,
        "datasets:\n"
        + dataset_block("tiny", "data/tiny.h5ad", extra="    label_key: celltype\n")
        + settings,
        r"celltype",
        inputs,
        keep,
    )
    wf_error(
        "input file missing",
        folder,
        "datasets:\n" + dataset_block("tiny", "data/tiny_missing.h5ad") + settings,
        r"tiny_missing",
        inputs,
        keep,
    )
    wf_error(
        "input is not an h5ad",
        folder,
        "datasets:\n" + dataset_block("tiny", "config.yaml") + settings,
        r"config\.yaml",
        inputs,
        keep,
    )
    wf_error(
        "misspelled harmony key (thetta)",
        folder,
        "datasets:\n" + dataset_block("tiny", "data/tiny.h5ad") + settings + "  thetta: 2.0\n",
        r"thetta",
        inputs,
        keep,
    )
    wf_error(
        "misspelled top-level key (dataset:)",
        folder,
        "dataset:\n" + dataset_block("tiny", "data/tiny.h5ad") + settings,
        r"dataset",
        inputs,
        keep,
    )
    wf_error(
        "misspelled dataset key (imput:)",
        folder,
        "datasets:\n  tiny:\n    imput: data/tiny.h5ad\n    key: batch\n" + settings,
        r"imput|input",
        inputs,
        keep,
    )
    wf_error(
        "theta written as 1e-4 (YAML text)",
        folder,
        "datasets:\n"
        + dataset_block("tiny", "data/tiny.h5ad")
        + settings
        + "  tol_harmony: 1e-4\n",
        r"tol_harmony",
        inputs,
        keep,
    )
    wf_error(
        "negative sigma",
        folder,
        "datasets:\n" + dataset_block("tiny", "data/tiny.h5ad") + settings + "  sigma: -0.1\n",
        r"sigma",
        inputs,
        keep,
    )
    wf_error(
        "random_state 2**32",
        folder,
        "datasets:\n"
        + dataset_block("tiny", "data/tiny.h5ad")
        + settings
        + "  random_state: 4294967296\n",
        r"random_state",
        inputs,
        keep,
    )
    wf_error(
        "adjusted_basis equal to basis",
        folder,
        "datasets:\n"
        + dataset_block("tiny", "data/tiny.h5ad", extra="    adjusted_basis: X_pca\n")
        + settings,
        r"adjusted_basis",
        inputs,
        keep,
    )
    wf_error(
        "key listed twice",
        folder,
        "datasets:\n" + dataset_block("tiny", "data/tiny.h5ad", key="[batch, batch]") + settings,
        r"batch",
        inputs,
        keep,
        job_started_ok=False,
    )
    wf_error(
        "duplicate dataset names",
        folder,
        "datasets:\n"
        + dataset_block("tiny", "data/tiny.h5ad")
        + dataset_block("tiny", "data/other.h5ad", key="donor")
        + settings,
        r"tiny.*(duplicate|twice|more than once)|(duplicate|twice).*tiny",
        inputs,
        keep,
    )
    wf_error("empty datasets", folder, "datasets: {}\n" + settings, r"datasets", inputs, keep)
    wf_error("datasets: null", folder, "datasets:\n" + settings, r"datasets", inputs, keep)
    wf_error(
        "dataset name with a '/'",
        folder,
        "datasets:\n" + dataset_block("a/b", "data/tiny.h5ad") + settings,
        r"a/b|name",
        inputs,
        keep,
    )
    wf_error(
        "params with an unknown key",
        folder,
        "datasets:\n"
        + dataset_block("tiny", "data/tiny.h5ad", extra="    params:\n      n_cluster: 5\n")
        + settings,
        r"n_cluster",
        inputs,
        keep,
    )
    wf_error(
        "device: tpu",
        folder,
        "datasets:\n" + dataset_block("tiny", "data/tiny.h5ad") + settings + "device: tpu\n",
        r"device",
        inputs,
        keep,
    )
    wf_error(
        "config that is not a mapping",
        folder,
        "- just\n- a list\n",
        r"config|mapping|object",
        inputs,
        keep,
    )

    # no --configfile
    expected = "non-zero exit naming --configfile"
    rc, text = run_snakemake(folder, None)
    ok = rc != 0 and "--configfile" in text and "Traceback" not in text
    record(
        "workflow",
        "no --configfile",
        expected,
        f"exit {rc}: "
        + next(
            (line for line in text.splitlines() if "configfile" in line),
            text.strip().splitlines()[-1] if text.strip() else "",
        ),
        ok,
    )

    # two datasets, one good and one with a NaN-bearing key: the good one must not be lost
    bad = data / "nan_key.h5ad"
    nan_key = make_adata()
    nan_key.obs["batch"] = nan_key.obs["batch"].where(np.arange(nan_key.n_obs) != 3)
    nan_key.write_h5ad(bad)
    cfg = RESTORE["config"].replace(
        "datasets:\n", "datasets:\n" + dataset_block("nan_key", "data/nan_key.h5ad"), 1
    )
    wf_error(
        "dataset with NaN in its key column (found in its job; the other dataset's results kept)",
        folder,
        cfg,
        r"missing value",
        (*inputs, bad),
        keep,
        job_started_ok=True,
    )


# ---------------------------------------------------------------------------------------------


def write_results(seconds: float):
    tried = len(CASES)
    passed = sum(c.passed for c in CASES)
    lost = sum(c.lost for c in CASES)
    by_entry = {}
    for c in CASES:
        t, p = by_entry.get(c.entry, (0, 0))
        by_entry[c.entry] = (t + 1, p + c.passed)
    lines = [
        "# Adversarial pass: results",
        "",
        "Written by `tests/adversarial/run_pass.py` (rerun it to refresh this file). A case passes",
        "when a bad input gets a clear error (exception catchable as `ValueError` from the API;",
        "exit code 2, or the documented code, and one `harmony-step: error:` line from the command;",
        "a failed run naming the problem from the workflow) with no output, no temporary file and",
        "the input untouched, or when an unusual but valid input gets a correct result.",
        '"Data lost" means an input or an earlier output was changed or removed.',
        "",
        f"**{tried} cases: {passed} passed, {tried - passed} failed, {lost} lost data** "
        f"({', '.join(f'{e}: {p}/{t}' for e, (t, p) in by_entry.items())}; {seconds:.0f} s).",
        "",
        "| # | entry | case | expected | what happened | passed | data lost |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(text):
        return str(text).replace("|", "\\|").replace("\n", " ")

    for i, c in enumerate(CASES, 1):
        lines.append(
            f"| {i} | {c.entry} | {cell(c.name)} | {cell(c.expected)} | {cell(c.happened)} | "
            f"{'yes' if c.passed else '**no**'} | {'**yes**' if c.lost else 'no'} |"
        )
    RESULTS_MD.write_text("\n".join(lines) + "\n")
    return tried, passed, lost


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["api", "command", "workflow"], action="append")
    parser.add_argument("--no-write", action="store_true", help="do not write results.md")
    args = parser.parse_args()
    chosen = args.only or ["api", "command", "workflow"]
    start = time.time()
    work = Path(tempfile.mkdtemp(prefix="harmony-step-adversarial-"))
    WORK["path"] = work
    try:
        for entry, function in (
            ("api", api_cases),
            ("command", command_cases),
            ("workflow", workflow_cases),
        ):
            if entry in chosen:
                try:
                    function(work)
                except Exception:
                    record(
                        entry,
                        "the pass itself",
                        "no crash",
                        traceback.format_exc().splitlines()[-1],
                        False,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.time() - start
    if args.no_write:
        tried, passed, lost = len(CASES), sum(c.passed for c in CASES), sum(c.lost for c in CASES)
    else:
        tried, passed, lost = write_results(seconds)
    print(
        f"\ncases tried: {tried}, passed: {passed}, failed: {tried - passed}, data lost: {lost} ({seconds:.0f} s)"
    )
    for c in CASES:
        if not c.passed:
            print(f"  FAILED [{c.entry}] {c.name}: {c.happened}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
