"""The Snakemake workflow, run for real on the CI configuration in .test/ (pbmc_3500 on the CPU).

Each run happens in a temporary working directory holding a copy of .test/config/config.yaml with
absolute input paths, so the repository is never written to. ``snakemake`` and ``harmony-step``
are taken from the environment running the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
import yaml

from harmony_step._params import PARAMETERS, HarmonyParams
from tests.reference import REPRODUCIBLE_FILES, RESULT_FILES, SUMMARY_KEYS

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
SCHEMA_FILE = REPO / "workflow" / "schemas" / "config.schema.yaml"
EXAMPLE_CONFIG = REPO / "config" / "config.yaml"
TEST_CONFIG = REPO / ".test" / "config" / "config.yaml"
BIN = Path(sys.executable).parent

DATASETS = ("pbmc", "pbmc_theta1")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- helpers --------------------------------------------------------------------------------------


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_FILE.read_text())


def write_workdir(
    workdir: Path, edit: Callable[[dict], None] | None = None, config_file: Path = TEST_CONFIG
) -> Path:
    """A working directory with the .test config, inputs made absolute, optionally edited."""
    config = yaml.safe_load(config_file.read_text())
    base = REPO if config_file == EXAMPLE_CONFIG else config_file.parents[1]
    for dataset in config["datasets"].values():
        dataset["input"] = str((base / dataset["input"]).resolve())
    if edit is not None:
        edit(config)
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir


def edit_config(workdir: Path, edit: Callable[[dict], None]) -> None:
    path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def snakemake(workdir: Path, *args: str, succeed: bool = True) -> str:
    """Run snakemake on the workflow in ``workdir``; return stdout and stderr together."""
    pytest.importorskip(
        "snakemake", reason="needs the 'workflow' extra: pip install -e '.[test,workflow]'"
    )
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE)]
    command += ["--directory", str(workdir), "--cores", "2"]
    if "--configfile" not in args:
        command += ["--configfile", str(workdir / "config" / "config.yaml")]
    command += args
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=900, check=False
    )
    output = done.stdout + done.stderr
    if succeed:
        assert done.returncode == 0, f"snakemake {' '.join(args)} failed:\n{output}"
    else:
        assert done.returncode != 0, f"snakemake {' '.join(args)} should have failed:\n{output}"
    return output


def result(workdir: Path, dataset: str, filename: str) -> Path:
    return workdir / "results" / dataset / filename


def modification_times(workdir: Path, dataset: str) -> dict[str, int]:
    return {name: result(workdir, dataset, name).stat().st_mtime_ns for name in RESULT_FILES}


def planned_harmony_jobs(dry_run_output: str) -> list[str]:
    """Datasets of the ``harmony`` jobs a dry run would execute, in the order listed."""
    jobs = re.findall(
        r"^rule harmony:\n(?:    .*\n)*?    wildcards: dataset=(\S+)", dry_run_output, re.M
    )
    return sorted(jobs)


def expected_settings(dataset: str) -> dict[str, Any]:
    """The Harmony settings a dataset of the .test config must run with."""
    config = yaml.safe_load(TEST_CONFIG.read_text())
    settings = {spec.name: spec.default for spec in PARAMETERS}
    settings["device"] = config["device"]
    settings.update(config["harmony"])
    settings.update(config["datasets"][dataset].get("params", {}))
    return settings


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory in which the .test workflow has run to completion."""
    workdir = write_workdir(tmp_path_factory.mktemp("workflow"))
    snakemake(workdir)
    return workdir


# --- a complete run -------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", DATASETS)
def test_integrated_h5ad_holds_the_corrected_embedding(finished: Path, dataset: str) -> None:
    import anndata

    source = anndata.read_h5ad(
        yaml.safe_load((finished / "config" / "config.yaml").read_text())["datasets"][dataset][
            "input"
        ]
    )
    integrated = anndata.read_h5ad(result(finished, dataset, "integrated.h5ad"))
    corrected = np.asarray(integrated.obsm["X_pca_harmony"])
    assert corrected.shape == source.obsm["X_pca"].shape
    assert np.all(np.isfinite(corrected))
    assert list(integrated.obs_names) == list(source.obs_names)
    assert list(integrated.obs["donor"]) == list(source.obs["donor"])
    # A corrected embedding that equals its input would mean Harmony never ran.
    assert not np.allclose(corrected, source.obsm["X_pca"], atol=1e-3)


