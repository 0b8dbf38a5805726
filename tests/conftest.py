"""Shared test set-up: GPU tests skip (saying so) where CuPy cannot use a GPU; integration suites run from .ci/run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from harmony_step._backend import _cupy_or_reason

    cupy, reason = _cupy_or_reason()
    no_gpu = pytest.mark.skip(reason=f"no usable GPU here: {reason}")
    no_integration = pytest.mark.skip(
        reason="integration suite: needs root and daemons; .ci/run starts them and sets HARMONY_STEP_INTEGRATION=1"
    )
    for item in items:
        if "gpu" in item.keywords and cupy is None:
            item.add_marker(no_gpu)
        if "integration" in item.keywords and os.environ.get("HARMONY_STEP_INTEGRATION") != "1":
            item.add_marker(no_integration)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA
