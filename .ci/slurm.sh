#!/usr/bin/env bash
# Bring up a one-node Slurm cluster on loopback, with a declared GPU, and run the Slurm test suite
# against it (tests/integration/test_slurm.py, tests/integration/test_srun.py and
# tests/test_profiles.py).
#
# Run as root on Debian 12. Installs what it needs, can be re-run, bounds every step with
# `timeout -s KILL`, and stops the daemons it started (by PID) when it exits, however it exits.
#
# With arguments, runs them instead of the tests while the cluster is up (for example
# `.ci/slurm.sh bash` for a shell on it); the cluster stops when they finish.
#
# Environment:
#   SLURM_CI_DIR   state, spool and log folder of the test cluster (default /tmp/harmony-step-slurm)
#   VENV           Python virtual environment to use or create (default <repo>/.venv)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${SLURM_CI_DIR:-/tmp/harmony-step-slurm}
VENV=${VENV:-$ROOT/.venv}
SLURM_CONF_FILE=/etc/slurm/slurm.conf
GRES_CONF_FILE=/etc/slurm/gres.conf
MARKER="# written by harmony-step .ci/slurm.sh"
# Daemons die on their own after this long even if this script is killed before its trap runs.
DAEMON_LIFETIME_S=3600

log() { printf '[slurm.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (installs packages and starts slurmctld/slurmd)"

# --------------------------------------------------------------------------------------------
# Clean-up: everything this script started, by PID, newest first.
STARTED_PIDS=()
POLICY_RC_WRITTEN=0
cleanup() {
    local rc=$?
    set +e
    if ((${#STARTED_PIDS[@]})) && command -v squeue > /dev/null; then
        # Jobs outlive slurmd (slurmstepd is its own process): cancel them while the daemons run.
        local jobs
        mapfile -t jobs < <(timeout -s KILL 10 squeue -h -o %i 2> /dev/null)
        ((${#jobs[@]})) && timeout -s KILL 10 scancel "${jobs[@]}"
        for _ in $(seq 20); do
            [[ -z $(timeout -s KILL 5 squeue -h -o %i 2> /dev/null) ]] && break
            sleep 0.5
        done
    fi
    local i pid
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        pid=${STARTED_PIDS[i]}
        kill -TERM "$pid" 2> /dev/null || continue
        for _ in $(seq 20); do
            kill -0 "$pid" 2> /dev/null || break
            sleep 0.5
        done
        kill -KILL "$pid" 2> /dev/null
        wait "$pid" 2> /dev/null
    done
    ((POLICY_RC_WRITTEN)) && rm -f /usr/sbin/policy-rc.d
    log "stopped; logs in $STATE/log (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Start a daemon in the foreground under a hard time limit and remember its PID.
# `timeout` passes TERM on to the daemon, so stopping this PID stops the daemon.
declare -A DAEMON_NAMES=()
start_daemon() {
    local name=$1
    shift
    timeout -s KILL "$DAEMON_LIFETIME_S" "$@" > "$STATE/log/$name.out" 2>&1 &
    STARTED_PIDS+=("$!")
    DAEMON_NAMES[$!]=$name
    log "started $name (pid $!)"
}

# Stop at once, with its last words, if a daemon has exited.
check_daemons() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do
        if ! kill -0 "$pid" 2> /dev/null; then
            tail -n 5 "$STATE/log/${DAEMON_NAMES[$pid]}.out" >&2
            die "${DAEMON_NAMES[$pid]} exited; see $STATE/log"
        fi
    done
}

# Wait until a check (a function that bounds its own commands) succeeds, at most $1 seconds.
wait_for() {
    local limit=$1 what=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" > /dev/null 2>&1; do
        check_daemons
        ((SECONDS < deadline)) || die "$what not ready after ${limit}s; see $STATE/log"
        sleep 0.5
    done
}

# --------------------------------------------------------------------------------------------
# 1. Packages
PACKAGES=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    # The packages' init scripts would start daemons with the stock configuration; keep them off.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        POLICY_RC_WRITTEN=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    APT=(apt-get -o DPkg::Lock::Timeout=300 -y -q)
    timeout -s KILL 600 "${APT[@]}" update
    timeout -s KILL 900 "${APT[@]}" install --no-install-recommends "${missing[@]}"
fi

# --------------------------------------------------------------------------------------------
# 2. Configuration: one node on loopback, no cgroups, no accounting database.
NODE=$(hostname -s)
if [[ -e $SLURM_CONF_FILE ]] && ! grep -qF "$MARKER" "$SLURM_CONF_FILE"; then
    die "$SLURM_CONF_FILE exists and was not written by this script; refusing to replace a real cluster configuration"
fi
# Daemons of an earlier run that was killed before it could stop them: stop them by the PIDs they
# recorded in this script's state folder.
for daemon in slurmd slurmctld munge/munged; do
    pid=$(cat "$STATE/$daemon.pid" 2> /dev/null) || continue
    daemon=${daemon#*/}
    if [[ $(cat "/proc/$pid/comm" 2> /dev/null) == "$daemon" ]]; then
        log "stopping $daemon (pid $pid) left by an earlier run"
        kill -TERM "$pid"
        timeout -s KILL 30 tail --pid="$pid" -f /dev/null || kill -KILL "$pid"
    fi
done
if pgrep -x slurmctld > /dev/null || pgrep -x slurmd > /dev/null; then
    die "slurmctld or slurmd is already running; stop it first (this script starts its own)"
fi
rm -rf "$STATE"
mkdir -p "$STATE"/{state,spool,log} /etc/slurm

# The node declares more CPUs and memory than a CI machine has, and two GPUs it does not have,
# so that the profile's real requests (several CPUs, a GPU, gigabytes) are accepted as written.
# config_overrides makes slurmd report the declared node instead of draining it for the
# difference; with no cgroups nothing is enforced, so the jobs simply share the real cores.
cat > "$SLURM_CONF_FILE" << EOF
$MARKER: single-node test cluster, safe to delete
ClusterName=harmonyci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# Finished jobs stay visible to squeue and scontrol for an hour: the executor polls squeue and
# the tests read each job's allocation back with scontrol.
MinJobAge=3600
SlurmdParameters=config_overrides
GresTypes=gpu
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=16 RealMemory=64000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
# Slurm drops a GPU that has no device file, so each declared GPU gets a stand-in device node
# (the null device's numbers). Slurm allocates them and sets CUDA_VISIBLE_DEVICES; nothing in
# a job can compute on them, which is why the tests run Harmony with --device cpu.
mkdir -p "$STATE/dev"
for i in 0 1; do mknod "$STATE/dev/gpu$i" c 1 3; done
cat > "$GRES_CONF_FILE" << EOF
$MARKER
AutoDetect=off
NodeName=$NODE Name=gpu File=$STATE/dev/gpu[0-1]
EOF

# --------------------------------------------------------------------------------------------
# 3. Daemons
# A munged of our own, on its own socket, so that a system munged is neither needed nor touched.
MUNGE_SOCKET=$STATE/munge/munge.socket
munge_works() { timeout -s KILL 5 sh -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'"; }
[[ -s /etc/munge/munge.key ]] || timeout -s KILL 30 mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
mkdir -p "$STATE/munge"
chown munge:munge "$STATE/munge"
start_daemon munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged \
    --foreground --force --socket="$MUNGE_SOCKET" --pid-file="$STATE/munge/munged.pid" \
    --seed-file="$STATE/munge/munged.seed" --key-file=/etc/munge/munge.key
wait_for 30 munged munge_works

start_daemon slurmctld /usr/sbin/slurmctld -D -f "$SLURM_CONF_FILE"
ctld_up() { timeout -s KILL 10 scontrol ping; }
wait_for 30 slurmctld ctld_up
start_daemon slurmd /usr/sbin/slurmd -D -f "$SLURM_CONF_FILE"
node_idle() { [[ $(timeout -s KILL 10 sinfo -h -n "$NODE" -o %T) == idle ]]; }
wait_for 60 "node $NODE" node_idle
log "cluster up: $(timeout -s KILL 10 sinfo -h -o '%P %D %T %c CPUs %m MB %G')"

# A one-GPU step, as the Snakemake Slurm executor submits for `gpu: 1`.
timeout -s KILL 60 srun --gpus=1 -n1 true || die "Slurm refused a --gpus=1 job step; see $STATE/log"

# --------------------------------------------------------------------------------------------
# 4. Python environment with the Snakemake Slurm executor
if [[ ! -x $VENV/bin/python ]]; then
    log "creating $VENV"
    timeout -s KILL 120 python3 -m venv "$VENV"
fi
timeout -s KILL 600 "$VENV/bin/pip" install -q -e "${ROOT}[test,workflow]" snakemake-executor-plugin-slurm

# --------------------------------------------------------------------------------------------
# 5. Tests
cd "$ROOT"
export HARMONY_STEP_INTEGRATION=1
if (($#)); then
    log "running $*"
    timeout -s KILL "$DAEMON_LIFETIME_S" "$@"
else
    log "running the Slurm tests"
    timeout -s KILL 1500 "$VENV/bin/python" -m pytest -v -p no:cacheprovider \
        tests/test_profiles.py tests/integration/test_slurm.py tests/integration/test_srun.py
fi
