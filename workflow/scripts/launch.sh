#!/usr/bin/env bash
# Start a mimlib command as NTASKS processes (one per GPU, or gloo ranks on CPU):
#   launch.sh NODES NTASKS PYTHON <mimlib args...>
# - 1 process: run it directly (a laptop, or a single-GPU Slurm job);
# - inside a Slurm job: srun starts the ranks on the allocated nodes; each reads
#   SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, MASTER_ADDR is the job's first host;
# - otherwise: torchrun on this machine.
set -euo pipefail
nodes=$1 ntasks=$2 python=$3
shift 3
if [ "$ntasks" -le 1 ]; then
  exec "$python" -m mimlib "$@"
fi
if [ -n "${SLURM_JOB_ID:-}" ]; then
  # The jobstep plugin strips most SLURM_* variables: ask the controller for the node list.
  first=$(scontrol show hostnames "$(squeue -h -j "$SLURM_JOB_ID" -o %N)" | head -n 1)
  export MASTER_ADDR=${first:-$(hostname -s)}
  # sbatch exports the submitting shell's environment: never let a stale rank or port leak in
  # (ranks come from SLURM_PROCID; the port from the job id, below the ephemeral range).
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
  export MASTER_PORT=${MIMSCALE_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 12000))}
  echo "launch.sh: $ntasks ranks on $nodes nodes, rendezvous at $MASTER_ADDR:$MASTER_PORT (Slurm job $SLURM_JOB_ID)" >&2
  # The same ranks on every node (the job asked for one task per GPU, the same GPUs per node);
  # each rank takes its own GPU from SLURM_LOCALID (mimlib/train/distributed.py).
  # srun forwards SIGTERM (time limit, scancel) to every rank; each saves and exits 143.
  exec srun --nodes="$nodes" --ntasks="$ntasks" --ntasks-per-node=$(((ntasks + nodes - 1) / nodes)) \
    --kill-on-bad-exit=1 "$python" -m mimlib "$@"
fi
if [ "$nodes" -gt 1 ]; then
  echo "launch.sh: $nodes nodes requested outside Slurm; run this job through the slurm profile" >&2
  exit 2
fi
exec "$python" -m torch.distributed.run --standalone --nproc_per_node="$ntasks" -m mimlib "$@"
