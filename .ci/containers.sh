#!/usr/bin/env bash
# Container CI for harmony-step: build the image, test it under Docker, convert it to a SIF and run
# the Snakemake workflow through Apptainer with the workflow's own `container:` directive.
#
#   sudo .ci/containers.sh
#
# Runs as root on a Debian 12 machine that reaches only PyPI and the Debian mirror (no Docker Hub):
# it installs what it needs, builds the image over a debootstrapped Debian 12 base instead of the
# default python:3.12-slim base, and runs Apptainer from a Debian sid root (the sid package needs a
# newer glibc than Debian 12 has). Safe to run again: finished steps are reused. The daemons it starts
# are stopped by PID on exit.
#
# Environment (all optional):
#   HARMONY_STEP_CI_DIR    work folder: Docker data, base root, SIF, test venv (/tmp/harmony-step-ci)
#   HARMONY_STEP_SID_ROOT  Debian sid root holding Apptainer; must lie outside /tmp, which the
#                          apptainer wrapper binds into it (/var/tmp/harmony-step-ci-sid)
#   CUDA                   12 or 13: which lock the image is built from (12)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
ci_dir=${HARMONY_STEP_CI_DIR:-/tmp/harmony-step-ci}
sid_root=${HARMONY_STEP_SID_ROOT:-/var/tmp/harmony-step-ci-sid}
cuda=${CUDA:-12}
mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
image=$(tr -d '[:space:]' <"$repo/container/IMAGE")
base_image=local/bookworm-min:base
# /usr/local/bin/docker may be a newer client without buildx; BuildKit needs the packaged one.
docker=/usr/bin/docker
docker_dir=$ci_dir/docker
export DOCKER_HOST=unix://$docker_dir/docker.sock
export DOCKER_BUILDKIT=1

script_start=$SECONDS
phase_start=$SECONDS
phase_name=""
timings=()
phase() { # phase NAME: end the previous phase (printing its time) and start NAME
    if [[ -n $phase_name ]]; then
        timings+=("$(printf '%-28s %5d s' "$phase_name" $((SECONDS - phase_start)))")
        echo "[containers] $phase_name: $((SECONDS - phase_start)) s"
    fi
    phase_name=$1
    phase_start=$SECONDS
    [[ -n $phase_name ]] && echo "[containers] --- $phase_name"
    return 0
}

created_policy=""
failed=()
cleanup() {
    local status=$?
    if [[ -f $docker_dir/dockerd.pid ]]; then
        stop_pid "$(cat "$docker_dir/dockerd.pid")" dockerd
    fi
    if [[ -n $created_policy ]]; then rm -f /usr/sbin/policy-rc.d; fi
    phase ""
    echo "[containers] timings:"
    printf '  %s\n' "${timings[@]}"
    echo "[containers] total: $((SECONDS - script_start)) s, exit status $status"
}
trap cleanup EXIT

stop_pid() { # stop_pid PID NAME: TERM, wait up to 30 s, then KILL
    local pid=$1 name=$2
    kill -0 "$pid" 2>/dev/null || return 0
    echo "[containers] stopping $name (pid $pid)"
    kill "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
}

apt_install() {
    # Other jobs may hold the dpkg lock: wait for it instead of failing.
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get -o DPkg::Lock::Timeout=600 install -y -q \
        --no-install-recommends "$@" >"$ci_dir/apt.log" 2>&1 || { tail -20 "$ci_dir/apt.log"; return 1; }
}

if [[ $(id -u) -ne 0 ]]; then
    echo "containers.sh: error: run as root (it installs packages and starts dockerd)" >&2
    exit 1
fi
mkdir -p "$ci_dir"
cd "$repo"

phase "install packages"
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    # Keep apt from starting the Docker service: this script runs its own dockerd.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created_policy=1
fi
timeout 600 apt-get -o DPkg::Lock::Timeout=600 update -q >"$ci_dir/apt-update.log" 2>&1
apt_install docker.io debootstrap squashfs-tools uidmap python3 python3-venv ca-certificates git

phase "start dockerd"
mkdir -p "$docker_dir"
if [[ -f $docker_dir/dockerd.pid ]]; then stop_pid "$(cat "$docker_dir/dockerd.pid")" "stale dockerd"; fi
# No bridge and no firewall rules: builds use the host network, containers run with --network none.
dockerd --data-root "$docker_dir/root" --exec-root "$docker_dir/exec" -H "$DOCKER_HOST" \
    --pidfile "$docker_dir/dockerd.pid" --bridge=none --iptables=false --ip-forward=false \
    --ip-masq=false >"$docker_dir/dockerd.log" 2>&1 &
for _ in $(seq 120); do "$docker" version >/dev/null 2>&1 && break; sleep 0.5; done
"$docker" version --format 'docker engine {{.Server.Version}}'

