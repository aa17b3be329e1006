#!/usr/bin/env bash
# Run a command on a node of a multi-node test cluster (start_cluster.sh --nodes K):
#   tests/slurm/on_node.sh SCRATCH_DIR NODE CMD [ARGS...]
# inside the node's network namespace, with the node's hostname (a UTS namespace) and its
# /etc/hosts and /etc/slurm (bind mounts in a private mount namespace). The machine's /sys and
# cgroups stay visible, which slurmd needs (ip netns exec would remount /sys). node1 is the
# login node: clients (sbatch, squeue, snakemake) run there.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 SCRATCH_DIR NODE CMD [ARGS...]" >&2; exit 1; }
S=$1 node=$2
shift 2
ns=$(awk -v n="$node" '$1 == n {print $2}' "$S/nodes" 2>/dev/null || true)
[ -n "$ns" ] || { echo "on_node.sh: no node $node in $S/nodes" >&2; exit 1; }
exec nsenter --net="/run/netns/$ns" unshare --mount --uts --propagation private sh -c '
  mount --bind "/etc/netns/$1/hosts" /etc/hosts &&
  mount --bind "/etc/netns/$1/slurm" /etc/slurm &&
  hostname "$2" && shift 2 && exec "$@"' on_node "$ns" "$node" "$@"
