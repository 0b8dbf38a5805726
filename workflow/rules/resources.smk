"""Memory and wall-time requests of the Harmony rule, grown with its input and with each retry.

Included by workflow/Snakefile before the rules; the ``harmony`` rule declares

    resources:
        mem_mb=harmony_mem_mb,
        runtime=harmony_runtime,

Snakemake calls these functions once per job with the job's input files, so a cluster executor
(the Slurm profile in workflow/profiles/slurm-gpu) asks for enough memory and time for each
dataset: ``--mem`` and ``--time`` of the Slurm job. ``config["resources"]["mem_mb"]`` and
``["runtime"]``, where set, are the floor: a small dataset gets the configured values, a large one
gets more. A run spread over several GPUs (``gpus``) has one process per GPU, each of which adds
:data:`HARMONY_MEM_MB_PER_EXTRA_GPU` to the memory. Every retry (``--retries``) multiplies the request by the attempt number, so a job
killed for running out of memory or time is resubmitted with twice as much, then three times.
A profile's ``set-resources`` (for example ``harmony: {mem_mb: 64000}``) replaces these values.
"""

import math

# Python, NumPy or CuPy and a CUDA context take 1-2 GB before any data is read; the rest is
# headroom for the peaks of small inputs.
HARMONY_BASE_MEM_MB = 4000
# The AnnData read into memory (a compressed h5ad expands when read), the copy written out, and
# Harmony's per-cell work arrays (cluster assignments, corrected embedding) on the host.
HARMONY_MEM_MB_PER_INPUT_MB = 3
# Each further GPU of a run has its own process: Python, CuPy, a CUDA context and NCCL's buffers,
# besides its share of the rows (the share is counted with the input above).
HARMONY_MEM_MB_PER_EXTRA_GPU = 3000
# Queueing on the node, CUDA start-up and kernel compilation, and the plots and metrics.
HARMONY_BASE_RUNTIME_MIN = 30
# Reading and writing the h5ad on a shared file system dominates for large inputs.
HARMONY_INPUT_MB_PER_RUNTIME_MIN = 100


def _configured_resource(name):
    """The value of ``config["resources"][name]``, or 0 where the config does not set it."""
    return (config.get("resources") or {}).get(name) or 0


def harmony_mem_mb(wildcards, input, attempt):
    """Host memory in MB for one Harmony job: grows with the input size, the GPUs the run is
    spread over and the attempt number."""
    estimate = HARMONY_BASE_MEM_MB + HARMONY_MEM_MB_PER_INPUT_MB * math.ceil(input.size_mb)
    settings = harmony_settings(wildcards.dataset)
    if settings["device"] != "cpu":
        estimate += HARMONY_MEM_MB_PER_EXTRA_GPU * (settings["n_gpus"] - 1)
    return max(estimate, _configured_resource("mem_mb")) * attempt


def harmony_runtime(wildcards, input, attempt):
    """Wall-clock limit in minutes for one Harmony job: grows with the input size and attempt."""
    estimate = HARMONY_BASE_RUNTIME_MIN + math.ceil(
        input.size_mb / HARMONY_INPUT_MB_PER_RUNTIME_MIN
    )
    return max(estimate, _configured_resource("runtime")) * attempt
