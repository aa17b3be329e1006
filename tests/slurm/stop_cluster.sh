#!/usr/bin/env bash
# Stop the cluster started by start_cluster.sh SCRATCH_DIR: cancel its jobs, stop the daemons
# by the PIDs in SCRATCH_DIR/pids, end whatever still runs in its node namespaces, remove the
# namespaces (and their veths, which live only there) and /etc/netns/<ns>/, and put
# /etc/slurm/slurm.conf back as it was.
#   tests/slurm/stop_cluster.sh SCRATCH_DIR
set -uo pipefail
[ $# -eq 1 ] || { echo "usage: $0 SCRATCH_DIR" >&2; exit 1; }
S=$(cd "$1" 2>/dev/null && pwd) || { echo "stop_cluster.sh: no such dir $1" >&2; exit 1; }
CONF=/etc/slurm/slurm.conf
login=$(awk 'NR == 1 {print $1}' "$S/nodes" 2>/dev/null || true)
in_login() { if [ -z "$login" ]; then "$@"; else "$(dirname "$0")/on_node.sh" "$S" "$login" "$@"; fi; }

if [ -s "$S/pids" ]; then
  # Jobs first, while slurmctld still runs (their processes belong to slurmd's steps).
  SLURM_CONF=$S/slurm.conf in_login scancel --quiet --full --user="$(id -un)" >/dev/null 2>&1 || true
  # Reverse start order: slurmd, slurmctld, munged.
  tac "$S/pids" | while read -r name pid; do
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "stop_cluster.sh: $name (pid $pid) ignored SIGTERM, sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
  done
  mv "$S/pids" "$S/pids.stopped"
fi

# The node namespaces: anything still inside (job steps, ranks) is ended, then the namespace
# goes, and with it its interfaces and addresses.
if [ -s "$S/netns" ]; then
  while read -r ns; do
    [ -n "$ns" ] || continue
    if ip netns list | grep -qw "$ns"; then
      pids=$(ip netns pids "$ns" 2>/dev/null || true)
      [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
      ip netns del "$ns" || echo "stop_cluster.sh: ip netns del $ns failed" >&2
    fi
    case $ns in mimscale-*) rm -rf "/etc/netns/$ns" ;; esac
  done <"$S/netns"
  mv "$S/netns" "$S/netns.stopped"
fi

# Put /etc/slurm/slurm.conf back: remove our link, restore what was there before.
if [ -f "$S/conf_link" ]; then
  if [ -L "$CONF" ] && [ "$(readlink "$CONF")" = "$S/slurm.conf" ]; then
    rm -f "$CONF"
  fi
  rm -f "$S/conf_link"
fi
if [ -f "$S/slurm.conf.orig.path" ]; then
  if [ -e "$CONF" ] || [ -L "$CONF" ]; then
    echo "stop_cluster.sh: $CONF exists again; the original stays at $S/slurm.conf.orig" >&2
  else
    mv "$S/slurm.conf.orig" "$CONF" && rm -f "$S/slurm.conf.orig.path"
  fi
fi
exit 0