@pytest.mark.parametrize("dataset", DATASETS)
def test_convergence_table_has_one_row_per_iteration(finished: Path, dataset: str) -> None:
    import pandas as pd

    table = pd.read_csv(result(finished, dataset, "convergence.tsv"), sep="\t")
    assert {"round", "iteration", "objective"} <= set(table.columns), list(table.columns)
    assert len(table) >= 2
    assert np.all(np.isfinite(table["objective"]))
    assert table["round"].max() <= expected_settings(dataset)["max_iter_harmony"]


@pytest.mark.parametrize("dataset", DATASETS)
def test_summary_records_the_run(finished: Path, dataset: str) -> None:
    summary = json.loads(result(finished, dataset, "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS, sorted(SUMMARY_KEYS - set(summary))
    settings = expected_settings(dataset)
    assert summary["parameters"]["theta"] == pytest.approx(settings["theta"])
    assert summary["parameters"]["n_clusters"] == settings["n_clusters"]
    assert summary["device"]["kind"] == "cpu"
    assert isinstance(summary["converged"], bool)
    assert 1 <= summary["n_rounds"] <= settings["max_iter_harmony"]
    source = yaml.safe_load((finished / "config" / "config.yaml").read_text())["datasets"][dataset]
    assert summary["input_sha256"] == hashlib.sha256(Path(source["input"]).read_bytes()).hexdigest()


@pytest.mark.parametrize("dataset", DATASETS)
def test_plot_params_log_and_benchmark_are_written(finished: Path, dataset: str) -> None:
    with result(finished, dataset, "convergence.png").open("rb") as plot:
        assert plot.read(8) == PNG_SIGNATURE
    settings = yaml.safe_load(result(finished, dataset, "params.yaml").read_text())
    assert settings == expected_settings(dataset)
    assert (finished / "results" / "logs" / "harmony" / f"{dataset}.log").is_file()
    benchmark = (finished / "results" / "benchmarks" / "harmony" / f"{dataset}.tsv").read_text()
    assert benchmark.split("\t", 1)[0] == "s"


# --- reruns ---------------------------------------------------------------------------------------


def test_unchanged_rerun_runs_nothing(finished: Path) -> None:
    before = {dataset: modification_times(finished, dataset) for dataset in DATASETS}
    output = snakemake(finished)
    assert "Nothing to be done" in output, output
    assert {dataset: modification_times(finished, dataset) for dataset in DATASETS} == before


def copy_of(finished: Path, target: Path) -> Path:
    """A copy of a finished working directory, with Snakemake's records and file times."""
    shutil.copytree(finished, target, symlinks=True)
    return target


def test_changed_dataset_parameter_reruns_only_that_dataset(finished: Path, tmp_path: Path) -> None:
    workdir = copy_of(finished, tmp_path / "copy")
    before = {dataset: modification_times(workdir, dataset) for dataset in DATASETS}

    def lower_theta(config: dict) -> None:
        config["datasets"]["pbmc_theta1"]["params"]["theta"] = 0.5

    edit_config(workdir, lower_theta)
    plan = snakemake(workdir, "--dry-run")
    assert planned_harmony_jobs(plan) == ["pbmc_theta1"], plan
    assert "Params have changed since last execution" in plan

    snakemake(workdir)
    assert modification_times(workdir, "pbmc") == before["pbmc"]
    after = modification_times(workdir, "pbmc_theta1")
    assert all(after[name] > before["pbmc_theta1"][name] for name in RESULT_FILES)
    summary = json.loads(result(workdir, "pbmc_theta1", "summary.json").read_text())
    assert summary["parameters"]["theta"] == pytest.approx(0.5)


def test_changed_shared_parameter_reruns_every_dataset(finished: Path, tmp_path: Path) -> None:
    workdir = copy_of(finished, tmp_path / "copy")

    def raise_sigma(config: dict) -> None:
        config["harmony"]["sigma"] = 0.2

    edit_config(workdir, raise_sigma)
    assert planned_harmony_jobs(snakemake(workdir, "--dry-run")) == sorted(DATASETS)


# --- report, lint, format -------------------------------------------------------------------------


def test_report_shows_metrics_embedding_and_convergence_per_dataset(
    finished: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report.html"
    snakemake(finished, "--report", str(report))
    html = report.read_text()
    # Each plot is embedded as a base64 PNG data URI (iVBORw0KGgo encodes the PNG signature):
    # the convergence plot and the embedding picture of every dataset.
    assert len(re.findall(r"data:image/png;[^\"]*base64,iVBORw0KGgo", html)) == 2 * len(DATASETS)
    for dataset in DATASETS:
        for name in ("convergence.png", "embedding.png", "convergence.tsv", "mixing_metrics.html"):
            assert f"results/{dataset}/{name}" in html, name
    # The captions, rendered for each dataset; none speaks of per-iteration seconds any more.
    assert "iLISI" in html
    assert "before (left" in html
    assert "seconds the iteration took" not in html


@pytest.mark.parametrize("dataset", DATASETS)
def test_mixing_metrics_table_has_before_after_and_meaning(finished: Path, dataset: str) -> None:
    page = result(finished, dataset, "mixing_metrics.html").read_text()
    summary = json.loads(result(finished, dataset, "summary.json").read_text())
    assert f"<h2>{dataset}: mixing before and after Harmony</h2>" in page
    assert "<th>before</th><th>after</th>" in page
    before, after = summary["metrics"]["before"], summary["metrics"]["after"]
    assert f"{before['ilisi_median']:.3f}" in page
    assert f"{after['ilisi_median']:.3f}" in page
    assert "effective number of batches" in page
    # pbmc has no labels: no label metrics, and a hint how to get them
    assert "<td>cLISI (median)</td>" not in page
    assert "set <code>label_key</code>" in page


@pytest.mark.parametrize("dataset", DATASETS)
def test_plots_are_pngs_with_the_dataset_name(finished: Path, dataset: str) -> None:
    for name in ("convergence.png", "embedding.png"):
        assert result(finished, dataset, name).read_bytes()[:8] == PNG_SIGNATURE, name
    log = (finished / "results" / "logs" / "plots" / f"{dataset}.log").read_text()
    assert "Traceback" not in log


def test_rerun_writes_byte_identical_results(finished: Path, tmp_path: Path) -> None:
    workdir = copy_of(finished, tmp_path / "copy")
    before = {
        (dataset, name): result(workdir, dataset, name).read_bytes()
        for dataset in DATASETS
        for name in REPRODUCIBLE_FILES
    }
    output = snakemake(workdir, "--forcerun", "harmony")
    assert len(re.findall(r"^(?:local)?rule harmony:", output, re.M)) == len(DATASETS), output
    for (dataset, name), content in before.items():
        assert result(workdir, dataset, name).read_bytes() == content, f"{dataset}/{name} changed"
    # The timings went to the log and the benchmark file instead.
    log = (workdir / "results" / "logs" / "harmony" / "pbmc.log").read_text()
    assert re.search(r"^harmony-step: timings: read .* total [\d.]+ s", log, re.M), log
    assert re.search(r"^harmony-step: Harmony timings: setup ", log, re.M), log


def test_log_states_the_device_and_why(finished: Path) -> None:
    # .test runs with device: cpu; the log says so in one line, with the reason.
    log = (finished / "results" / "logs" / "harmony" / "pbmc.log").read_text()
    lines = [line for line in log.splitlines() if "device: cpu" in line]
    assert len(lines) == 1, log
    assert "device='cpu' was requested" in lines[0]


@pytest.mark.parametrize("config_file", [TEST_CONFIG, EXAMPLE_CONFIG], ids=["test", "example"])
def test_workflow_passes_snakemake_lint(tmp_path: Path, config_file: Path) -> None:
    output = snakemake(write_workdir(tmp_path, config_file=config_file), "--lint")
    assert "Congratulations, your workflow is in a good condition!" in output


def test_workflow_is_snakefmt_formatted() -> None:
    snakefmt = shutil.which("snakefmt", path=str(BIN)) or shutil.which("snakefmt")
    if snakefmt is None:
        pytest.skip("snakefmt is not installed (it comes with the 'workflow' extra)")
    done = subprocess.run(
        [snakefmt, "--check", str(REPO / "workflow")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_harmony_rule_runs_in_the_versioned_image() -> None:
    pytest.importorskip("snakemake")
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        OutputSettings,
        ResourceSettings,
        StorageSettings,
    )

    image = (REPO / "container" / "IMAGE").read_text().strip()
    with SnakemakeApi(OutputSettings(quiet=True)) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[TEST_CONFIG]),
            storage_settings=StorageSettings(),
            workdir=REPO / ".test",
            snakefile=SNAKEFILE,
        )
        rule = workflow._workflow.get_rule("harmony")
        assert rule.container_img == f"docker://{image}"
        assert rule.conda_env == "../envs/harmony-step.yaml"


# --- resources ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "gpu", "expected"),
    [("cpu", None, 0), ("auto", None, 1), ("gpu", None, 1), ("auto", 2, 2)],
)
def test_gpu_request_follows_device_and_config(
    tmp_path: Path, device: str, gpu: int | None, expected: int
) -> None:
    def set_device(config: dict) -> None:
        config["device"] = device
        config["resources"]["gpu"] = gpu

    plan = snakemake(write_workdir(tmp_path, set_device), "--dry-run")
    requests = re.findall(r"^    resources: .*\bgpu=(\d+)", plan, re.M)
    assert requests == [str(expected)] * len(DATASETS), plan


def test_a_job_asks_for_the_gpus_its_run_is_spread_over(tmp_path: Path) -> None:
    def spread(config: dict) -> None:
        config["device"] = "auto"
        config["gpus"] = 2
        config["datasets"]["pbmc_theta1"].setdefault("params", {})["gpus"] = 3

    plan = snakemake(write_workdir(tmp_path, spread), "--dry-run", "--printshellcmds")
    found = re.findall(r"^    wildcards: dataset=(\S+)\n    resources: .*\bgpu=(\d+)", plan, re.M)
    requests = {dataset: int(gpus) for dataset, gpus in found}
    assert requests == {"pbmc": 2, "pbmc_theta1": 3}, plan
    # the params file handed to harmony-step names the parameter, not the config key
    assert "n_gpus: 2" in plan
    assert "n_gpus: 3" in plan
    assert "gpus: 3\n" not in plan.replace("n_gpus: 3", "")


def test_plot_switched_off_is_neither_drawn_nor_expected(tmp_path: Path) -> None:
    def no_plot(config: dict) -> None:
        config["plot"] = False

    plan = snakemake(write_workdir(tmp_path, no_plot), "--dry-run", "--printshellcmds")
    assert planned_harmony_jobs(plan) == sorted(DATASETS)
    assert "convergence.png" not in plan
    assert "embedding.png" not in plan
    assert "--plot" not in plan
    assert "mixing_metrics.html" in plan
    assert "--summary results/pbmc/summary.json" in plan


# --- whose config, and its inputs checked before any job -----------------------------------------


def test_own_config_runs_exactly_its_datasets_from_any_folder(tmp_path: Path) -> None:
    # The working folder holds the example config/config.yaml, as a clone of the repository does;
    # the user's own file elsewhere names one dataset, and only that one runs.
    workdir = write_workdir(tmp_path / "work", config_file=EXAMPLE_CONFIG)
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["datasets"] = {
        "mine": {
            "input": str(REPO / "tests" / "data" / "pbmc_3500" / "pbmc_3500.h5ad"),
            "key": "donor",
        }
    }
    own = tmp_path / "elsewhere" / "my.yaml"
    own.parent.mkdir()
    own.write_text(yaml.safe_dump(config))
    plan = snakemake(workdir, "--dry-run", "--configfile", str(own))
    assert planned_harmony_jobs(plan) == ["mine"], plan


def test_workflow_runs_as_a_module_of_another_workflow(tmp_path: Path) -> None:
    # What `snakedeploy deploy-workflow` writes, with a local path in place of github(...).
    workdir = write_workdir(tmp_path)
    (workdir / "workflow").mkdir()
    (workdir / "workflow" / "Snakefile").write_text(
        'configfile: "config/config.yaml"\n\n'
        f"module harmony_step:\n    snakefile: {str(SNAKEFILE)!r}\n    config: config\n\n"
        "use rule * from harmony_step\n"
    )
    command = [sys.executable, "-m", "snakemake", "--directory", str(workdir)]
    command += ["--snakefile", str(workdir / "workflow" / "Snakefile"), "--cores", "1"]
    done = subprocess.run(
        [*command, "--dry-run"], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert planned_harmony_jobs(done.stdout) == sorted(DATASETS), done.stdout


def test_catalog_usage_names_the_config_flag_and_the_software_stacks() -> None:
    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())["usage"]
    assert catalog["mandatory-flags"]["flags"] == "--configfile config/config.yaml"
    assert (REPO / "config" / "config.yaml").is_file()
    assert catalog["software-stack-deployment"] == {
        "conda": True,
        "apptainer": True,
        "apptainer+conda": False,
    }
    assert catalog["report"] is True
    assert (REPO / "config" / "README.md").is_file()


def test_without_a_config_the_run_says_how_to_name_one(tmp_path: Path) -> None:
    write_workdir(tmp_path)  # a config/config.yaml is there, but nothing names it
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE)]
    command += ["--directory", str(tmp_path), "--cores", "1", "--dry-run"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0
    assert "No config: name one with --configfile" in done.stdout + done.stderr


def set_dataset(name: str, **values: Any) -> Callable[[dict], None]:
    def edit(config: dict) -> None:
        config["datasets"][name].update(values)

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            set_dataset("pbmc", key="donr"),
            r"Dataset 'pbmc': key 'donr' is not an obs column of '[^']*pbmc_3500.h5ad'; "
            r"its obs columns are 'donor', 'cell'\.",
        ),
        (
            set_dataset("pbmc_theta1", key=["donor", "lane"]),
            r"Dataset 'pbmc_theta1': key 'lane' is not an obs column .*its obs columns are 'donor'",
        ),
        (
            set_dataset("pbmc", label_key="cell_type"),
            r"Dataset 'pbmc': label_key 'cell_type' is not an obs column .*'donor', 'cell'\.",
        ),
        (
            set_dataset("pbmc", basis="X_umap"),
            r"Dataset 'pbmc': basis 'X_umap' is not in obsm of .*; its obsm keys are 'X_pca', ",
        ),
        (
            set_dataset("pbmc", input="missing.h5ad"),
            r"Dataset 'pbmc': input 'missing.h5ad' does not exist \(relative to the working "
            r"directory ",
        ),
        (
            set_dataset("pbmc", input=str(REPO / "README.md")),
            r"Dataset 'pbmc': input '[^']*README.md' is not an h5ad file \(not HDF5\)\.",
        ),
        (
            set_dataset("pbmc", adjusted_basis="X_pca"),
            r"Dataset 'pbmc': adjusted_basis 'X_pca' is the same as basis; the corrected "
            r"embedding would replace the original\.",
        ),
        (
            set_dataset("pbmc", params={"gpus": 2, "device": "cpu"}),
            r"Dataset 'pbmc': gpus 2 with device cpu; the CPU backend runs in one process\.",
        ),
        (
            lambda config: (
                set_dataset("pbmc", params={"gpus": 2})(config),
                config.setdefault("resources", {}).update(gpu=1),
            ),
            r"Dataset 'pbmc': gpus 2, but resources\.gpu gives each job 1; the run would find "
            r"too few GPUs\.",
        ),
    ],
    ids=[
        "key",
        "one-of-two-keys",
        "label-key",
        "basis",
        "missing-file",
        "not-hdf5",
        "same-basis",
        "gpus-on-cpu",
        "gpus-beyond-resources",
    ],
)
def test_inputs_are_checked_before_any_job(
    tmp_path: Path, edit: Callable[[dict], None], message: str
) -> None:
    workdir = write_workdir(tmp_path, edit)
    output = snakemake(workdir, succeed=False)
    assert re.search(message, output), output
    assert "Fix the datasets section of the config" in output
    assert not (workdir / "results").exists()  # nothing ran


