"""One Harmony run spread over several GPUs (``n_gpus > 1``): one process per GPU, NCCL between them.

The cells are split into contiguous, near-equal ranges, one per GPU (:func:`row_range`); each
process runs the core on its own rows (``run_harmony(..., shard=...)``), and the small sums that
couple the cells are added over processes by the communicator (:mod:`.comm`: NCCL through CuPy's
``cupyx.distributed``). Nothing here is imported on the one-GPU path.

Modules, in the order a run meets them:

* :mod:`.launcher`: rank 0's entry, :func:`run_sharded`;
* :mod:`.environment`: GPUs visible, NCCL present, the processes' environment, the timeout;
* :mod:`.processes`: worker processes on one machine, started and watched by rank 0;
* :mod:`.slurm`, :mod:`.srun`: tasks of an ``srun`` step across nodes instead;
* :mod:`.comm`: rendezvous and communicator;
* :mod:`.protocol`: what the ranks exchange (job, codes, rows, result), the data path;
* :mod:`.worker`: ``python -m harmony_step._distributed.worker``;
* :mod:`.rows`: who holds which cells.
"""

from harmony_step._distributed.launcher import check_set_up, run_sharded
from harmony_step._distributed.rows import row_range

__all__ = ["check_set_up", "row_range", "run_sharded"]
