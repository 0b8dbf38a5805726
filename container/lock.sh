#!/usr/bin/env bash
# Regenerate the hashed lock files the container image installs from.
#
#   container/lock.sh            (needs uv: pip install uv)
#
# Writes, next to this script:
#   requirements-cuda12.lock   harmony-step's dependencies + cupy-cuda12x[ctk] (CUDA 12 libraries)
#   requirements-cuda13.lock   the same with cupy-cuda13x[ctk]
#   requirements-build.lock    the build backend (hatchling) used to build the harmony-step wheel
#
# Every lock is resolved for the oldest Python the image supports (3.11, the python3 of Debian 12)
# on x86_64 manylinux_2_28, and then checked to resolve to exactly the same pins for Python 3.12
# (the default python:3.12-slim base). One lock per CUDA major therefore serves both bases, and an
# image built on either one carries the same package versions.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
index=${LOCK_INDEX_URL:-https://pypi.org/simple}
platform=x86_64-manylinux_2_28
oldest_python=3.11
checked_pythons=(3.12)
# uv ignores pip.conf; the system certificate store is what pip would use as well.
export UV_NATIVE_TLS=${UV_NATIVE_TLS:-1}

compile() { # compile OUTPUT PYTHON SOURCE... [uv options]
    local output=$1 python=$2
    shift 2
    uv pip compile --quiet --generate-hashes --index-url "$index" \
        --python-version "$python" --python-platform "$platform" \
        --custom-compile-command "container/lock.sh" --output-file "$output" "$@"
}

pins() { grep -E '^[A-Za-z0-9]' "$1" | sed 's/ *\\$//' | sort; }

check_same_pins() { # check_same_pins LOCK: the lock's pins must be a complete resolution on newer Pythons
    local lock=$1 python resolved
    for python in "${checked_pythons[@]}"; do
        resolved=$(mktemp)
        compile "$resolved" "$python" "$lock" --no-header --no-annotate
        if ! diff <(pins "$lock") <(pins "$resolved") >/dev/null; then
            echo "lock.sh: error: $(basename "$lock") does not resolve to the same pins on Python $python:" >&2
            diff <(pins "$lock") <(pins "$resolved") >&2 || true
            echo "lock.sh: fix: cap the differing package in pyproject.toml, or keep one lock per Python" >&2
            rm -f "$resolved"
            return 1
        fi
        rm -f "$resolved"
    done
}

cd "$repo"
for cuda in 12 13; do
    lock=$here/requirements-cuda$cuda.lock
    requirement="cupy-cuda${cuda}x[ctk]"
    # The [ctk] extra pulls the CUDA runtime libraries (cudart, nvrtc, cuBLAS, ...) from PyPI,
    # so the image needs nothing from the host but the NVIDIA driver.
    printf '%s\n' "$requirement" | compile "$lock" "$oldest_python" pyproject.toml - --extra "cuda$cuda"
    check_same_pins "$lock"
    echo "wrote $lock ($(pins "$lock" | wc -l) packages)"
done

build_requires=$(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
printf '%s\n' "$build_requires" | compile "$here/requirements-build.lock" "$oldest_python" -
check_same_pins "$here/requirements-build.lock"
echo "wrote $here/requirements-build.lock"