phase "Debian 12 base image"
rootfs=$ci_dir/bookworm-rootfs
if ! "$docker" image inspect "$base_image" >/dev/null 2>&1; then
    if [[ ! -f $rootfs/.complete ]]; then
        rm -rf "$rootfs"
        timeout 900 debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$ci_dir/debootstrap.log" 2>&1 \
            || { tail -20 "$ci_dir/debootstrap.log"; exit 1; }
        touch "$rootfs/.complete"
    fi
    tar -C "$rootfs" --exclude=./.complete -c . | "$docker" import - "$base_image"
fi

phase "docker build"
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
secret=()
if [[ -s /etc/ssl/certs/ca-certificates.crt ]]; then
    # pip inside the build must trust the same certificate authorities as this machine.
    # shellcheck disable=SC2054  # the comma belongs to the --secret value
    secret=(--secret id=hostca,src=/etc/ssl/certs/ca-certificates.crt)
fi
timeout 1500 "$docker" build --progress=plain --network host "${secret[@]}" \
    --build-arg BASE="$base_image" --build-arg CUDA="$cuda" --build-arg IMAGE="$image" \
    --build-arg VERSION="${image##*:}" --build-arg REVISION="$revision" \
    -f container/Dockerfile -t "$image" . >"$ci_dir/docker-build.log" 2>&1 \
    || { tail -40 "$ci_dir/docker-build.log"; exit 1; }
"$docker" image inspect "$image" --format "built $image: {{.Size}} bytes ({{.Id}})"

phase "test venv"
venv=$ci_dir/venv
# The host run must use the image's versions of harmony-step's own dependencies for its result to
# match bit for bit; the lock pins them (uv notes them as "via harmony-step"). Their dependencies
# stay free, so that the test tools (Snakemake) resolve next to them.
awk '/^[A-Za-z0-9]/ {pin = $1} /# +(via )?harmony-step \(pyproject.toml\)/ {print pin}' \
    "container/requirements-cuda$cuda.lock" >"$ci_dir/constraints.txt"
# The venv holds an editable install of this checkout: rebuild it for another checkout or pins.
stamp=$( (echo "$repo"; cat pyproject.toml "$ci_dir/constraints.txt") | sha256sum | cut -c1-16)
if [[ ! -f $venv/.stamp-$stamp ]]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    # uv resolves and installs this set in ~20 s where pip takes minutes.
    { timeout 300 "$venv/bin/pip" install -q uv &&
        UV_NATIVE_TLS=1 timeout 900 "$venv/bin/uv" pip install -q --python "$venv/bin/python" \
            -c "$ci_dir/constraints.txt" -e '.[test,workflow]'; } >"$ci_dir/pip.log" 2>&1 \
        || { tail -20 "$ci_dir/pip.log"; exit 1; }
    touch "$venv/.stamp-$stamp"
fi
"$venv/bin/python" -m pip list --format=freeze 2>/dev/null | grep -iE '^(numpy|scipy|anndata|snakemake)=='

phase "pytest: Docker"
export HARMONY_STEP_INTEGRATION=1
export HARMONY_STEP_TEST_DOCKER=$docker
export HARMONY_STEP_TEST_IMAGE=$image
export HARMONY_STEP_TEST_REVISION=$revision
# A failing suite does not stop the script: the Apptainer half still runs and reports.
timeout 1200 "$venv/bin/python" -m pytest -v -p no:cacheprovider tests/integration/test_containers.py \
    -k "not workflow and not sif and not definition" || failed+=("pytest: Docker")

phase "Apptainer in a sid root"
if [[ ! -x $sid_root/usr/bin/apptainer ]]; then
    if [[ ! -f $sid_root/.debootstrap-complete ]]; then
        rm -rf "$sid_root"
        timeout 900 debootstrap --variant=minbase sid "$sid_root" "$mirror" >"$ci_dir/debootstrap-sid.log" 2>&1 \
            || { tail -20 "$ci_dir/debootstrap-sid.log"; exit 1; }
        touch "$sid_root/.debootstrap-complete"
    fi
    cp /etc/resolv.conf /etc/hosts "$sid_root/etc/"
    timeout 900 chroot "$sid_root" sh -c 'apt-get -q -o Acquire::Check-Valid-Until=false update &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends apptainer' \
        >"$ci_dir/apt-sid.log" 2>&1 || { tail -20 "$ci_dir/apt-sid.log"; exit 1; }
