#!/usr/bin/env nextflow
/*
 * Example pipeline around the HARMONY_STEP module: integrate one .h5ad file, or every row of a
 * samplesheet (CSV with columns id,h5ad,batch_key[,label_key]; several batch keys are separated
 * by ';'). Parameters and profiles are in nextflow.config; see README.md.
 */

include { HARMONY_STEP } from './modules/local/harmony_step/main'

// The meta map of one dataset: batch keys as a list, the label key only when there is one.
def datasetMeta(id, batchKey, labelKey) {
    if (!batchKey) {
        error "No batch key for '${id}': give --batch_key, or a batch_key column in the samplesheet."
    }
    def meta = [id: id, batch_key: batchKey.toString().tokenize(';')]
    if (labelKey) {
        meta.label_key = labelKey
    }
    return meta
}

workflow {
    if (!params.input) {
        error "Missing --input: give an .h5ad file or a samplesheet .csv (id,h5ad,batch_key[,label_key])."
    }

    // Samplesheet values win over the command-line defaults.
    def datasets = params.input.toString().endsWith('.csv')
        ? channel.fromPath(params.input, checkIfExists: true)
            .splitCsv(header: true)
            .map { row ->
                def meta = datasetMeta(row.id, row.batch_key ?: params.batch_key, row.label_key ?: params.label_key)
                [meta, file(row.h5ad, checkIfExists: true)]
            }
        : channel.fromPath(params.input, checkIfExists: true)
            .map { h5ad -> [datasetMeta(h5ad.baseName, params.batch_key, params.label_key), h5ad] }

    HARMONY_STEP(datasets)

    // Every module emits (process, tool, version) on the `versions` topic; one YAML file of them.
    channel.topic('versions')
        .unique()
        .map { process, tool, version -> "\"${process}\":\n    ${tool}: ${version}" }
        .collectFile(name: 'versions.yml', storeDir: "${params.outdir}/pipeline_info", newLine: true, sort: true)
}
