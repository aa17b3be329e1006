#!/usr/bin/env bash
# Start a throw-away one-node Slurm cluster (munged + slurmctld + slurmd) for the tests:
#   tests/slurm/start_cluster.sh SCRATCH_DIR
# Everything it writes (munge key/socket/log, slurm.conf, state, spool, logs) lives under
# SCRATCH_DIR; /etc/slurm/slurm.conf becomes a symlink to SCRATCH_DIR/slurm.conf (the jobstep
# plugin strips SLURM_* variables, so SLURM_CONF would not reach the srun inside a job); an
# existing one is moved aside and put back by stop_cluster.sh. The daemons' PIDs go to
# SCRATCH_DIR/pids. Installs nothing (see install.sh). Needs root (SlurmUser=root).
# Facts behind the settings: docs/slurm.md in the shared notes.
set -euo pipefail

die() { echo "start_cluster.sh: $*" >&2; exit 1; }
[ $# -eq 1 ] || die "usage: $0 SCRATCH_DIR"
[ "$(id -u)" -eq 0 ] || die "must run as root (SlurmUser=root, /etc/slurm/slurm.conf)"
for exe in munged slurmctld slurmd sinfo scontrol; do
  command -v "$exe" >/dev/null || die "$exe not found: run tests/slurm/install.sh"
done

mkdir -p "$1"
S=$(cd "$1" && pwd)
[ ! -s "$S/pids" ] || die "$S/pids exists: a cluster from this dir may still run (stop_cluster.sh $S)"

CONF=/etc/slurm/slurm.conf
TIMEOUT=${SLURM_TEST_START_TIMEOUT:-60}
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_TEST_SLURMD_PORT:-6818}

logs() {
  for f in "$S"/log/*.log "$S"/munge/munged.log; do
    [ -f "$f" ] && { echo "---- $f (last 30 lines)"; tail -n 30 "$f"; }
  done >&2
}
fail() { echo "start_cluster.sh: $*" >&2; logs; "$(dirname "$0")/stop_cluster.sh" "$S" >&2 || true; exit 1; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$CTLD_PORT" "$SLURMD_PORT"; do
  port_busy "$p" && die "port $p is in use (another slurmctld/slurmd running?); stop it or set SLURM_TEST_CTLD_PORT / SLURM_TEST_SLURMD_PORT"
done

: >"$S/pids"
chmod 755 "$S"
mkdir -p "$S/munge" "$S/state" "$S/spool" "$S/log" "$S/run"
chmod 700 "$S/munge"

# --- munge: own key, socket, pid, log and seed -----------------------------------------------
dd if=/dev/urandom of="$S/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$S/munge/munge.key"
SOCKET=$S/munge/munge.socket
setsid munged --foreground --force --key-file="$S/munge/munge.key" --socket="$SOCKET" \
  --pid-file="$S/munge/munged.pid" --log-file="$S/munge/munged.log" \
  --seed-file="$S/munge/munged.seed" </dev/null >>"$S/munge/munged.out" 2>&1 &
echo "munged $!" >>"$S/pids"
for _ in $(seq 50); do [ -S "$SOCKET" ] && break; sleep 0.1; done
[ -S "$SOCKET" ] || fail "munged did not create its socket $SOCKET"

# --- slurm.conf: this machine as the only node --------------------------------------------
HOST=$(hostname -s)
# slurmd -C reports the node as slurmd sees it (CPUs, topology, RealMemory); a configured
# node that claims more than that would be drained.
node=$(slurmd -C 2>/dev/null | head -n 1 | sed -n 's/^NodeName=[^ ]* //p')
if [ -z "$node" ]; then
  mem=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
  node="CPUs=$(nproc) RealMemory=$mem"
fi
cat >"$S/slurm.conf" <<EOF
# Written by tests/slurm/start_cluster.sh for a one-node test cluster under $S
ClusterName=mimscaletest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=600
MpiDefault=none
SchedulerType=sched/backfill
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$HOST NodeAddr=127.0.0.1 $node State=UNKNOWN
PartitionName=test Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

# --- /etc/slurm/slurm.conf -> ours (the original is put back by stop_cluster.sh) -----------
mkdir -p /etc/slurm
# A link left by an earlier run that was not stopped (its daemons are gone: the ports are free).
if [ -L "$CONF" ] && { [ ! -e "$CONF" ] || head -n 1 "$CONF" | grep -q "^# Written by tests/slurm/start_cluster.sh"; }; then
  rm -f "$CONF"
fi
if [ -e "$CONF" ] || [ -L "$CONF" ]; then
  mv "$CONF" "$S/slurm.conf.orig"
  echo "$CONF" >"$S/slurm.conf.orig.path"
fi
ln -s "$S/slurm.conf" "$CONF"
echo "$CONF" >"$S/conf_link"

# --- daemons ------------------------------------------------------------------------------
export SLURM_CONF=$S/slurm.conf
setsid slurmctld -D -c -i -f "$S/slurm.conf" </dev/null >>"$S/log/slurmctld.out" 2>&1 &
echo "slurmctld $!" >>"$S/pids"
for _ in $(seq 100); do port_busy "$CTLD_PORT" && break; sleep 0.1; done
setsid slurmd -D -f "$S/slurm.conf" </dev/null >>"$S/log/slurmd.out" 2>&1 &
echo "slurmd $!" >>"$S/pids"

deadline=$((SECONDS + TIMEOUT))
state=""
while [ $SECONDS -lt $deadline ]; do
  while read -r name pid; do
    kill -0 "$pid" 2>/dev/null || fail "$name (pid $pid) exited during start-up"
  done <"$S/pids"
  state=$(sinfo -h -o %T 2>/dev/null | head -n 1 || true)
  [ "$state" = idle ] && break
  sleep 0.2
done
[ "$state" = idle ] || fail "node $HOST not idle after ${TIMEOUT}s (sinfo state: '${state:-none}')"
echo "Slurm test cluster up: node $HOST ($node), partition test, config $CONF -> $S/slurm.conf"
