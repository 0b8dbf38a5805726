#!/usr/bin/env bash
# The image's locked package versions, without the image: for a GPU machine that has no container
# runtime and no package index.
#
#   container/gpu-locked-env.sh download WHEEL_DIR [--with-cuda]
#       On a machine that reaches PyPI: fetch, hash-checked, the wheels of the CUDA 13 lock for
#       CPython 3.12 on x86_64 Linux, and build the harmony-step wheel, into WHEEL_DIR. CuPy and the
#       CUDA libraries (cupy-*, cuda-*, nvidia-*: about 1 GB) are left out unless --with-cuda: a GPU
#       machine usually has its own CuPy.
#   container/gpu-locked-env.sh install WHEEL_DIR TARGET_DIR
#       On the GPU machine: install every locked package whose wheel is in WHEEL_DIR (checked
#       against the lock's hashes) and the harmony-step wheel into TARGET_DIR, with no index and
#       no dependency resolution; report which locked packages came from elsewhere.
#       Then: PYTHONPATH=TARGET_DIR PATH=TARGET_DIR/bin:$PATH harmony-step ...
#
# Environment: LOCK (default: requirements-cuda13.lock next to this script), PYTHON (python3).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
lock=${LOCK:-$here/requirements-cuda13.lock}
python=${PYTHON:-python3}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

# Print the lock's requirement blocks (pin line and hash lines); with --without-cuda, leave out
# CuPy and the CUDA libraries.
lock_blocks() { # lock_blocks [--without-cuda]
    "$python" - "$lock" "${1:-}" <<'EOF'
import re
import sys

lock_path, without_cuda = sys.argv[1], sys.argv[2] == "--without-cuda"
blocks, current = [], None
for line in open(lock_path):
    if re.match(r"[A-Za-z0-9]", line):
        current = [line.split("==")[0], [line.rstrip()]]
        blocks.append(current)
    elif current and line.strip().startswith("--hash"):
        current[1].append(line.rstrip())
for name, lines in blocks:
    if not (without_cuda and re.match(r"(cupy|cuda|nvidia)-", name)):
        print("\n".join(lines))
EOF
}

download() {
    local wheel_dir=$1 with_cuda=${2:-} repo selection
    repo=$(dirname "$here")
    mkdir -p "$wheel_dir"
    selection=$(mktemp)
    if [[ $with_cuda == --with-cuda ]]; then lock_blocks >"$selection"; else lock_blocks --without-cuda >"$selection"; fi
    # pip does not widen --platform to older glibc tags itself: name every manylinux tag up to 2.28.
    local platforms=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
    for glibc_minor in $(seq 5 28); do platforms+=(--platform "manylinux_2_${glibc_minor}_x86_64"); done
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
        --python-version 3.12 "${platforms[@]}" -r "$selection" -d "$wheel_dir"
    rm -f "$selection"
    "$python" -m pip wheel --quiet --no-deps --wheel-dir "$wheel_dir" "$repo"
    echo "$(find "$wheel_dir" -name '*.whl' | wc -l) wheels, $(du -sh "$wheel_dir" | cut -f1), in $wheel_dir"
}

install() {
    local wheel_dir target
    wheel_dir=$(cd "$1" && pwd)
    target=$2
    mkdir -p "$target"
    target=$(cd "$target" && pwd)
    "$python" - "$lock" "$wheel_dir" "$target" <<'EOF'
import hashlib
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from pip._vendor.packaging.tags import sys_tags
from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

lock_path, wheel_dir, target = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

# The lock's blocks: pin line plus its hash lines.
blocks, current = {}, None
for line in open(lock_path):
    if re.match(r"[A-Za-z0-9]", line):
        name, version = line.split("==")[0], line.split("==")[1].split()[0]
        current = blocks[canonicalize_name(name)] = {"version": version, "lines": [line.rstrip()]}
    elif current and line.strip().startswith("--hash"):
        current["lines"].append(line.rstrip())

# Wheels on hand that this interpreter can install, by package.
supported = set(sys_tags())
wheels, project_wheels = {}, []
for wheel in sorted(wheel_dir.glob("*.whl")):
    name, version, _, tags = parse_wheel_filename(wheel.name)
    if name == "harmony-step":
        project_wheels.append(wheel)
    elif tags & supported:
        wheels.setdefault(name, {})[str(version)] = wheel

chosen = {name: block for name, block in blocks.items() if block["version"] in wheels.get(name, {})}
if len(project_wheels) != 1:
    sys.exit(f"error: {wheel_dir} must hold exactly one harmony_step-*.whl, found {len(project_wheels)}; "
             "run 'gpu-locked-env.sh download' to build it")
project_wheel = project_wheels[0]
digest = hashlib.sha256(project_wheel.read_bytes()).hexdigest()

with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as requirements:
    for block in chosen.values():
        print("\n".join(block["lines"]), file=requirements)
    print(f"{project_wheel} --hash=sha256:{digest}", file=requirements)
# --no-deps: the lock is the complete set; nothing may be resolved against what happens to be here.
subprocess.run(
    [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheel_dir),
     "--no-deps", "--require-hashes", "--upgrade", "--target", str(target), "-r", requirements.name],
    check=True,
)
Path(requirements.name).unlink()

# Where each locked package now comes from, as Python sees it with TARGET first on the path.
sys.path.insert(0, str(target))
rows, mismatches = [], 0
for name, block in sorted(blocks.items()):
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        version = "-"
    source = "wheels" if name in chosen else ("this machine" if version != "-" else "missing")
    mark = "" if version == block["version"] else "  <- differs from the lock"
    if version == "-" and re.match(r"(cupy|cuda|nvidia)-", name):
        # CUDA library wheels left out on purpose: CuPy then loads the machine's CUDA libraries.
        mark = "  (CUDA libraries of this machine)"
    mismatches += "differs" in mark
    rows.append(f"  {name:28} {block['version']:14} {version:14} {source}{mark}")
print(f"{'  package':30} {'locked':14} {'in use':14} from")
print("\n".join(rows))
print(f"installed {len(chosen)} locked packages and {project_wheel.name} into {target}; "
      f"{mismatches} package(s) differ from the lock")
print(f"use: PYTHONPATH={target} PATH={target}/bin:$PATH harmony-step --version")
EOF
}

case ${1:-} in
    download) [[ $# -ge 2 && $# -le 3 ]] || usage; download "$2" "${3:-}" ;;
    install) [[ $# -eq 3 ]] || usage; install "$2" "$3" ;;
    *) usage ;;
esac
