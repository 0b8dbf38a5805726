"""Loaders for the peer implementations measured beside harmony-step.

rapids-singlecell's package ``__init__`` pulls in cuML, which its Harmony code does not use; the
Harmony module is imported on its own here so the peer runs without a full RAPIDS install.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import types


@functools.cache
def rapids_singlecell_harmony():
    """``rapids_singlecell.pp.harmony_integrate`` without importing the package's ``__init__``."""
    try:
        import dask.array
    except ImportError:  # only the name dask.array.Array is referenced
        dask, dask_array = types.ModuleType("dask"), types.ModuleType("dask.array")
        dask_array.Array = type("Array", (), {})
        dask.array = dask_array
        sys.modules.update({"dask": dask, "dask.array": dask_array})
    root = os.path.dirname(importlib.util.find_spec("rapids_singlecell").origin)
    for name, path in (
        ("rapids_singlecell", root),
        ("rapids_singlecell.preprocessing", os.path.join(root, "preprocessing")),
    ):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
    module = importlib.import_module("rapids_singlecell.preprocessing._harmony_integrate")
    return module.harmony_integrate


def rapids_singlecell_version() -> str:
    from importlib.metadata import version

    for dist in ("rapids-singlecell-cu13", "rapids-singlecell-cu12", "rapids-singlecell"):
        try:
            return version(dist)
        except Exception:
            continue
    return "unknown"
