"""Config validation and the helpers shared by the rules: per-dataset parameters, flags, targets."""

import os
import re
import shlex
import time
from collections import Counter

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

SCHEMA = "../schemas/config.schema.yaml"


def schema_description(schema, path):
    """What the config key at ``path`` (a sequence of keys) means and accepts, from the schema."""

    def referenced(node):
        ref = node.get("$ref", "")
        return schema["$defs"][ref.rsplit("/", 1)[-1]] if ref else {}

    node = schema
    for key in path:
        parent = {**referenced(node), **node}
        node = parent.get("properties", {}).get(key, parent.get("additionalProperties"))
        if not isinstance(node, dict):
            return ""
    texts = [node.get("description", ""), referenced(node).get("description", "")]
    return " ".join(dict.fromkeys(text for text in texts if text))


class DuplicateKeyLoader(yaml.SafeLoader):
    """A YAML loader that records every mapping key listed more than once, with its lines.

    Plain YAML loading keeps the last of two equal keys without a word, so a dataset listed
    twice would silently replace the earlier one, and its earlier results with it.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates = []

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    lines.setdefault(key_node.value, []).append(key_node.start_mark.line + 1)
            path = getattr(node, "config_path", ())
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    value_node.config_path = (*path, key_node.value)
            self.duplicates += [
                ((*path, key), found) for key, found in lines.items() if len(found) > 1
            ]
        return super().construct_mapping(node, deep=deep)


def duplicate_keys(path):
    """``[(key path, [line numbers])]`` of the keys listed more than once in the YAML file."""
    try:
        with open(path) as stream:
            loader = DuplicateKeyLoader(stream)
            try:
                loader.get_single_data()
            finally:
                loader.dispose()
    except (OSError, yaml.YAMLError):
        return []  # Snakemake itself reports a file it cannot read
    return loader.duplicates


def check_duplicate_keys():
    """Stop when a config file given with --configfile (or configfile:) lists a key twice."""
    problems = []
    for path in dict.fromkeys(str(path) for path in workflow.configfiles):
        for keys, lines in duplicate_keys(path):
            if len(keys) == 2 and keys[0] == "datasets":
                what = f"dataset name {keys[1]!r}"
            else:
                what = f"key {'.'.join(keys)!r}"
            where = ", ".join(str(line) for line in lines[:-1]) + f" and {lines[-1]}"
            problems.append(
                f"Config file {path!r}: {what} is listed more than once (lines {where}); "
                "only the last would be used. Give each its own name, or remove the extra one."
            )
    if problems:
        raise WorkflowError("\n".join(problems))


def validate_config():
    """Check the config against the schema and fill in defaults, with a short error naming the key.

    Snakemake's own message prints the whole schema; this one names the offending key, what is
    wrong with it and what the key expects.
    """
    if not config:
        raise WorkflowError(
            "No config: name one with --configfile, for example "
            "`snakemake --cores all --configfile config/config.yaml` (the bundled example) or "
            "your own file listing your datasets. Every key is explained in config/README.md."
        )
    try:
        validate(config, SCHEMA)
    except WorkflowError as error:
        # validate() raises while handling jsonschema's ValidationError, which keeps the details.
        invalid = error.__context__
        if not hasattr(invalid, "absolute_path"):
            raise
        path = list(invalid.absolute_path)
        where = ".".join(str(key) for key in path) or "the top level"
        with open(workflow.source_path(SCHEMA)) as schema_file:
            expected = schema_description(yaml.safe_load(schema_file), path)
        raise WorkflowError(
            f"Invalid config at {where}: {invalid.message}."
            + (f" Expected: {expected}" if expected else "")
            + " Every key is explained in config/README.md."
        ) from None


check_duplicate_keys()
validate_config()

RESULTS = config["results"]
DATASETS = config["datasets"]


wildcard_constraints:
    dataset="|".join(re.escape(name) for name in DATASETS),


def dataset_result(name, filename):
    """Path of one result file of dataset ``name``."""
    return f"{RESULTS}/{name}/{filename}"


# Config keys that name a Harmony parameter differently (the command's flag is --gpus as well).
PARAMETER_NAMES = {"gpus": "n_gpus"}


def harmony_settings(name):
    """Every Harmony parameter of dataset ``name``, by parameter name: shared values, then its
    own overrides.

    Keys are sorted so that reordering the config file does not look like a parameter change
    to Snakemake's params rerun trigger.
    """
    dataset = DATASETS[name]
    merged = {
        "basis": dataset["basis"],
        "adjusted_basis": dataset["adjusted_basis"],
        "device": config["device"],
        "n_gpus": config["gpus"],
        **config["harmony"],
        **{PARAMETER_NAMES.get(key, key): value for key, value in dataset["params"].items()},
    }
    return dict(sorted(merged.items()))


def harmony_settings_yaml(name):
    """The params file handed to ``harmony-step run --params`` for dataset ``name``."""
    return yaml.safe_dump(harmony_settings(name), sort_keys=True, default_flow_style=False)


def batch_keys(name):
    """The batch columns of dataset ``name`` as a list (the config allows one name or a list)."""
    keys = DATASETS[name]["key"]
    return [keys] if isinstance(keys, str) else list(keys)


def key_flags(name):
    """``--key`` once per batch column (a dataset may correct for several at once)."""
    return " ".join(f"--key {shlex.quote(key)}" for key in batch_keys(name))


def label_key_flag(name):
    label_key = DATASETS[name]["label_key"]
    return "" if label_key is None else f"--label-key {shlex.quote(label_key)}"


def gpu_request(wildcards):
    """GPUs for one dataset's job: the configured number, or as many as its run is spread over
    (gpus) unless it runs on the CPU."""
    requested = config["resources"]["gpu"]
    if requested is not None:
        return requested
    settings = harmony_settings(wildcards.dataset)
    return 0 if settings["device"] == "cpu" else settings["n_gpus"]


# Per dataset: the files of the harmony rule, then those drawn for the report (rules/report.smk).
HARMONY_FILES = ["integrated.h5ad", "convergence.tsv", "summary.json", "params.yaml"]
REPORT_FILES = ["mixing_metrics.html"]
PLOT_FILES = ["convergence.png", "embedding.png"]


def all_results():
    """Every file the workflow delivers, for every dataset."""
    names = HARMONY_FILES + REPORT_FILES + (PLOT_FILES if config["plot"] else [])
    return [dataset_result(name, filename) for name in DATASETS for filename in names]


# Job logs written after this moment belong to this run (rules/harmony.smk truncates them).
WORKFLOW_STARTED = time.time()
ERROR_PREFIX = "harmony-step: error:"


def report_job_errors():
    """Show on the console the error line of each dataset whose job failed in this run.

    Called by the Snakefile's ``onerror`` handler, in the main Snakemake process, so it works the
    same for local jobs and for cluster jobs (whose logs are on the shared file system).
    """
    for name in DATASETS:
        log = f"{RESULTS}/logs/harmony/{name}.log"
        try:
            if os.path.getmtime(log) < WORKFLOW_STARTED:
                continue
            with open(log, errors="replace") as stream:
                errors = [line.strip() for line in stream if line.startswith(ERROR_PREFIX)]
        except OSError:
            continue
        for line in errors:
            logger.error(f"Dataset {name!r} failed: {line} (log: {log})")
