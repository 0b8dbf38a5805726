rule harmony:
    """Integrate one dataset with the harmony-step command.

    The Harmony parameters are written to params.yaml first and passed with --params, so the
    exact settings sit next to the results. They are also a rule parameter: with Snakemake's
    default rerun triggers a changed value reruns only the datasets whose settings changed.
    The outputs hold no timings, so a rerun writes the same bytes; the seconds of each phase
    are in the log, and the run time and memory in the benchmark file.
    """
    input:
        h5ad=lambda wildcards: DATASETS[wildcards.dataset]["input"],
    output:
        h5ad=dataset_result("{dataset}", "integrated.h5ad"),
        convergence=report(
            dataset_result("{dataset}", "convergence.tsv"),
            caption="../report/convergence_table.rst",
            category="{dataset}",
            subcategory="Convergence",
            labels={"dataset": "{dataset}", "result": "iterations table"},
        ),
        summary=dataset_result("{dataset}", "summary.json"),
        settings=dataset_result("{dataset}", "params.yaml"),
    log:
        f"{RESULTS}/logs/harmony/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/harmony/{{dataset}}.tsv"
    conda:
        "../envs/harmony-step.yaml"
    container:
        CONTAINER_IMAGE
    threads: config["resources"]["threads"]
    resources:
        gpu=gpu_request,
        mem_mb=harmony_mem_mb,
        runtime=harmony_runtime,
    params:
        settings=lambda wildcards: harmony_settings_yaml(wildcards.dataset),
        batch_keys=lambda wildcards: key_flags(wildcards.dataset),
        label_key=lambda wildcards: label_key_flag(wildcards.dataset),
        embedding_only="--embedding-only" if config["embedding_only"] else "",
    shell:
        "printf '%s' {params.settings:q} > {output.settings:q} && "
        "harmony-step run --input {input.h5ad:q} --output {output.h5ad:q} "
        "{params.batch_keys} {params.label_key} --params {output.settings:q} "
        "--convergence {output.convergence:q} --summary {output.summary:q} "
        "{params.embedding_only} --threads {threads} > {log:q} 2>&1"