def test_a_key_listed_twice_in_the_config_file_stops_the_run_before_any_job(
    tmp_path: Path,
) -> None:
    workdir = write_workdir(tmp_path)
    path = workdir / "config" / "config.yaml"
    lines = path.read_text().splitlines()
    first = lines.index("  pbmc:")
    # pbmc_theta1 renamed pbmc: the same dataset name twice, and dtype twice in the harmony section
    text = "\n".join(lines).replace("  pbmc_theta1:", "  pbmc:") + "\n  dtype: float64\n"
    path.write_text(text)
    second = text.splitlines().index("  pbmc:", first + 1)
    output = snakemake(workdir, succeed=False)
    assert re.search(
        rf"Config file '[^']*config.yaml': dataset name 'pbmc' is listed more than once "
        rf"\(lines {first + 1} and {second + 1}\); only the last would be used\.",
        output,
    ), output
    assert re.search(r"key 'harmony.dtype' is listed more than once \(lines \d+ and \d+\)", output)
    assert "Traceback" not in output
    assert not (workdir / "results").exists()


def test_an_error_found_inside_a_job_is_shown_on_the_console(tmp_path: Path) -> None:
    source = ad.read_h5ad(REPO / "tests" / "data" / "pbmc_3500" / "pbmc_3500.h5ad")
    source.obs["donor"] = source.obs["donor"].astype(object)
    source.obs.iloc[5, source.obs.columns.get_loc("donor")] = None
    bad = tmp_path / "nan_donor.h5ad"
    source.write_h5ad(bad)

    def only_bad(config: dict) -> None:
        config["datasets"] = {"pbmc": {"input": str(bad), "key": "donor"}}

    workdir = write_workdir(tmp_path / "work", only_bad)
    output = snakemake(workdir, succeed=False)
    assert re.search(
        r"Dataset 'pbmc' failed: harmony-step: error: Batch key 'donor' has 1 missing value\(s\)"
        r".* \(log: results/logs/harmony/pbmc.log\)",
        output,
    ), output


