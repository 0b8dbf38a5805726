"""Config validation and the helpers shared by the rules: per-dataset parameters, flags, targets."""

import re
import shlex

import yaml
from snakemake.exceptions import WorkflowError
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


validate_config()

RESULTS = config["results"]
DATASETS = config["datasets"]


wildcard_constraints:
    dataset="|".join(re.escape(name) for name in DATASETS),


def dataset_result(name, filename):
    """Path of one result file of dataset ``name``."""
    return f"{RESULTS}/{name}/{filename}"


def harmony_settings(name):
    """Every Harmony parameter of dataset ``name``: shared values, then its own overrides.

    Keys are sorted so that reordering the config file does not look like a parameter change
    to Snakemake's params rerun trigger.
    """
    dataset = DATASETS[name]
    merged = {
        "basis": dataset["basis"],
        "adjusted_basis": dataset["adjusted_basis"],
        "device": config["device"],
        **config["harmony"],
        **dataset["params"],
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
    """GPUs for one dataset's job: the configured number, or one unless it runs on the CPU."""
    requested = config["resources"]["gpu"]
    if requested is not None:
        return requested
    return 0 if harmony_settings(wildcards.dataset)["device"] == "cpu" else 1


# Per dataset: the files of the harmony rule, then those drawn for the report (rules/report.smk).
HARMONY_FILES = ["integrated.h5ad", "convergence.tsv", "summary.json", "params.yaml"]
REPORT_FILES = ["mixing_metrics.html"]
PLOT_FILES = ["convergence.png", "embedding.png"]


def all_results():
    """Every file the workflow delivers, for every dataset."""
    names = HARMONY_FILES + REPORT_FILES + (PLOT_FILES if config["plot"] else [])
    return [dataset_result(name, filename) for name in DATASETS for filename in names]
