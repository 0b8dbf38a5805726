"""The Snakemake profiles in workflow/profiles, and the exact sbatch options of a Harmony job.

The sbatch line is not re-derived here: the real Snakemake runs the real workflow with the
slurm-gpu profile and the real Slurm executor plugin, which builds the ``sbatch`` command line and
logs it. Slurm itself is kept out of reach: stand-ins named like its client commands come first on
PATH and refuse every request, as a cluster with no controller would. So the tests behave the same
with or without Slurm installed, can never submit to a real cluster, and every submission fails
harmlessly after its command line has been logged. tests/integration/test_slurm.py runs the same
profile against a real Slurm.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip(
    "snakemake_executor_plugin_slurm",
    reason="the Slurm executor plugin is part of the 'workflow' extra: pip install -e '.[workflow]'",
)

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
PROFILES = REPO / "workflow" / "profiles"
SLURM_PROFILE = PROFILES / "slurm-gpu" / "config.yaml"
LOCAL_PROFILE = PROFILES / "local" / "config.yaml"
EXAMPLE_CONFIG = REPO / "config" / "config.yaml"
BIN = Path(sys.executable).parent
SNAKEMAKE_TIMEOUT_S = 180
# Options of every sbatch call that identify the job rather than request resources.
BOOKKEEPING_OPTIONS = {"--job-name", "--output", "--comment", "-D"}
BOOKKEEPING_FLAGS = {"--parsable", "--export=ALL"}
SBATCH_CALL = re.compile(r"^sbatch call: (sbatch .*)$", re.MULTILINE)
# Every Slurm command the executor plugin may run before or while submitting.
SLURM_COMMANDS = (
    "sbatch",
    "srun",
    "sinfo",
    "squeue",
    "scontrol",
    "scancel",
    "sacct",
    "sacctmgr",
    "sshare",
)


# --- helpers ---------------------------------------------------------------------------------


def write_workdir(workdir: Path, inputs: dict[str, Path]) -> Path:
    """A working directory with the example config, its datasets replaced by ``inputs``."""
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    config["datasets"] = {
        name: {"input": str(path), "key": "donor"} for name, path in inputs.items()
    }
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir


def write_slurm_profile(folder: Path) -> Path:
    """The slurm-gpu profile as a site would use it, minus the container settings.

    Converting the container image needs Apptainer on the submitting machine, before anything
    is submitted; the image does not change what is asked of Slurm. The site settings are
    one the profile's comments describe: a partition for the GPU jobs.
    """
    profile = yaml.safe_load(SLURM_PROFILE.read_text())
    del profile["software-deployment-method"], profile["apptainer-args"]
    profile.setdefault("set-resources", {}).setdefault("harmony", {})["slurm_partition"] = "gpu"
    # Snakemake otherwise waits 40 s for a first status check before it can stop.
    profile["slurm-init-seconds-before-status-checks"] = 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


def refusing_slurm_commands(folder: Path) -> Path:
    """A folder of Slurm client commands that each fail at once, saying that no cluster is here."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in SLURM_COMMANDS:
        command = folder / name
        command.write_text(f"#!/bin/sh\necho '{name}: no Slurm cluster in this test' >&2\nexit 1\n")
        command.chmod(0o755)
    return folder


