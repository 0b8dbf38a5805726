"""The README's commands, run as a new user would: in a fresh copy of the repository, with only
the README's install command (``make example``), in an environment built from scratch.

Slow (it installs harmony-step and its dependencies from the package index into a new virtual
environment, then integrates both bundled datasets), so it is marked ``slow``; the environment is
built once per test session and shared by every test here. Deselect with ``-m "not slow"``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
INSTALL_TIMEOUT_S = 1800


def code_blocks(language: str) -> list[str]:
    """The README's fenced code blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.M | re.S)


def readme_command(language: str, pattern: str) -> str:
    """The one README command line (comment stripped) that matches ``pattern``."""
    lines = [
        line.split("#", 1)[0].strip()
        for block in code_blocks(language)
        for line in block.splitlines()
        if re.search(pattern, line)
    ]
    assert len(lines) == 1, f"expected one README line matching {pattern!r}, found {lines}"
    return lines[0]


def clean_environment(clone: Path) -> dict[str, str]:
    """The environment of a new shell: nothing of the test run's Python leaks in."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}
    }
    env["PATH"] = os.pathsep.join(
        entry
        for entry in env.get("PATH", "").split(os.pathsep)
        if entry and Path(entry).resolve() != Path(sys.executable).parent.resolve()
    )
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(command: str, clone: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        shell=True,
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="session")
def fresh_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's files as a clone has them (tracked and new, nothing ignored)."""
    if shutil.which("git") is None or shutil.which("make") is None:
        pytest.skip("needs git and make")
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=False,
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    clone = tmp_path_factory.mktemp("fresh") / "harmony-step"
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if source.is_file():
            target = clone / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return clone


@pytest.fixture(scope="session")
def example(fresh_clone: Path) -> tuple[Path, dict[str, str], subprocess.CompletedProcess[str]]:
    """``make example`` in the fresh copy: builds .venv from nothing, then runs the workflow."""
    command = readme_command("bash", r"^make example\b")
    env = clean_environment(fresh_clone)
    # No GPU libraries (the test machines have no GPU) and two cores, as on a small laptop.
    done = run(f"{command} CUDA=none CORES=2", fresh_clone, env)
    return fresh_clone, env, done


def test_make_example_runs_and_converges(example) -> None:
    clone, _env, done = example
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    for dataset in ("pbmc_3500", "cell_lines"):
        folder = clone / "results" / dataset
        for name in ("integrated.h5ad", "convergence.tsv", "summary.json", "params.yaml",
                     "mixing_metrics.html", "convergence.png", "embedding.png"):  # fmt: skip
            assert (folder / name).is_file(), f"{dataset}: {name}"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["converged"] is True, dataset
        log = (clone / "results" / "logs" / "harmony" / f"{dataset}.log").read_text()
        assert "warning" not in log, log
    # make example ends by telling where the results are and how to build the report.
    assert "--report report.html" in done.stdout


def test_report_command_works_after_make_example(example) -> None:
    clone, env, done = example
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    command = readme_command("bash", r"--report report\.html")
    env = {**env, "PATH": f"{clone / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"}
    report = run(command, clone, env)
    assert report.returncode == 0, (report.stdout + report.stderr)[-6000:]
    html = (clone / "report.html").read_text()
    assert html.count("data:image/png") >= 4  # two pictures per dataset


def test_python_example_runs(example) -> None:
    clone, env, done = example
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    (block,) = code_blocks("python")
    script = clone / "readme_example.py"
    script.write_text(block + '\nprint(adata.obsm["X_pca_harmony"].shape)\n')
    result = run(f"{clone / '.venv' / 'bin' / 'python'} {script.name}", clone, env)
    assert result.returncode == 0, result.stderr[-6000:]
    assert result.stdout.strip().splitlines()[-1] == "(9478, 20)"