def test_a_truncated_input_stops_the_run_before_any_job(tmp_path: Path) -> None:
    source = REPO / "tests" / "data" / "cell_lines" / "cell_lines.h5ad"
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size * 2 // 5])
    workdir = write_workdir(tmp_path / "work", set_dataset("pbmc", input=str(truncated)))
    output = snakemake(workdir, succeed=False)
    assert re.search(
        r"Dataset 'pbmc': input '[^']*truncated.h5ad' cannot be read as an h5ad file: .*truncated",
        output,
    ), output
    assert not (workdir / "results").exists()


# --- the config schema ----------------------------------------------------------------------------


def test_generated_schema_is_current() -> None:
    """The Harmony blocks of the schema are exactly what the parameter table generates."""
    from harmony_step._schema import update

    text = SCHEMA_FILE.read_text()
    assert update(text) == text, (
        f"{SCHEMA_FILE.relative_to(REPO)} is out of date with the parameter table; rewrite it with "
        f"python -m harmony_step._schema {SCHEMA_FILE.relative_to(REPO)}"
    )


def walk_properties(schema: dict, node: dict, path: str = ""):
    """Yield (path, property schema, required) for every key the schema defines."""
    if "$ref" in node:
        node = {**schema["$defs"][node["$ref"].rsplit("/", 1)[-1]], **node}
    required = set(node.get("required", ()))
    for name, child in node.get("properties", {}).items():
        yield f"{path}{name}", child, name in required
        yield from walk_properties(schema, child, f"{path}{name}.")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk_properties(schema, node["additionalProperties"], f"{path}<name>.")


