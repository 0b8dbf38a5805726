"""The report's figures of one dataset: the convergence plot and the embedding before and after.

Run by the ``plots`` rule (workflow/rules/report.smk) through Snakemake's ``script:``. Only the two
embeddings (their first two dimensions, for at most MAX_CELLS cells) and the batch and label
columns are read from integrated.h5ad; X is never loaded.
"""

import json
import sys

import numpy as np
import pandas as pd

# Cells drawn per panel; more are subsampled (with a fixed seed, so reruns draw the same picture).
MAX_CELLS = 50_000
# Categories beyond this get colours but no legend entries.
MAX_LEGEND = 20
SEED = 0


def read_elem(node):
    from anndata.io import read_elem as read

    return read(node)


def cell_sample(n_cells):
    """Sorted row indices of the cells drawn (all of them up to MAX_CELLS)."""
    if n_cells <= MAX_CELLS:
        return np.arange(n_cells)
    return np.sort(np.random.default_rng(SEED).choice(n_cells, MAX_CELLS, replace=False))


def first_two_dimensions(handle, key, rows):
    """Columns 0 and 1 of obsm[key] for the given rows, read without loading the rest."""
    import h5py

    node = handle["obsm"][key]
    if isinstance(node, h5py.Dataset):
        return np.asarray(node[rows, :2], dtype=np.float64)
    values = read_elem(node)  # a data frame or sparse matrix stored in obsm: rare and small
    values = values.to_numpy() if hasattr(values, "to_numpy") else values
    values = values.toarray() if hasattr(values, "toarray") else np.asarray(values)
    return np.asarray(values[rows, :2], dtype=np.float64)


def read_cells(path, bases, columns):
    """The sampled cells' first two dimensions of each basis and their values in each column."""
    import h5py

    with h5py.File(path, "r") as handle:
        n_cells = handle["obsm"][bases[0]].shape[0]
        rows = cell_sample(n_cells)
        embeddings = {key: first_two_dimensions(handle, key, rows) for key in bases}
        values = {
            column: pd.Series(np.asarray(read_elem(handle["obs"][column]))[rows]).astype(str)
            for column in columns
        }
    return n_cells, embeddings, values


def colours(categories):
    from matplotlib import colormaps

    if len(categories) <= 10:
        palette = colormaps["tab10"].colors
    elif len(categories) <= 20:
        palette = colormaps["tab20"].colors
    else:
        palette = colormaps["turbo"](np.linspace(0.05, 0.95, len(categories)))
    return {category: palette[i % len(palette)] for i, category in enumerate(categories)}


def embedding_figure(dataset, n_cells, embeddings, values, basis, adjusted_basis):
    """One row per colouring (each batch key, then the label), columns before and after."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = list(values)
    figure = Figure(figsize=(11, 4.2 * len(rows) + 0.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = np.atleast_2d(figure.subplots(len(rows), 2, squeeze=False))
    n_drawn = len(next(iter(embeddings.values())))
    shown = "all" if n_drawn == n_cells else f"{n_drawn:,} randomly chosen"
    figure.suptitle(
        f"{dataset}: {basis} before and {adjusted_basis} after Harmony "
        f"(first two dimensions, {shown} of {n_cells:,} cells)"
    )
    # A random drawing order, so that no batch is painted over the others everywhere.
    order = np.random.default_rng(SEED).permutation(n_drawn)
    for row, (column, (role, labels)) in enumerate(values.items()):
        categories = sorted(labels.unique())
        palette = colours(categories)
        point_colours = np.array([palette[label] for label in labels.to_numpy()])[order]
        for col, (key, when) in enumerate(((basis, "before"), (adjusted_basis, "after"))):
            ax = axes[row, col]
            points = embeddings[key][order]
            ax.scatter(
                points[:, 0], points[:, 1], c=point_colours, s=2, linewidths=0, rasterized=True
            )
            ax.set_title(f"{when}: coloured by {role} ({column})", fontsize="medium")
            ax.set_xlabel(f"{key} 1")
            ax.set_ylabel(f"{key} 2")
            ax.set_xticks([])
            ax.set_yticks([])
        if len(categories) <= MAX_LEGEND:
            handles = [
                axes[row, 1].scatter([], [], color=palette[c], s=20, label=c) for c in categories
            ]
            axes[row, 1].legend(
                handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5),
                fontsize="small", frameon=False, title=column,
            )  # fmt: skip
        else:
            axes[row, 1].text(
                1.02, 0.5, f"{len(categories)} {role} values\n(too many for a legend)",
                transform=axes[row, 1].transAxes, va="center", fontsize="small",
            )  # fmt: skip
    return figure


def convergence_record(convergence_tsv, summary):
    """The part of uns['harmony'] that the convergence plot draws, from the written files."""
    table = pd.read_csv(convergence_tsv, sep="\t", float_precision="round_trip")
    return {
        "iterations": {name: table[name].to_numpy() for name in table.columns},
        "converged": summary["converged"],
        "n_rounds": summary["n_rounds"],
    }


def main(snakemake):
    from harmony_step._step.reports import plot_convergence

    dataset, params = snakemake.params.dataset, snakemake.params
    with open(snakemake.input.summary, encoding="utf-8") as handle:
        summary = json.load(handle)
    outcome = "converged" if summary["converged"] else "not converged (stopped at max_iter_harmony)"
    plot_convergence(
        convergence_record(snakemake.input.convergence, summary),
        snakemake.output.convergence,
        title=f"{dataset}: Harmony, {summary['n_rounds']} rounds, {outcome}",
    )

    columns = {key: "batch" for key in params.batch_keys}
    if params.label_key:
        columns[params.label_key] = "label"
    n_cells, embeddings, values = read_cells(
        snakemake.input.h5ad, [params.basis, params.adjusted_basis], list(columns)
    )
    coloured = {column: (columns[column], values[column]) for column in columns}
    figure = embedding_figure(
        dataset, n_cells, embeddings, coloured, params.basis, params.adjusted_basis
    )
    figure.savefig(snakemake.output.embedding, format="png")


if __name__ == "__main__":
    with open(snakemake.log[0], "w") as log:  # noqa: F821 (set by Snakemake)
        sys.stderr = log
        main(snakemake)  # noqa: F821
