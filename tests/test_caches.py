"""Kernel caches that are not this user's own: the package repoints them to folders that are.

The checks run in a child process as another user: as root (CI), as ``nobody`` through
``setpriv``, so that root can make folders of other owners for it. Without root, the checks that
need a folder of another owner are skipped (they say so); the read-only case runs with a folder
made read-only instead.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from harmony_step import _caches

NOBODY = 65534
AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not AS_ROOT, reason="needs root, to give the child folders of another owner"
)
NAMES = ["NUMBA_CACHE_DIR", "CUPY_CACHE_DIR", "MPLCONFIGDIR"]

# Imports the package (numba first when asked), then compiles and caches one numba function: numba
# fails here when its cache folder is read-only ("no locator available").
CHILD = textwrap.dedent(
    """
    import json, os, sys
    if sys.argv[1] == "numba-first":
        import numba
    import harmony_step
    from numba import njit

    @njit(cache=True)
    def plus_one(x):
        return x + 1

    assert plus_one(1) == 2
    print(json.dumps({name: os.environ.get(name) for name in sys.argv[2:]}))
    """
)
IMPORT_ONLY = "import harmony_step, json, os, sys; print(json.dumps({n: os.environ.get(n) for n in sys.argv[1:]}))"


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


def _child_uid() -> int:
    return NOBODY if AS_ROOT else os.getuid()


def _run_child(arguments: list[str], env: dict[str, str], cwd: Path | None = None) -> dict:
    """Run python with ``arguments`` as the child's user; returns the JSON it printed last."""
    command = [sys.executable, *arguments]
    if AS_ROOT:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to run the child as another user"
        command = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    env = {**os.environ, "PYTHONPATH": str(Path(_caches.__file__).parents[1]), **env}
    result = subprocess.run(
        command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def _read_only_code(shared_tmp: Path) -> Path:
    """The child script in a folder it cannot write, as an installed package's is: numba cannot
    cache beside it."""
    code = shared_tmp / "code"
    code.mkdir()
    script = code / "child.py"
    script.write_text(CHILD)
    script.chmod(0o644)
    code.chmod(0o755 if AS_ROOT else 0o555)
    return script


def _not_the_childs(folder: Path) -> None:
    """``folder`` with a package subfolder in it, not the child's: another owner's (root's) when
    running as root, else read-only."""
    (folder / "_core_0123").mkdir(parents=True)
    for path in (folder / "_core_0123", folder):
        path.chmod(0o755 if AS_ROOT else 0o555)


@pytest.mark.parametrize("order", ["package-first", "numba-first"])
def test_caches_of_another_user_are_replaced_by_the_users_own(shared_tmp, order):
    cache = shared_tmp / "harmony-step-cache"
    cache.mkdir()
    cache.chmod(0o1777)
    numba_dir, cupy_dir = cache / "numba", cache / "cupy"
    _not_the_childs(numba_dir)
    _not_the_childs(cupy_dir)
    script = _read_only_code(shared_tmp)
    env = {
        "NUMBA_CACHE_DIR": str(numba_dir),
        "CUPY_CACHE_DIR": str(cupy_dir),
        "MPLCONFIGDIR": str(cache / "matplotlib"),  # not there yet: made, and kept
    }
    seen = _run_child([str(script), order, *NAMES], env)
    uid = _child_uid()
    assert seen == {
        "NUMBA_CACHE_DIR": f"{numba_dir}-{uid}",
        "CUPY_CACHE_DIR": f"{cupy_dir}-{uid}",
        "MPLCONFIGDIR": str(cache / "matplotlib"),
    }
    assert any(Path(f"{numba_dir}-{uid}").rglob("*.nbi"))  # numba cached there
    assert list(numba_dir.rglob("*.nbi")) == []
    made = (cache / "matplotlib").stat()
    assert made.st_uid == uid
    assert stat.S_IMODE(made.st_mode) == 0o700


@needs_root
def test_a_writable_folder_of_another_user_is_not_used(shared_tmp):
    """Folders that someone else made and left writable, at the configured path and at the
    per-user one beside it (predictable names): numba would load what they put there."""
    cache = shared_tmp / "cache"
    cache.mkdir()
    cache.chmod(0o1777)
    for planted in (cache / "numba", cache / f"numba-{NOBODY}"):
        planted.mkdir()
        planted.chmod(0o777)
    personal = shared_tmp / "tmp"
    personal.mkdir()
    personal.chmod(0o1777)
    script = _read_only_code(shared_tmp)
    env = {"NUMBA_CACHE_DIR": str(cache / "numba"), "TMPDIR": str(personal)}
    seen = _run_child([str(script), "package-first", "NUMBA_CACHE_DIR"], env)
    own = personal / f"harmony-step-{NOBODY}" / "numba"
    assert seen == {"NUMBA_CACHE_DIR": str(own)}
    assert any(own.rglob("*.nbi"))
    assert stat.S_IMODE(own.parent.stat().st_mode) == 0o700


@needs_root
@pytest.mark.parametrize(
    ("value", "cwd"),
    [("/", None), (".", "/"), ("{locked}/numba", None), ("{file}", None), ("{file}/numba", None)],
)
def test_paths_that_cannot_serve_give_way_to_a_folder_of_the_user(shared_tmp, value, cwd):
    """The file system's root, a folder the child cannot enter, a file, a path through a file:
    the import works and the variable names a folder of the child's own."""
    locked = shared_tmp / "locked"
    locked.mkdir(mode=0o700)  # root's, not enterable by the child
    a_file = shared_tmp / "a-file"
    a_file.write_text("")
    personal = shared_tmp / "tmp"
    personal.mkdir()
    personal.chmod(0o1777)
    value = value.format(locked=locked, file=a_file)
    env = {"NUMBA_CACHE_DIR": value, "TMPDIR": str(personal)}
    seen = Path(_run_child(["-c", IMPORT_ONLY, "NUMBA_CACHE_DIR"], env, cwd=cwd)["NUMBA_CACHE_DIR"])
    assert seen.is_relative_to(shared_tmp)
    assert seen.stat().st_uid == NOBODY
    assert stat.S_IMODE(seen.stat().st_mode) == 0o700


ATTACKER = 4321  # another user, who may write where the planted folders let him


def _plant_unguarded_parent(shared: Path) -> Path:
    """A folder that another user owns and anyone may write, without the sticky bit: the
    attacker could rename the cache folder made in it and put his own in its place."""
    evil = shared / "evil"
    evil.mkdir()
    os.chown(evil, ATTACKER, ATTACKER)
    evil.chmod(0o777)
    return evil / "numba"


def _plant_everything(shared: Path) -> Path:
    """The same, and the per-user folder in the temporary folder taken too."""
    taken = shared / "tmp" / f"harmony-step-{NOBODY}"
    taken.mkdir()
    os.chown(taken, ATTACKER, ATTACKER)
    taken.chmod(0o777)
    return _plant_unguarded_parent(shared)


def _plant_link_inside(shared: Path) -> Path:
    """The child's own folder, holding a link (to the attacker's folder) where numba looks."""
    folder, elsewhere = shared / "own" / "numba", shared / "elsewhere"
    folder.mkdir(parents=True)
    elsewhere.mkdir()
    (folder / "_core_0123").symlink_to(elsewhere)
    for path in (folder.parent, folder):
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
        path.chmod(0o700)
    return folder


def _plant_group_writable(shared: Path) -> Path:
    """The child's own folder, writable by its group, which other users may share (nogroup)."""
    folder = shared / "grouped" / "numba"
    folder.mkdir(parents=True)
    os.chown(folder, NOBODY, NOBODY)
    folder.chmod(0o770)
    return folder


@needs_root
@pytest.mark.parametrize(
    "plant",
    [_plant_unguarded_parent, _plant_everything, _plant_link_inside, _plant_group_writable],
    ids=["unguarded-parent", "every-name-taken", "link-inside", "group-writable"],
)
def test_folders_others_could_write_or_move_are_never_used(shared_tmp, plant):
    """Numba unpickles its cache: the variable ends at a folder private to the child, never at
    one the attacker can reach, whatever he planted."""
    personal = shared_tmp / "tmp"
    personal.mkdir()
    personal.chmod(0o1777)
    planted = plant(shared_tmp)
    script = _read_only_code(shared_tmp)
    env = {"NUMBA_CACHE_DIR": str(planted), "TMPDIR": str(personal)}
    chosen = Path(
        _run_child([str(script), "package-first", "NUMBA_CACHE_DIR"], env)["NUMBA_CACHE_DIR"]
    )
    assert chosen != planted
    assert chosen.is_relative_to(shared_tmp)
    if chosen.name.startswith(f"harmony-step-{NOBODY}-"):  # the last resort: this run's own
        assert chosen.parent == personal
        assert not chosen.exists()  # removed when the run ended
        return
    for folder in [chosen, *chosen.parents]:
        info = folder.lstat()
        assert info.st_uid in (0, NOBODY), folder
        assert info.st_mode & stat.S_ISVTX or not info.st_mode & 0o022, folder
        if folder == shared_tmp:
            break
    assert any(chosen.rglob("*.nbi"))


USERNS_PROBE = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    spec = importlib.util.spec_from_file_location("caches", sys.argv[1])
    caches = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(caches)
    changed = caches.use_own_caches()
    print(json.dumps({"changed": changed, "uid_map": open("/proc/self/uid_map").read().split()}))
    """
)


@needs_root
def test_in_a_user_namespace_without_root_the_usual_folders_are_kept():
    """Apptainer's default: only the user's uid is mapped, so root's folders (/, /tmp) show the
    overflow uid. The usual per-user folder under /tmp is still kept, not replaced run by run."""
    unshare, python = shutil.which("unshare"), "/usr/bin/python3"
    folder = Path(tempfile.gettempdir()) / f"harmony-step-userns-{os.getpid()}"
    command = [shutil.which("setpriv"), "--reuid=1", "--regid=1", "--clear-groups", unshare,
               "--user", "--map-user=1", "--map-group=1", python, "-c", USERNS_PROBE,
               _caches.__file__]  # fmt: skip
    env = {"PATH": os.environ["PATH"], "NUMBA_CACHE_DIR": str(folder / "numba")}
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0 and "unshare" in result.stderr:
            pytest.skip(f"no user namespaces here: {result.stderr.strip()}")
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
        assert seen["uid_map"][:3] == ["1", "1", "1"]  # root is not mapped
        assert seen["changed"] == {}
        assert (folder / "numba").stat().st_uid == 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@needs_root
def test_a_closed_numba_folder_may_hold_group_writable_folders_of_the_user(shared_tmp):
    """Under umask 002 numba makes its folders group-writable; inside a folder only the user
    can enter, they are still the user's alone, and the cache is kept."""
    folder = shared_tmp / "own" / "numba"
    (folder / "_core_0123").mkdir(parents=True)
    for path, mode in ((folder.parent, 0o700), (folder, 0o700), (folder / "_core_0123", 0o775)):
        os.chown(path, NOBODY, NOBODY)
        path.chmod(mode)
    seen = _run_child(["-c", IMPORT_ONLY, "NUMBA_CACHE_DIR"], {"NUMBA_CACHE_DIR": str(folder)})
    assert seen == {"NUMBA_CACHE_DIR": str(folder)}


def test_usable_caches_and_unset_variables_are_left_alone(tmp_path, monkeypatch):
    mpl = tmp_path / "mpl"
    (mpl / "stylelib").mkdir(parents=True)
    (mpl / "stylelib").chmod(0o555)  # only numba's folder must hold writable folders
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MPLCONFIGDIR", str(mpl))
    try:
        assert _caches.use_own_caches() == {}
    finally:
        (mpl / "stylelib").chmod(0o755)
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "numba")
    monkeypatch.delenv("MPLCONFIGDIR")
    assert _caches.use_own_caches() == {}
    assert "MPLCONFIGDIR" not in os.environ


def test_a_link_or_a_file_is_not_a_folder_of_this_user(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    assert not _caches.private_folder(str(tmp_path / "file"), inside=False)
    assert not _caches.private_folder(str(tmp_path / "file" / "cache"), inside=False)
    assert not _caches.private_folder(str(tmp_path / "dangling"), inside=False)
    assert _caches.private_folder(
        str(tmp_path / "link"), inside=False
    )  # this user's link and folder
    assert _caches.private_folder(str(tmp_path / "a" / "b"), inside=False)  # made
    assert (tmp_path / "a" / "b").is_dir()
