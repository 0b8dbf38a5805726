"""Every dataset's input checked before any job starts, from the h5ad file's metadata alone.

Only the names are read: the obs column names (the ``column-order`` attribute) and the obsm keys,
never X or the embedding itself, so the check takes milliseconds even for large files. A problem
stops the run with one message per problem, naming the dataset, the missing name and the names
that exist, on the console instead of in a job's log after other jobs have run.
"""

import os

from snakemake.logging import logger


def h5ad_names(path):
    """``(obs column names, obsm keys)`` of the h5ad file at ``path``; raises ValueError if unreadable."""
    import h5py

    if not h5py.is_hdf5(path):
        raise ValueError("is not an h5ad file (not HDF5)")
    with h5py.File(path, "r") as handle:
        obs, obsm = handle.get("obs"), handle.get("obsm")
        if obs is None:
            raise ValueError("is not an h5ad file (it has no obs)")
        if isinstance(obs, h5py.Dataset):  # h5ad files of anndata < 0.7: one compound dataset
            columns = [name for name in obs.dtype.names if name != "index"]
        else:
            columns = [str(name) for name in obs.attrs.get("column-order", [])]
        if obsm is None:
            keys = []
        elif isinstance(obsm, h5py.Dataset):
            keys = list(obsm.dtype.names or [])
        else:
            keys = list(obsm.keys())
    return columns, keys


def listed(names):
    return ", ".join(repr(name) for name in names) if names else "none"


def input_problems(name, dataset):
    """What is wrong with the input of one dataset, one sentence each; empty when all is there."""
    path = dataset["input"]
    where = f"Dataset {name!r}: input {path!r}"
    if not os.path.exists(path):
        return [f"{where} does not exist (relative to the working directory {os.getcwd()})."]
    try:
        columns, keys = h5ad_names(path)
    except ValueError as error:
        return [f"{where} {error}."]
    except OSError as error:  # HDF5 reports damaged or truncated files as OSError
        return [f"{where} cannot be read as an h5ad file: {error}."]
    problems = []
    wanted = [("key", key) for key in batch_keys(name)]
    if dataset["label_key"] is not None:
        wanted.append(("label_key", dataset["label_key"]))
    for role, column in wanted:
        if column not in columns:
            problems.append(
                f"Dataset {name!r}: {role} {column!r} is not an obs column of {path!r}; "
                f"its obs columns are {listed(columns)}."
            )
    if dataset["basis"] not in keys:
        problems.append(
            f"Dataset {name!r}: basis {dataset['basis']!r} is not in obsm of {path!r}; "
            f"its obsm keys are {listed(keys)}."
        )
    return problems


def settings_problems(name):
    """What is wrong with the settings of one dataset, whatever its input holds: an obsm name
    that would replace the basis, or several GPUs for a run on the CPU."""
    settings = harmony_settings(name)
    problems = []
    if settings["adjusted_basis"] == settings["basis"]:
        problems.append(
            f"Dataset {name!r}: adjusted_basis {settings['adjusted_basis']!r} is the same as "
            "basis; the corrected embedding would replace the original. Choose another name "
            "(the default is 'X_pca_harmony')."
        )
    if settings["n_gpus"] > 1 and settings["device"] == "cpu":
        problems.append(
            f"Dataset {name!r}: gpus {settings['n_gpus']} with device cpu; the CPU backend runs "
            "in one process. Use device auto or gpu to spread the run over GPUs, or gpus 1."
        )
    granted = config["resources"]["gpu"]
    if settings["n_gpus"] > 1 and granted is not None and granted < settings["n_gpus"]:
        problems.append(
            f"Dataset {name!r}: gpus {settings['n_gpus']}, but resources.gpu gives each job "
            f"{granted}; the run would find too few GPUs. Raise resources.gpu or leave it out "
            "(then each job asks for its dataset's gpus)."
        )
    return problems


def check_inputs():
    """Stop before any job when an input file, batch key, label key or basis is missing, when
    adjusted_basis would replace basis (Snakemake would remove the earlier results first), or when
    a dataset asks for several GPUs on the CPU or for more GPUs than resources.gpu grants."""
    problems = [line for name in DATASETS for line in settings_problems(name)]
    try:
        import h5py  # noqa: F401
    except ImportError:
        logger.warning(
            "h5py is not installed where Snakemake runs: the inputs are checked by each job "
            "instead of before the run (pip install 'harmony-step[workflow]' adds it)."
        )
    else:
        problems += [line for name in DATASETS for line in input_problems(name, DATASETS[name])]
    if problems:
        raise WorkflowError(
            "\n".join(problems) + "\nFix the datasets section of the config (config/README.md)."
        )


# Jobs started by Snakemake (a cluster job, a group) parse the workflow again; checking once is enough.
if workflow.is_main_process:
    check_inputs()