def test_schema_describes_every_key_and_gives_optional_ones_a_default() -> None:
    schema = load_schema()
    keys = list(walk_properties(schema, schema))
    assert len(keys) > 40
    for path, node, required in keys:
        assert node.get("description"), f"{path} has no description"
        # Required keys have no meaningful default; per-dataset overrides inherit the shared value.
        if not required and ".params." not in path:
            assert "default" in node, f"{path} has no default"
    assert schema["additionalProperties"] is False


def test_example_config_shows_every_key_with_its_default() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = load_schema()
    example = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    jsonschema.Draft202012Validator(schema).validate(example)
    assert set(example) == set(schema["properties"])
    assert set(example["resources"]) == set(schema["properties"]["resources"]["properties"])
    defaults = {spec.name: spec.default for spec in PARAMETERS}
    assert example["harmony"] == {name: defaults[name] for name in example["harmony"]}
    assert set(example["harmony"]) == set(schema["properties"]["harmony"]["properties"])
    assert example["device"] == defaults["device"]
    assert example["gpus"] == defaults["n_gpus"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("sigma", 0.0),
        ("sigma", 0.5),
        ("tau", -1.0),
        ("tol_harmony", 0.0),
        ("block_proportion", 0.0),
        ("block_proportion", 1.0),
        ("batch_prune_threshold", 1.5),
        ("batch_prune_threshold", None),
        ("n_clusters", 0),
        ("n_clusters", 2.5),
        ("n_clusters", None),
        ("max_iter_harmony", True),
        ("theta", [1.0, 2.0]),
        ("theta", []),
        ("theta", -1.0),
        ("random_state", -1),
        ("random_state", None),
        ("dtype", "float16"),
        ("flavor", "harmony1"),
        ("flavor", "harmony3"),
        ("correction_method", "fast"),
        ("correction_method", "slow"),
        ("verbose", "yes"),
    ],
)
def test_schema_accepts_what_the_parameters_accept(name: str, value: Any) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = load_schema()
    harmony = {"$defs": schema["$defs"], **schema["properties"]["harmony"]}
    schema_accepts = jsonschema.Draft202012Validator(harmony).is_valid({name: value})
    try:
        HarmonyParams.create(**{name: value})
    except (TypeError, ValueError):
        parameters_accept = False
    else:
        parameters_accept = True
    assert schema_accepts == parameters_accept


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c.update(colour="red"),
            r"at the top level: Additional properties are not allowed \('colour'",
        ),
        (
            lambda c: c["harmony"].update(thetta=1.0),
            r"at harmony: Additional properties are not allowed \('thetta'",
        ),
        (
            lambda c: c["datasets"]["pbmc"].update(batch="donor"),
            r"at datasets\.pbmc: Additional properties are not allowed \('batch'",
        ),
        (
            lambda c: c["harmony"].update(max_iter_harmony="ten"),
            r"at harmony\.max_iter_harmony: 'ten' is not of type 'integer'",
        ),
        (
            lambda c: c["datasets"]["pbmc_theta1"]["params"].update(theta="high"),
            r"at datasets\.pbmc_theta1\.params\.theta: 'high' .*Allowed: a number >= 0",
        ),
        (lambda c: c.update(device="tpu"), r"at device: 'tpu' is not one of"),
        (lambda c: c.update(gpus=0), r"at gpus: 0 is less than the minimum of 1"),
        (
            lambda c: c["datasets"]["pbmc"].pop("key"),
            r"at datasets\.pbmc: 'key' is a required property",
        ),
    ],
    ids=[
        "unknown-top-key",
        "unknown-harmony-key",
        "unknown-dataset-key",
        "wrong-type",
        "wrong-theta",
        "bad-device",
        "no-gpus",
        "missing-key",
    ],
)
def test_schema_rejects_bad_config_with_a_clear_message(
    tmp_path: Path, edit: Callable[[dict], Any], message: str
) -> None:
    output = snakemake(write_workdir(tmp_path, edit), "--dry-run", succeed=False)
    assert re.search(r"Invalid config " + message, output), output
    assert "config/README.md" in output
    assert not (tmp_path / "results").exists()


# --- the conda fallback ---------------------------------------------------------------------------


def conda_pins() -> dict[str, str]:
    env = yaml.safe_load((REPO / "workflow" / "envs" / "harmony-step.yaml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    pins = dict(line.split("==") for line in pip_section if "==" in line)
    return {name.lower(): version for name, version in pins.items()}


def test_conda_environment_pins_every_runtime_dependency() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = {
        re.split(r"[<>=!~ ]", spec, maxsplit=1)[0].lower() for spec in project["dependencies"]
    }
    assert required <= set(conda_pins()), sorted(required - set(conda_pins()))


def test_conda_environment_matches_the_image_lock() -> None:
    lock = REPO / "container" / "requirements-cuda12.lock"
    if not lock.is_file():
        pytest.skip(f"{lock.relative_to(REPO)} is not in this checkout")
    locked = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock.read_text(), re.M))
    locked = {name.lower(): version for name, version in locked.items()}
    for name, version in conda_pins().items():
        assert locked.get(name) == version, f"{name}: conda {version}, image {locked.get(name)}"
