"""Kernel caches another user created: the package repoints them to this user's own folders.

The checks run in a child process as another user: as root (CI), as ``nobody`` through
``setpriv``; otherwise as this user, with the shared folders made read-only (root would ignore
that).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from harmony_step import _caches

NOBODY = 65534

# Imports the package, then compiles and caches one numba function: numba fails here when its
# cache folder is read-only ("no locator available").
CHILD = textwrap.dedent(
    """
    import json, os, sys
    import harmony_step
    from numba import njit

    @njit(cache=True)
    def plus_one(x):
        return x + 1

    assert plus_one(1) == 2
    print(json.dumps({name: os.environ.get(name) for name in sys.argv[1:]}))
    """
)


@pytest.fixture
def shared_tmp():
    """A world-writable folder under the system's /tmp, as a container's or a host's /tmp is
    (pytest's own tmp_path is private to this user)."""
    folder = Path(tempfile.mkdtemp(prefix="harmony-step-caches-"))
    folder.chmod(0o1777)
    yield folder
    for path in [folder, *folder.rglob("*")]:  # folders made read-only for the child
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(folder)


def _as_other_user(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to run the child as another user"
        command = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _made_by_someone_else(folder: Path) -> None:
    """``folder`` with a package subfolder, not writable by the child's user."""
    (folder / "_core_0123").mkdir(parents=True)
    for path in (folder / "_core_0123", folder):
        path.chmod(0o755 if os.geteuid() == 0 else 0o555)


def test_read_only_caches_are_replaced_by_the_users_own(shared_tmp):
    cache = shared_tmp / "harmony-step-cache"
    cache.mkdir(mode=0o1777)
    cache.chmod(0o1777)
    numba_dir, cupy_dir = cache / "numba", cache / "cupy"
    _made_by_someone_else(numba_dir)
    _made_by_someone_else(cupy_dir)
    # read-only, as an installed package is: numba cannot cache beside it
    code = shared_tmp / "code"
    code.mkdir()
    script = code / "child.py"
    script.write_text(CHILD)
    script.chmod(0o644)
    code.chmod(0o755 if os.geteuid() == 0 else 0o555)
    env = {
        **os.environ,
        "NUMBA_CACHE_DIR": str(numba_dir),
        "CUPY_CACHE_DIR": str(cupy_dir),
        "MPLCONFIGDIR": str(cache / "matplotlib"),  # not there yet, and creatable: kept
        "PYTHONPATH": str(Path(_caches.__file__).parents[1]),
    }
    names = ["NUMBA_CACHE_DIR", "CUPY_CACHE_DIR", "MPLCONFIGDIR"]
    result = _as_other_user([sys.executable, str(script), *names], env)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    uid = NOBODY if os.geteuid() == 0 else os.getuid()
    assert seen == {
        "NUMBA_CACHE_DIR": f"{numba_dir}-{uid}",
        "CUPY_CACHE_DIR": f"{cupy_dir}-{uid}",
        "MPLCONFIGDIR": str(cache / "matplotlib"),
    }
    assert any(Path(f"{numba_dir}-{uid}").rglob("*.nbi"))  # numba cached there
    assert list(numba_dir.rglob("*.nbi")) == []


def test_usable_caches_and_unset_variables_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    assert _caches.use_writable_caches() == {}
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "numba")
    assert "MPLCONFIGDIR" not in os.environ


def test_a_folder_that_cannot_be_created_is_unusable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert not _caches.usable(blocker / "cache")
    assert _caches.usable(tmp_path / "a" / "b")
