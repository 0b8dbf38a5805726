"""What the report shows of each dataset besides the convergence table: the mixing metrics before
and after Harmony, the embedding before and after, and the convergence plot.

These jobs are small and read only a sample of cells, so they run where Snakemake runs
(``localrule``) instead of as cluster jobs, in the same software environment as the harmony rule.
"""


rule mixing_metrics:
    """The iLISI, cLISI and silhouette values of summary.json as a table with what each means."""
    input:
        summary=dataset_result("{dataset}", "summary.json"),
    output:
        report(
            dataset_result("{dataset}", "mixing_metrics.html"),
            caption="../report/mixing_metrics.rst",
            category="{dataset}",
            subcategory="Mixing metrics",
            labels={"dataset": "{dataset}", "result": "mixing metrics before and after"},
        ),
    log:
        f"{RESULTS}/logs/mixing_metrics/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/mixing_metrics/{{dataset}}.tsv"
    localrule: True
    conda:
        "../envs/harmony-step.yaml"
    container:
        CONTAINER_IMAGE
    params:
        dataset=lambda wildcards: wildcards.dataset,
    script:
        "../scripts/mixing_metrics.py"


rule plots:
    """The convergence plot and the embedding before and after Harmony of one dataset."""
    input:
        h5ad=dataset_result("{dataset}", "integrated.h5ad"),
        convergence=dataset_result("{dataset}", "convergence.tsv"),
        summary=dataset_result("{dataset}", "summary.json"),
    output:
        convergence=report(
            dataset_result("{dataset}", "convergence.png"),
            caption="../report/convergence_plot.rst",
            category="{dataset}",
            subcategory="Convergence",
            labels={"dataset": "{dataset}", "result": "objective per iteration"},
        ),
        embedding=report(
            dataset_result("{dataset}", "embedding.png"),
            caption="../report/embedding_plot.rst",
            category="{dataset}",
            subcategory="Embedding",
            labels={"dataset": "{dataset}", "result": "embedding before and after"},
        ),
    log:
        f"{RESULTS}/logs/plots/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/plots/{{dataset}}.tsv"
    localrule: True
    conda:
        "../envs/harmony-step.yaml"
    container:
        CONTAINER_IMAGE
    params:
        dataset=lambda wildcards: wildcards.dataset,
        basis=lambda wildcards: DATASETS[wildcards.dataset]["basis"],
        adjusted_basis=lambda wildcards: DATASETS[wildcards.dataset]["adjusted_basis"],
        batch_keys=lambda wildcards: batch_keys(wildcards.dataset),
        label_key=lambda wildcards: DATASETS[wildcards.dataset]["label_key"],
    script:
        "../scripts/plots.py"
