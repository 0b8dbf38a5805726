"""Where the mixing metrics' time goes, on the first call of a process and on later ones.

The step computes the metrics once per process (before and after correction), so whatever a
first call costs on top of a later one (CuPy loading its kernels, numba loading its compiled
code, first touches of new memory) is part of every run. This times the stages of
``metrics.metrics_before_after`` on ``realistic_data.generate(cells)`` (the embedding as the step
reads it, float32, and a float64 one standing in for the corrected embedding), the device
synchronised around each stage, for the first call and for ``--repeat`` later ones, and prints
the first call's heaviest functions under cProfile (host time: on the GPU, kernel loading and
the waits for the device).

    python benchmarks/profile_metrics.py --device gpu --cells 1000000
    python benchmarks/profile_metrics.py --device cpu --cells 200000 --threads 2
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import time

import numpy as np
from realistic_data import generate

from harmony_step._step import metrics

STAGES = (
    "sample_cells",
    "_codes",
    "_to_device",
    "neighbours",
    "candidates_bruteforce",
    "_nearest_candidates",
    "neighbour_weights",
    "_lisi_from_weights",
    "silhouettes",
)
"""Functions of ``harmony_step._step.metrics`` timed; nested ones are also inside their caller."""


def instrument(sync) -> dict[str, dict[str, float]]:
    """Wrap each stage so that its seconds, the device synchronised, add into
    ``current["totals"]``; returns ``current``, whose totals the caller replaces per pass."""
    current: dict[str, dict[str, float]] = {"totals": collections.defaultdict(float)}
    for name in STAGES:
        original = getattr(metrics, name)

        def timed(*args, _f=original, _n=name, **kwargs):
            sync()
            start = time.perf_counter()
            out = _f(*args, **kwargs)
            sync()
            current["totals"][_n] += time.perf_counter() - start
            return out

        setattr(metrics, name, timed)
    return current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="gpu")
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if args.device == "gpu":
        import cupy

        xp, sync = cupy, cupy.cuda.Device().synchronize
    else:
        xp, sync = np, lambda: None
    data = generate(args.cells, seed=0)
    before = data.embedding
    after = before.astype(np.float64) * 0.5  # stands in for the corrected embedding
    current = instrument(sync)
    passes: list[dict[str, float]] = []
    first_profile = ""
    for attempt in range(1 + args.repeat):
        current["totals"] = collections.defaultdict(float)
        profile = cProfile.Profile() if attempt == 0 else None
        start = time.perf_counter()
        if profile is not None:
            profile.enable()
        metrics.metrics_before_after(
            before, after, data.batch, data.cell_type, batch_key="batch", label_key="cell_type",
            seed=0, xp=xp, threads=args.threads,
        )  # fmt: skip
        sync()
        if profile is not None:
            profile.disable()
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
            first_profile = text.getvalue()
        current["totals"]["whole call"] = time.perf_counter() - start
        passes.append(dict(current["totals"]))
    print(f"{args.cells:,} cells, device {args.device}; seconds per call (both embeddings)")
    print(f"{'stage':24s} {'first':>8s} " + " ".join(f"{'later':>8s}" for _ in passes[1:]))
    for name in ("whole call", *STAGES):
        values = " ".join(f"{p.get(name, 0.0):8.3f}" for p in passes[1:])
        print(f"{name:24s} {passes[0].get(name, 0.0):8.3f} {values}")
    print("\nFirst call, heaviest functions by own time (cProfile's overhead included):")
    print(first_profile)


if __name__ == "__main__":
    main()
