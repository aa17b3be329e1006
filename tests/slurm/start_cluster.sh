#!/usr/bin/env bash
# Start a throw-away Slurm cluster (munged + slurmctld + one slurmd per node) for the tests:
#   tests/slurm/start_cluster.sh SCRATCH_DIR [--nodes K] [--gpus G]
# --gpus G: every node advertises G fake GPUs (GresTypes=gpu; gres.conf File= character devices
#   made with mknod under SCRATCH_DIR/dev), so jobs asking for GPUs are scheduled and their
#   tasks get CUDA_VISIBLE_DEVICES, as on a GPU cluster.
# --nodes 1 (default): this machine is the node (its hostname, 127.0.0.1);
#   /etc/slurm/slurm.conf becomes a symlink to SCRATCH_DIR/slurm.conf (the jobstep plugin strips
#   SLURM_* variables, so SLURM_CONF would not reach the srun inside a job); an existing one is
#   moved aside and put back by stop_cluster.sh.
# --nodes K >= 2: K nodes node1..nodeK, each a network + UTS namespace of its own (a veth into a
#   bridge inside node1's namespace, 10.213.7.<i>/24: addresses only inside namespaces this
#   script creates; nothing changes in the machine's own network). node1 also runs slurmctld
#   and is the login node: run clients there, `tests/slurm/on_node.sh SCRATCH_DIR node1 CMD`.
#   Each node sees its own /etc/hosts and /etc/slurm (bind mounts of /etc/netns/<ns>/, made by
#   on_node.sh); /etc/slurm/slurm.conf of the machine is not touched. Why namespaces and not
#   Slurm's multiple-slurmd mode: docs/cluster.md ("The test clusters").
# Everything it writes lives under SCRATCH_DIR (and /etc/netns/<ns>/); the daemons' PIDs go to
# SCRATCH_DIR/pids, the namespaces to SCRATCH_DIR/netns. Installs nothing (see install.sh).
# Needs root (SlurmUser=root). Facts behind the settings: docs/slurm.md in the shared notes.
set -euo pipefail

die() { echo "start_cluster.sh: $*" >&2; exit 1; }
usage="usage: $0 SCRATCH_DIR [--nodes K] [--gpus G]"
[ $# -ge 1 ] || die "$usage"
DIR=$1
shift
NODES=1 GPUS=0
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) NODES=${2:?$usage}; shift 2 ;;
    --gpus) GPUS=${2:?$usage}; shift 2 ;;
    *) die "$usage" ;;
  esac
done
[[ $NODES =~ ^[1-9][0-9]?$ ]] || die "--nodes $NODES: a whole number from 1 to 99"
[[ $GPUS =~ ^[0-9]$ ]] || die "--gpus $GPUS: a whole number from 0 to 9"
[ "$(id -u)" -eq 0 ] || die "must run as root (SlurmUser=root, /etc/slurm/slurm.conf, namespaces)"
need=(munged slurmctld slurmd sinfo scontrol)
[ "$NODES" -gt 1 ] && need+=(ip unshare)
[ "$GPUS" -gt 0 ] && need+=(mknod)
for exe in "${need[@]}"; do
  command -v "$exe" >/dev/null || die "$exe not found: run tests/slurm/install.sh"
done

mkdir -p "$DIR"
S=$(cd "$DIR" && pwd)
[ ! -s "$S/pids" ] || die "$S/pids exists: a cluster from this dir may still run (stop_cluster.sh $S)"

TIMEOUT=${SLURM_TEST_START_TIMEOUT:-60}
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_TEST_SLURMD_PORT:-6818}
here=$(cd "$(dirname "$0")" && pwd)

