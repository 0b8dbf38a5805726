"""Shared test set-up: GPU tests skip (saying so) where CuPy cannot use a GPU; integration suites run from .ci/run."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

# Each Snakemake start imports the Slurm executor plugin, which asks `scontrol show config` for the
# cluster's MinJobAge (to word a help text). Where no Slurm controller answers, scontrol waits for
# it about 10 s, once per Snakemake run: most of this suite's time. Outside the integration suites,
# which run a real cluster, Slurm's tools get an empty configuration and fail at once; the plugin
# then proceeds as on a machine without Slurm. A SLURM_CONF set by the caller is kept.
if os.environ.get("HARMONY_STEP_INTEGRATION") != "1":
    os.environ.setdefault("SLURM_CONF", os.devnull)


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


@pytest.fixture
def locked_folder(tmp_path):
    """A folder nobody can create files in, root included (chattr +i), or mode 0555 for others."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: cannot make a folder unwritable")
    locked = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if locked.returncode != 0:
        pytest.skip(f"running as root and chattr +i failed: {locked.stderr.strip()}")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)
