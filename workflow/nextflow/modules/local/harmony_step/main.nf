process HARMONY_STEP {
    tag "$meta.id"
    label 'process_gpu'

    conda "${moduleDir}/environment.yml"
    // Both names come from container/IMAGE; tests/test_nextflow.py fails when they drift apart.
    container "${ workflow.containerEngine in ['singularity', 'apptainer'] && !task.ext.singularity_pull_docker_container ?
        'docker://ghcr.io/harmony-step/harmony-step:0.1.0' :
        'ghcr.io/harmony-step/harmony-step:0.1.0' }"

    input:
    tuple val(meta), path(h5ad)

    output:
    tuple val(meta), path("${prefix}.h5ad")            , emit: h5ad
    tuple val(meta), path("${prefix}.convergence.tsv") , emit: convergence
    tuple val(meta), path("${prefix}.summary.json")    , emit: summary
    tuple val(meta), path("${prefix}.convergence.png") , emit: plot, optional: true
    tuple val("${task.process}"), val('harmony-step'), eval("harmony-step --version | sed 's/^harmony-step //'"), emit: versions_harmony_step, topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    if (!meta.batch_key) error "HARMONY_STEP: meta.batch_key is not set for '${meta.id}'; set it to the obs column (or list of columns) that holds the batches."
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}_harmony"
    if ("${h5ad}" == "${prefix}.h5ad") error "HARMONY_STEP: input and output would both be named '${h5ad}'; set task.ext.prefix to another name."
    def device = task.accelerator?.request ? 'gpu' : 'cpu'
    def batch_keys = [meta.batch_key].flatten().collect { key -> "--key '${key}'" }.join(' ')
    def label_key = meta.label_key ? "--label-key '${meta.label_key}'" : ''
    def plot = task.ext.plot == false ? '' : "--plot ${prefix}.convergence.png"
    """
    export OMP_NUM_THREADS=${task.cpus}
    harmony-step run \\
        --input ${h5ad} \\
        --output ${prefix}.h5ad \\
        ${batch_keys} \\
        ${label_key} \\
        --convergence ${prefix}.convergence.tsv \\
        --summary ${prefix}.summary.json \\
        ${plot} \\
        --device ${device} \\
        --threads ${task.cpus} \\
        ${args}
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}_harmony"
    """
    touch ${prefix}.h5ad
    touch ${prefix}.convergence.tsv
    touch ${prefix}.summary.json
    touch ${prefix}.convergence.png
    """
}
