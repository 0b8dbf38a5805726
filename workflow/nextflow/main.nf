#!/usr/bin/env nextflow
/*
 * Example pipeline around the HARMONY_STEP module: integrate one .h5ad file, or every row of a
 * samplesheet (CSV with columns id,h5ad,batch_key[,label_key]; several batch keys are separated
 * by ';'). Parameters and profiles are in nextflow.config; see README.md.
 */

include { HARMONY_STEP } from './modules/local/harmony_step/main'

// One meta map per dataset; a samplesheet value wins over the command-line default.
def datasetMeta(String id, def batchKey, def labelKey) {
    def keys = batchKey ?: params.batch_key
    if (!keys) {
        error "No batch key for '${id}': give --batch_key, or a batch_key column in the samplesheet."
    }
    def meta = [id: id, batch_key: keys.toString().tokenize(';')]
    def labels = labelKey ?: params.label_key
    if (labels) {
        meta.label_key = labels
    }
    return meta
}

workflow {
    if (!params.input) {
        error "Missing --input: give an .h5ad file or a samplesheet .csv (id,h5ad,batch_key[,label_key])."
    }

    def datasets = params.input.toString().endsWith('.csv')
        ? channel.fromPath(params.input, checkIfExists: true)
            .splitCsv(header: true)
            .map { row -> [datasetMeta(row.id, row.batch_key, row.label_key), file(row.h5ad, checkIfExists: true)] }
        : channel.fromPath(params.input, checkIfExists: true)
            .map { h5ad -> [datasetMeta(h5ad.baseName, null, null), h5ad] }

    HARMONY_STEP(datasets)
}