fi
# Full capabilities for root need a kernel feature this machine's containers lack.
sed -i 's/^root default capabilities = full/root default capabilities = file/' "$sid_root/etc/apptainer/apptainer.conf"
mkdir -p "$ci_dir/bin"
{
    printf '#!/bin/sh\nsid_root=%q\nci_dir=%q\n' "$sid_root" "$ci_dir"
    cat <<'EOF'
# apptainer (or singularity: the name it is called by) from a Debian sid root. Apptainer refuses a
# plain chroot, so this enters a private mount namespace, pivot_roots into that root with /proc,
# /sys, /dev and the host folders jobs use (/tmp, $HOME, the current folder, the CI folder) bound
# in, and runs the command there.
command=/usr/bin/$(basename "$0")
exec unshare --mount --propagation private /bin/sh -eu -c '
root=$1 workdir=$2 ci_dir=$3
shift 3
mount --rbind "$root" "$root"
for dir in /proc /sys /dev; do mount --rbind "$dir" "$root$dir"; done
for dir in /tmp "${HOME:-/root}" "$workdir" "$ci_dir"; do
    case "$dir" in /|"$root"|"$root"/*) continue ;; esac
    mkdir -p "$root$dir"
    mount --rbind "$dir" "$root$dir"
done
cd "$root"
mkdir -p .host-root
pivot_root . .host-root
umount -l /.host-root
cd "$workdir"
exec "$@"
' wrapper "$sid_root" "$PWD" "$ci_dir" "$command" "$@"
EOF
} >"$ci_dir/bin/apptainer"
chmod +x "$ci_dir/bin/apptainer"
# Snakemake before 9.16 looks for the singularity command only.
ln -sf apptainer "$ci_dir/bin/singularity"
export PATH=$ci_dir/bin:$PATH
apptainer --version

phase "SIF from the Docker image"
sif_dir=$ci_dir/sif
sif=$sif_dir/harmony-step.sif
mkdir -p "$sif_dir"
image_id=$("$docker" image inspect "$image" --format '{{.Id}}')
if [[ ! -f $sif || $(cat "$sif.image-id" 2>/dev/null) != "$image_id" ]]; then
    timeout 600 "$docker" save -o "$sif_dir/image.tar" "$image"
    # lz4 squashes this 4 GB image several times faster than the default gzip on two cores; a
    # release SIF uses the default (see container/README.md).
    (cd "$sif_dir" && timeout 1200 apptainer build --force --mksquashfs-args "-comp lz4" \
        "$sif" "docker-archive://$sif_dir/image.tar") >"$ci_dir/sif-build.log" 2>&1 \
        || { tail -20 "$ci_dir/sif-build.log"; exit 1; }
    rm -f "$sif_dir/image.tar"
    echo "$image_id" >"$sif.image-id"
fi
ls -l "$sif"

phase "Apptainer definition file"
# container/harmony-step.def bootstraps from Docker Hub; here it starts from the same Debian 12 root
# as the Docker build (device nodes left out: a user namespace cannot create them). %post needs
# that user namespace, with subordinate IDs for root.
def_sandbox=$ci_dir/def-sandbox
def_stamp=$( (echo "$image_id"; cat container/harmony-step.def) | sha256sum | cut -c1-16)
if [[ ! -f $def_sandbox.stamp-$def_stamp ]]; then
    for file in /etc/subuid /etc/subgid; do
        grep -qx 'root:100000:65536' "$file" 2>/dev/null || echo 'root:100000:65536' >>"$file"
    done
    def_base=$ci_dir/bookworm-rootfs-nodev
    rm -rf "$def_base" "$def_sandbox" "$def_sandbox".stamp-*
    mkdir -p "$def_base"
    tar -C "$rootfs" --exclude='./dev/*' --exclude=./.complete -c . | tar -x -C "$def_base"
    sed 's/^Bootstrap: docker$/Bootstrap: localimage/' container/harmony-step.def >"$ci_dir/harmony-step-local.def"
    def_certs=()
    if [[ -s /etc/ssl/certs/ca-certificates.crt ]]; then
        mkdir -p "$ci_dir/host-certs"
        cp /etc/ssl/certs/ca-certificates.crt "$ci_dir/host-certs/"
        def_certs=(--bind "$ci_dir/host-certs:/mnt/host-certs")
    fi
    timeout 1200 unshare --map-root-user --map-users=100000,1,65535 --map-groups=100000,1,65535 \
        apptainer build --force --sandbox "${def_certs[@]}" --build-arg BASE="$def_base" \
        --build-arg CUDA="$cuda" --build-arg IMAGE="$image" --build-arg REVISION="$revision" \
        "$def_sandbox" "$ci_dir/harmony-step-local.def" >"$ci_dir/def-build.log" 2>&1 \
        || { tail -20 "$ci_dir/def-build.log"; exit 1; }
    rm -rf "$def_base"
    touch "$def_sandbox.stamp-$def_stamp"
fi

phase "pytest: Apptainer + Snakemake"
export HARMONY_STEP_TEST_SIF=$sif
export HARMONY_STEP_TEST_DEF_SANDBOX=$def_sandbox
timeout 1200 "$venv/bin/python" -m pytest -v -p no:cacheprovider tests/integration/test_containers.py \
    -k "workflow or sif or definition" || failed+=("pytest: Apptainer + Snakemake")
phase ""
if ((${#failed[@]})); then
    echo "[containers] FAILED: ${failed[*]}" >&2
    exit 1
fi
