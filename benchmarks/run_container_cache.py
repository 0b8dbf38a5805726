"""A CPU run in the container image, with and without a volume that keeps the compiled kernels.

Every ``docker run --rm`` starts from the image, so without a volume numba compiles the CPU
kernels again in each container (CuPy its GPU kernels likewise). This runs ``harmony-step run`` on
the bundled 3,500-cell dataset (``tests/data/pbmc_3500``, ``--device cpu``) in fresh containers:

1. ``--repeat`` times without a volume (each run compiles);
2. in a new named volume mounted at ``/tmp/harmony-step-cache``: the first run (compiles), then
   ``--repeat`` more (the volume holds the kernels);
3. the same volume as another uid (``--user 4321:4321``, as Nextflow's ``-u $(id -u)``): its first
   run (compiles into folders of its own) and ``--repeat`` more.

Each row is the wall time of ``docker run`` (container start and exit included) and the step's own
``total`` from its ``timings:`` log line. Writes ``container_cache.json`` and ``container_cache.md``
into ``--out``::

    python benchmarks/run_container_cache.py --image ghcr.io/harmony-step/harmony-step:0.1.0
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from commands import run_timed

HERE = Path(__file__).resolve().parent
DATASET = HERE.parent / "tests" / "data" / "pbmc_3500"
_TOTAL = re.compile(r"harmony-step: timings: .*total ([0-9.e+-]+) s")


def one_run(docker: list[str], image: str, extra: list[str], workdir: Path) -> dict:
    """One ``docker run --rm`` of the step; its wall seconds and the step's own total."""
    output = workdir / "out.h5ad"
    output.unlink(missing_ok=True)
    command = [*docker, "run", "--rm", "--network", "none", *extra,
               "-v", f"{DATASET}:/in:ro", "-v", f"{workdir}:/out", image,
               "run", "--input", "/in/pbmc_3500.h5ad", "--output", "/out/out.h5ad",
               "--key", "donor", "--device", "cpu"]  # fmt: skip
    result, wall = run_timed(command)
    total = _TOTAL.search(result.stderr)
    return {
        "wall_seconds": round(wall, 2),
        "step_seconds": float(total.group(1)) if total else None,
    }


def measure(docker: list[str], image: str, repeat: int) -> list[dict]:
    volume = f"harmony-step-cache-benchmark-{os.getpid()}"
    cache = ["-v", f"{volume}:/tmp/harmony-step-cache"]
    other = ["--user", "4321:4321"]
    plan = [("no volume", [], "compiles", repeat),
            ("new volume", cache, "compiles", 1), ("same volume", cache, "cached", repeat),
            ("same volume, another uid", [*cache, *other], "compiles", 1),
            ("same volume, another uid", [*cache, *other], "cached", repeat)]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        workdir.chmod(0o777)  # the image runs as its own user, or as 4321
        try:
            for case, extra, kernels, times in plan:
                for _ in range(times):
                    rows.append({"case": case, "kernels": kernels,
                                 **one_run(docker, image, extra, workdir)})  # fmt: skip
        finally:
            subprocess.run(
                [*docker, "volume", "rm", "-f", volume], capture_output=True, check=False
            )
    return rows


def table(report: dict) -> str:
    lines = [
        "# Compiled kernels kept in a Docker volume",
        "",
        "Written by `benchmarks/run_container_cache.py` (its docstring describes the method): "
        "`harmony-step run --device cpu` on the 3,500-cell test dataset in fresh containers of "
        f"`{report['image']}`. Host: {report['host']}; {report['date']}.",
        "",
        "| case | kernels | docker run wall s | step total s |",
        "| --- | --- | ---: | ---: |",
    ]
    for row in report["rows"]:
        lines.append(f"| {row['case']} | {row['kernels']} | {row['wall_seconds']:.2f} | "
                     f"{row['step_seconds']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--image", default=(HERE.parent / "container" / "IMAGE").read_text().strip()
    )
    parser.add_argument("--docker", default=os.environ.get("DOCKER", "docker"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    rows = measure(shlex.split(args.docker), args.image, args.repeat)
    report = {
        "image": args.image,
        "host": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "date": datetime.date.today().isoformat(),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "container_cache.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "container_cache.md").write_text(table(report))
    print(table(report))


if __name__ == "__main__":
    main()