logs() {
  for f in "$S"/log/*.log "$S"/munge/munged.log; do
    [ -f "$f" ] && { echo "---- $f (last 30 lines)"; tail -n 30 "$f"; }
  done >&2
}
fail() { echo "start_cluster.sh: $*" >&2; logs; "$here/stop_cluster.sh" "$S" >&2 || true; exit 1; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [ "$NODES" -eq 1 ]; then
  for p in "$CTLD_PORT" "$SLURMD_PORT"; do
    port_busy "$p" && die "port $p is in use (another slurmctld/slurmd running?); stop it or set SLURM_TEST_CTLD_PORT / SLURM_TEST_SLURMD_PORT"
  done
fi

: >"$S/pids"
: >"$S/netns"
chmod 755 "$S"
mkdir -p "$S/munge" "$S/state" "$S/log" "$S/run"
chmod 700 "$S/munge"

# --- munge: own key, socket, pid, log and seed -----------------------------------------------
# A path-name socket: namespaced daemons reach it too (network namespaces do not split them).
dd if=/dev/urandom of="$S/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$S/munge/munge.key"
SOCKET=$S/munge/munge.socket
setsid munged --foreground --force --key-file="$S/munge/munge.key" --socket="$SOCKET" \
  --pid-file="$S/munge/munged.pid" --log-file="$S/munge/munged.log" \
  --seed-file="$S/munge/munged.seed" </dev/null >>"$S/munge/munged.out" 2>&1 &
echo "munged $!" >>"$S/pids"
for _ in $(seq 50); do [ -S "$SOCKET" ] && break; sleep 0.1; done
[ -S "$SOCKET" ] || fail "munged did not create its socket $SOCKET"

# --- the nodes: names, addresses, namespaces ------------------------------------------------
# slurmd -C reports the node as slurmd sees it (CPUs, topology, RealMemory); a configured node
# that claims more than that would be drained. Namespaced nodes share this machine's cores.
hw=$(slurmd -C 2>/dev/null | head -n 1 | sed -n 's/^NodeName=[^ ]* //p')
if [ -z "$hw" ]; then
  mem=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
  hw="CPUs=$(nproc) RealMemory=$mem"
fi
names=() addrs=() netns=()
if [ "$NODES" -eq 1 ]; then
  names=("$(hostname -s)") addrs=(127.0.0.1) netns=("")
  CTLD_ADDR=127.0.0.1
else
  # Namespace names unique to this scratch dir, so concurrent or leftover clusters never clash.
  tag=$(basename "$S" | md5sum | cut -c1-6)
  for i in $(seq "$NODES"); do
    names+=("node$i") addrs+=("10.213.7.$i") netns+=("mimscale-$tag-n$i")
  done
  CTLD_ADDR=${addrs[0]}
  hosts="127.0.0.1 localhost"$'\n'
  for i in "${!names[@]}"; do hosts+="${addrs[$i]} ${names[$i]}"$'\n'; done
  mkdir -p /etc/slurm
  for i in "${!names[@]}"; do
    ns=${netns[$i]}
    ip netns add "$ns" || fail "ip netns add $ns failed"
    echo "$ns" >>"$S/netns"
    ip -n "$ns" link set lo up
    mkdir -p "/etc/netns/$ns/slurm"
    printf '%s' "$hosts" >"/etc/netns/$ns/hosts"
    ln -sf "$S/slurm.conf" "/etc/netns/$ns/slurm/slurm.conf"
    ln -sf "$S/gres.conf" "/etc/netns/$ns/slurm/gres.conf"
  done
  head=${netns[0]}
  ip -n "$head" link add br0 type bridge
  ip -n "$head" addr add "${addrs[0]}/24" dev br0
  ip -n "$head" link set br0 up
  for i in $(seq 1 $((NODES - 1))); do
    # Made inside the namespaces, never in the machine's own.
    ip link add eth0 netns "${netns[$i]}" type veth peer name "v$i" netns "$head" \
      || fail "veth for ${names[$i]} failed"
    ip -n "$head" link set "v$i" master br0
    ip -n "$head" link set "v$i" up
    ip -n "${netns[$i]}" addr add "${addrs[$i]}/24" dev eth0
    ip -n "${netns[$i]}" link set eth0 up
  done
  for i in "${!names[@]}"; do echo "${names[$i]} ${netns[$i]} ${addrs[$i]}"; done >"$S/nodes"
fi

# --- fake GPUs: character devices (plain files are rejected by slurmd) ------------------------
gres_node=""
if [ "$GPUS" -gt 0 ]; then
  mkdir -p "$S/dev"
  : >"$S/gres.conf"
  for i in "${!names[@]}"; do
    for g in $(seq 0 $((GPUS - 1))); do
      dev=$S/dev/${names[$i]}-gpu$g
      [ -e "$dev" ] || mknod "$dev" c 1 3  # /dev/null's numbers: opening it does nothing
    done
    echo "NodeName=${names[$i]} Name=gpu File=$S/dev/${names[$i]}-gpu[0-$((GPUS - 1))]" >>"$S/gres.conf"
  done
  gres_node="Gres=gpu:$GPUS"
fi

# --- slurm.conf ------------------------------------------------------------------------------
{
  echo "# Written by tests/slurm/start_cluster.sh for a $NODES-node test cluster under $S"
  cat <<EOF
ClusterName=mimscaletest
SlurmctldHost=${names[0]}($CTLD_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$SOCKET,cred_expire=${SLURM_TEST_CRED_EXPIRE:-20}
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
SlurmdSpoolDir=$S/spool/%n
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
# A lost node is noticed in seconds, not minutes (the node-failure test).
SlurmdTimeout=${SLURM_TEST_SLURMD_TIMEOUT:-30}
EOF
  [ "$GPUS" -gt 0 ] && echo "GresTypes=gpu"
  for i in "${!names[@]}"; do
    echo "NodeName=${names[$i]} NodeAddr=${addrs[$i]} $hw $gres_node State=UNKNOWN"
  done
  echo "PartitionName=test Nodes=$(IFS=,; echo "${names[*]}") Default=YES MaxTime=INFINITE State=UP"
} >"$S/slurm.conf"

# --- one node: /etc/slurm/slurm.conf -> ours (the original is put back by stop_cluster.sh) ---
if [ "$NODES" -eq 1 ]; then
  CONF=/etc/slurm/slurm.conf
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
fi
# slurmd reads gres.conf beside the slurm.conf it is given (-f): $S/gres.conf in both layouts.

# --- daemons ----------------------------------------------------------------------------------
export SLURM_CONF=$S/slurm.conf
# on_node I CMD...: run CMD on node i (nothing to wrap for the one-node cluster).
on_node() {
  local i=$1
  shift
  if [ -z "${netns[$i]}" ]; then "$@"; else "$here/on_node.sh" "$S" "${names[$i]}" "$@"; fi
}
# daemon NAME I CMD...: start CMD on node i in the background, its PID to $S/pids. setsid and
# the on_node.sh chain exec (no fork), so $! is the daemon itself: stop_cluster.sh kills it.
daemon() {
  local name=$1 i=$2
  shift 2
  if [ -z "${netns[$i]}" ]; then
    setsid "$@" </dev/null >>"$S/log/${name/:/.}.out" 2>&1 &
  else
    setsid "$here/on_node.sh" "$S" "${names[$i]}" "$@" </dev/null >>"$S/log/${name/:/.}.out" 2>&1 &
  fi
  echo "$name $!" >>"$S/pids"
}
daemon slurmctld 0 slurmctld -D -c -i -f "$S/slurm.conf"
for _ in $(seq 100); do
  if [ -z "${netns[0]}" ]; then port_busy "$CTLD_PORT" && break
  else on_node 0 bash -c "(exec 3<>/dev/tcp/$CTLD_ADDR/$CTLD_PORT) 2>/dev/null" && break; fi
  sleep 0.1
done
for i in "${!names[@]}"; do
  mkdir -p "$S/spool/${names[$i]}"
  daemon "slurmd:${names[$i]}" "$i" slurmd -D -N "${names[$i]}" -f "$S/slurm.conf"
done

deadline=$((SECONDS + TIMEOUT))
idle=0
while [ $SECONDS -lt $deadline ]; do
  while read -r name pid; do
    kill -0 "$pid" 2>/dev/null || fail "$name (pid $pid) exited during start-up"
  done <"$S/pids"
  idle=$(on_node 0 sinfo -h -N -o %T 2>/dev/null | grep -c '^idle$' || true)
  [ "$idle" -eq "$NODES" ] && break
  sleep 0.2
done
[ "$idle" -eq "$NODES" ] || fail "$idle of $NODES nodes idle after ${TIMEOUT}s: $(on_node 0 sinfo -h -N -o '%N %T' 2>&1 | tr '\n' ' ')"
echo "Slurm test cluster up: ${names[*]} ($hw${gres_node:+ $gres_node}), partition test, config $S/slurm.conf"