def snakemake(workdir: Path, *args: str, path_first: Path | None = None):
    """Run the workflow's Snakemake in ``workdir``; stdout and stderr together.

    ``path_first`` is a folder searched before anything else on PATH.
    """
    command = [
        "timeout",
        "-s",
        "KILL",
        str(SNAKEMAKE_TIMEOUT_S),
        str(BIN / "snakemake"),
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config" / "config.yaml"),
        *args,
    ]
    search_path = [str(BIN), os.environ["PATH"]]
    if path_first is not None:
        search_path.insert(0, str(path_first))
    environment = {**os.environ, "PATH": os.pathsep.join(search_path)}
    return subprocess.run(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def resource_options(call: str) -> set[str]:
    """The options of an sbatch command line that request resources, as 'option value' strings."""
    tokens = shlex.split(call.split(" --wrap=", 1)[0])[1:]
    requested = set()
    position = 0
    while position < len(tokens):
        token = tokens[position]
        if token in BOOKKEEPING_FLAGS:
            position += 1
        elif token in BOOKKEEPING_OPTIONS:
            position += 2
        elif "=" in token or position + 1 == len(tokens) or tokens[position + 1].startswith("-"):
            requested.add(token)
            position += 1
        else:
            requested.add(f"{token} {tokens[position + 1]}")
            position += 2
    return requested


def attempted_sbatch_calls(
    tmp_path: Path, inputs: dict[str, Path], params: dict[str, dict] | None = None
) -> dict[tuple[str, int], str]:
    """Each sbatch command line the plugin tried, by (dataset, attempt).

    ``params`` gives datasets their own Harmony parameters (``datasets.NAME.params``).
    """
    workdir = write_workdir(tmp_path / "work", inputs)
    if params:
        config_file = workdir / "config" / "config.yaml"
        config = yaml.safe_load(config_file.read_text())
        for name, values in params.items():
            config["datasets"][name]["params"] = values
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    profile = write_slurm_profile(tmp_path / "profile")
    no_cluster = refusing_slurm_commands(tmp_path / "no-cluster")
    run = snakemake(workdir, "--profile", str(profile), "--verbose", path_first=no_cluster)
    calls = {}
    for call in SBATCH_CALL.findall(run.stdout):
        dataset = re.search(r"--comment rule_harmony_wildcards_(\S+)", call).group(1)
        attempt = int(re.search(r"--attempt (\d+)", call).group(1))
        calls[dataset, attempt] = call
    assert run.returncode != 0, "sbatch should have failed: no Slurm is reachable here"
    assert calls, f"no sbatch command line in the Snakemake output:\n{run.stdout[-4000:]}"
    return calls


# --- the Harmony job's sbatch line -------------------------------------------------------------


def test_harmony_job_asks_for_one_gpu_and_the_configured_cpus(tmp_path, data_dir):
    calls = attempted_sbatch_calls(tmp_path, {"pbmc": data_dir / "pbmc_3500" / "pbmc_3500.h5ad"})

    # 4 threads from the example config; memory and time estimated for a 3.3 MB input (4000 MB +
    # 3 x 4 MB, 30 min + 1); the GPU and the partition from the profile. The retry doubles both.
    assert resource_options(calls["pbmc", 1]) == {
        "--gpus=1",
        "--cpus-per-task=4",
        "--mem 4012",
        "-t 31",
        "-p gpu",
    }
    assert resource_options(calls["pbmc", 2]) == {
        "--gpus=1",
        "--cpus-per-task=4",
        "--mem 8024",
        "-t 62",
        "-p gpu",
    }
    assert set(calls) == {("pbmc", 1), ("pbmc", 2)}


def test_only_datasets_that_run_on_a_gpu_ask_for_one(tmp_path, data_dir):
    pbmc = data_dir / "pbmc_3500" / "pbmc_3500.h5ad"
    calls = attempted_sbatch_calls(
        tmp_path, {"on_gpu": pbmc, "on_cpu": pbmc}, params={"on_cpu": {"device": "cpu"}}
    )

    assert "--gpus=1" in resource_options(calls["on_gpu", 1])
    assert not any(option.startswith("--gpus") for option in resource_options(calls["on_cpu", 1]))
    assert "--cpus-per-task=4" in resource_options(calls["on_cpu", 1])


def test_a_dataset_spread_over_two_gpus_asks_for_two_and_their_processes_memory(tmp_path, data_dir):
    pbmc = data_dir / "pbmc_3500" / "pbmc_3500.h5ad"
    calls = attempted_sbatch_calls(
        tmp_path, {"two": pbmc, "one": pbmc}, params={"two": {"gpus": 2}}
    )

    # 4012 MB as for one GPU, plus 3000 MB for the second GPU's process
    assert resource_options(calls["two", 1]) == {
        "--gpus=2",
        "--cpus-per-task=4",
        "--mem 7012",
        "-t 31",
        "-p gpu",
    }
    assert "--gpus=1" in resource_options(calls["one", 1])


def test_harmony_memory_and_time_grow_with_the_input_size(tmp_path, data_dir):
    # A real h5ad grown to 20 GiB with a sparse tail: the check before the run reads its names,
    # Snakemake its size, and the job never starts.
    large_input = tmp_path / "large.h5ad"
    shutil.copyfile(data_dir / "pbmc_3500" / "pbmc_3500.h5ad", large_input)
    with large_input.open("r+b") as handle:
        handle.truncate(20 * 1024**3)

    calls = attempted_sbatch_calls(tmp_path, {"large": large_input})

    # 4000 MB + 3 x 20480 MB; 30 min + 20480 MB / (100 MB per min).
    assert resource_options(calls["large", 1]) == {
        "--gpus=1",
        "--cpus-per-task=4",
        "--mem 65440",
        "-t 235",
        "-p gpu",
    }
    assert resource_options(calls["large", 2]) == {
        "--gpus=1",
        "--cpus-per-task=4",
        "--mem 130880",
        "-t 470",
        "-p gpu",
    }


# --- the profiles as shipped ---------------------------------------------------------------------


def test_slurm_profile_runs_harmony_in_the_container_with_the_gpu_visible():
    profile = yaml.safe_load(SLURM_PROFILE.read_text())

    assert profile["executor"] == "slurm"
    assert profile["software-deployment-method"] == "apptainer"
    assert profile["apptainer-args"] == "--nv"
    # The GPU request is the workflow's (one unless a dataset runs on the CPU), not a fixed one.
    assert "gpu" not in (profile.get("set-resources") or {}).get("harmony", {})
    assert profile["retries"] >= 1
    assert profile["rerun-incomplete"] is True
    assert profile["keep-going"] is True


def test_snakemake_knows_the_container_settings_of_the_slurm_profile():
    # A dry run with the shipped profile would need Apptainer here; the other keys are exercised
    # by the runs above, these two are checked against Snakemake's own options.
    help_text = subprocess.run(
        [str(BIN / "snakemake"), "--help"], stdout=subprocess.PIPE, text=True, check=True
    ).stdout

    methods = re.search(r"--software-deployment-method \{([^}]*)\}", help_text).group(1)
    assert "apptainer" in methods.split(",")
    assert "--apptainer-args" in help_text


def test_snakemake_accepts_the_local_profile_as_shipped(tmp_path, data_dir):
    workdir = write_workdir(tmp_path, {"pbmc": data_dir / "pbmc_3500" / "pbmc_3500.h5ad"})

    run = snakemake(workdir, "--profile", str(LOCAL_PROFILE.parent), "--dry-run")

    assert run.returncode == 0, run.stdout[-4000:]
    assert re.search(r"^harmony\s+1$", run.stdout, re.MULTILINE), run.stdout[-4000:]
