#!/usr/bin/env bash
# Install what tests/test_slurm*.py need: Debian's Slurm 22.05 daemons + client and munge, and
# iproute2 + util-linux for the multi-node cluster's namespaces (system packages, needs root
# and apt), and the Snakemake Slurm executor plugin into the
# Python environment that runs the tests ($PYTHON, else the active virtualenv, else the repo's
# .venv, else python3).
#   tests/slurm/install.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PYTHON=$VIRTUAL_ENV/bin/python
  elif [ -x "$root/.venv/bin/python" ]; then PYTHON=$root/.venv/bin/python
  else PYTHON=$(command -v python3 || true); fi
fi
die() { echo "tests/slurm/install.sh: $*" >&2; exit 1; }
[ -n "$PYTHON" ] && [ -x "$PYTHON" ] || die "no Python found (set PYTHON=/path/to/python)"

pkgs=(slurmctld slurmd slurm-client munge iproute2 util-linux)
have_all() { for exe in slurmctld slurmd sinfo munged ip nsenter unshare; do command -v "$exe" >/dev/null || return 1; done; }
if ! have_all; then
  command -v apt-get >/dev/null || die "apt-get not found: install ${pkgs[*]} (Slurm 22.05-like) with your package manager"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "installing ${pkgs[*]} needs root (or sudo)"
    sudo="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq || die "apt-get update failed"
  $sudo apt-get install -y --no-install-recommends "${pkgs[@]}" || die "apt-get install ${pkgs[*]} failed"
fi
for exe in slurmctld slurmd sinfo squeue sbatch srun scontrol munged ip nsenter unshare; do
  command -v "$exe" >/dev/null || die "$exe still missing after installing ${pkgs[*]}"
done

"$PYTHON" -m pip install --quiet "snakemake-executor-plugin-slurm==2.8.0" \
  || die "pip install snakemake-executor-plugin-slurm==2.8.0 into $PYTHON failed"
"$PYTHON" -c "import snakemake_executor_plugin_slurm, snakemake_executor_plugin_slurm_jobstep" \
  || die "the Slurm executor plugin does not import in $PYTHON"
# (sinfo --version needs a slurm.conf: ask dpkg instead)
ver=$(dpkg-query -W -f='${Version}' slurmctld 2>/dev/null || echo "?")
echo "Slurm $ver, munge, snakemake-executor-plugin-slurm 2.8.0 installed for $PYTHON"
