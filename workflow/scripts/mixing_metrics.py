"""The mixing metrics of one dataset (from its summary.json) as an HTML table for the report.

Run by the ``mixing_metrics`` rule (workflow/rules/report.smk) through Snakemake's ``script:``.
"""

import html
import json
import sys

# What each metric measures and which way is better, in the order of the table.
METRICS = (
    (
        "ilisi_median",
        "iLISI (median)",
        "higher",
        "Batch mixing: the effective number of batches among a cell's neighbours, from 1 (one "
        "batch around every cell) to the number of batches (perfectly mixed).",
    ),
    (
        "batch_silhouette",
        "batch silhouette",
        "lower",
        "How far cells sit apart by batch, from -1 to 1: near 0 or below means batches overlap, "
        "towards 1 means they form separate groups.",
    ),
    (
        "clisi_median",
        "cLISI (median)",
        "lower",
        "Cell-type separation: the effective number of cell types among a cell's neighbours; 1 "
        "means neighbourhoods hold one cell type, so the biology is kept.",
    ),
    (
        "label_silhouette",
        "label silhouette",
        "higher",
        "How far cells sit apart by cell type, from -1 to 1: higher means cell types stay "
        "distinct after integration.",
    ),
)


def number(value):
    return "n/a" if value is None else f"{value:.3f}"


def table(dataset, summary):
    metrics = summary["metrics"]
    before, after, settings = metrics["before"], metrics["after"], metrics["settings"]
    rows = []
    for name, title, better, meaning in METRICS:
        if name not in before and name not in after:
            continue
        rows.append(
            "<tr>"
            f"<td>{html.escape(title)}</td>"
            f"<td class='n'>{number(before.get(name))}</td>"
            f"<td class='n'>{number(after.get(name))}</td>"
            f"<td>{better}</td>"
            f"<td>{html.escape(meaning)}</td>"
            "</tr>"
        )
    if not rows:
        rows.append("<tr><td colspan='5'>No metrics were computed for this run.</td></tr>")
    label_key = settings.get("label_key")
    labels = (
        f"cell types from obs column <code>{html.escape(label_key)}</code>"
        if label_key
        else "no cell-type labels (set <code>label_key</code> for cLISI and label silhouette)"
    )
    note = (
        f"Batches from obs column <code>{html.escape(str(settings.get('batch_key')))}</code>; "
        f"{labels}. {settings.get('n_cells_evaluated', 'n/a')} cells evaluated, LISI perplexity "
        f"{settings.get('perplexity', 'n/a')}. Harmony "
        f"{'converged' if summary['converged'] else 'did not converge'} after "
        f"{summary['n_rounds']} round(s)."
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(dataset)}: mixing metrics</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
</style></head>
<body>
<h2>{html.escape(dataset)}: mixing before and after Harmony</h2>
<table>
<tr><th>metric</th><th>before</th><th>after</th><th>better when</th><th>meaning</th></tr>
{chr(10).join(rows)}
</table>
<p>{note}</p>
</body></html>
"""


def main(snakemake):
    with open(snakemake.input.summary, encoding="utf-8") as handle:
        summary = json.load(handle)
    with open(snakemake.output[0], "w", encoding="utf-8") as handle:
        handle.write(table(snakemake.params.dataset, summary))


if __name__ == "__main__":
    with open(snakemake.log[0], "w") as log:  # noqa: F821 (set by Snakemake)
        sys.stderr = log
        main(snakemake)  # noqa: F821
