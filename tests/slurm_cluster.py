"""Throw-away Slurm clusters for the tests (tests/slurm/start_cluster.sh), and running the
workflow on them through the real executor plugin with the project's profiles.

A cluster is started and stopped by the test that uses it (by the PIDs and namespaces it
created), so a failed test leaves nothing behind. Without root, Debian's Slurm + munge or the
plugin, the tests are skipped; with MIMSCALE_REQUIRE_SLURM=1 (CI) they fail instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from launching import rank_free_env

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "tests" / "slurm"
TOOLS = ("munged", "slurmctld", "slurmd", "sinfo", "squeue", "sbatch", "srun", "scontrol", "scancel")
PLUGINS = ("snakemake_executor_plugin_slurm", "snakemake_executor_plugin_slurm_jobstep")


def require_slurm(nodes: int = 1) -> None:
    """Skip (or, with MIMSCALE_REQUIRE_SLURM=1, fail) unless a test cluster can start here."""
    tools = TOOLS + (("ip", "nsenter", "unshare") if nodes > 1 else ())
    missing = [t for t in tools if shutil.which(t) is None]
    missing += [f"python module {m} (in {sys.executable})" for m in PLUGINS if importlib.util.find_spec(m) is None]
    if not missing and os.geteuid() != 0:
        missing = ["root (the test cluster runs SlurmUser=root; nodes are network namespaces)"]
    if missing:
        msg = f"Slurm is not installed: run tests/slurm/install.sh (CI does); missing: {', '.join(missing)}"
        if os.environ.get("MIMSCALE_REQUIRE_SLURM") == "1":
            pytest.fail(f"MIMSCALE_REQUIRE_SLURM=1 but {msg}", pytrace=False)
        pytest.skip(msg)


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({exc})"
    return "\n".join(lines[-n:])


class Cluster:
    def __init__(self, scratch: Path, nodes: int, gpus: int) -> None:
        self.scratch, self.nodes, self.gpus = scratch, nodes, gpus
        self.names = [line.split()[0] for line in (scratch / "nodes").read_text().splitlines()] if nodes > 1 else []

    def login(self, cmd: list[str]) -> list[str]:
        """``cmd`` as run on the login node (node1's namespaces; the machine itself for one node)."""
        return [str(SLURM_DIR / "on_node.sh"), str(self.scratch), "node1", *cmd] if self.nodes > 1 else list(cmd)

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.login(cmd), capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)

    def node_info(self) -> dict[str, int]:
        out = self.run(["scontrol", "show", "node", "-o"]).stdout.splitlines()[0]
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        return {"cpus": int(fields["CPUTot"]), "real_memory": int(fields["RealMemory"])}

    def daemon_logs(self) -> str:
        return "\n".join(f"---- {p}\n{tail(p)}" for p in sorted((self.scratch / "log").glob("*.log")))

    def job_state(self, jobid: str) -> str:
        return self.run(["squeue", "-h", "-t", "all", "-j", jobid, "-o", "%T"]).stdout.strip()

    def wait_state(self, jobid: str, states: tuple[str, ...], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.job_state(jobid)
            if state in states:
                return state
            time.sleep(0.3)
        return state

    # --- a node lost and back (multi-node clusters) --------------------------------------
    def _netns(self, node: str) -> str:
        return dict(line.split()[:2] for line in (self.scratch / "nodes").read_text().splitlines())[node]

    def kill_node(self, node: str) -> list[int]:
        """SIGKILL everything on ``node``: its slurmd, job steps and ranks (a power cut)."""
        pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", self._netns(node)], capture_output=True,
                                               text=True, check=True).stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def start_slurmd(self, node: str) -> None:
        """Bring ``node`` back: a fresh slurmd (stop_cluster.sh stops it by its PID)."""
        log = open(self.scratch / "log" / f"slurmd.{node}.out", "a")
        proc = subprocess.Popen([str(SLURM_DIR / "on_node.sh"), str(self.scratch), node, "slurmd", "-D", "-N", node,
                                 "-f", str(self.scratch / "slurm.conf")], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        with open(self.scratch / "pids", "a") as f:
            f.write(f"slurmd:{node} {proc.pid}\n")


@contextlib.contextmanager
def slurm_cluster(nodes: int = 1, gpus: int = 0) -> Iterator[Cluster]:
    require_slurm(nodes)
    # A short path: the munge socket lives here (unix socket paths max out at 107 bytes).
    scratch = Path(tempfile.mkdtemp(prefix="mimscale-slurm-", dir="/tmp"))
    ok = False
    try:
        # A lost node is noticed after SlurmdTimeout: seconds here, not Slurm's 5 minutes.
        env = {**os.environ, "SLURM_TEST_SLURMD_TIMEOUT": os.environ.get("SLURM_TEST_SLURMD_TIMEOUT", "10")}
        start = subprocess.run([str(SLURM_DIR / "start_cluster.sh"), str(scratch), "--nodes", str(nodes),
                                "--gpus", str(gpus)], capture_output=True, text=True, timeout=180, env=env)
        if start.returncode:
            pytest.fail(f"start_cluster.sh failed:\n{start.stdout}\n{start.stderr}", pytrace=False)
        yield Cluster(scratch, nodes, gpus)
        ok = True
    finally:
        stop = subprocess.run([str(SLURM_DIR / "stop_cluster.sh"), str(scratch)], capture_output=True, text=True,
                              timeout=120)
        if stop.returncode:
            print(f"stop_cluster.sh failed:\n{stop.stdout}\n{stop.stderr}", file=sys.stderr)
        if ok and stop.returncode == 0:
            shutil.rmtree(scratch, ignore_errors=True)


def fit_light_rules(node: dict[str, int]) -> list[str]:
    """--set-resources for the workflow profile's light rules, capped to this node if needed.

    Slurm rejects a job asking for more memory or CPUs than the node has. Only when the
    workflow profile asks for more than this node has (a small CI runner) are its
    set-resources repeated on the command line with memory / CPUs capped (a command-line
    --set-resources replaces the profile's whole key, hence all entries are repeated).
    """
    prof = yaml.safe_load((ROOT / "profiles" / "default" / "config.yaml").read_text()) or {}
    sets = prof.get("set-resources") or {}
    caps = {"mem_mb": node["real_memory"], "cpus_per_task": node["cpus"]}
    if not any(isinstance(v, (int, float)) and k in caps and v > caps[k]
               for res in sets.values() for k, v in res.items()):
        return []
    args = [f"{rule}:{k}={min(v, caps[k]) if k in caps and isinstance(v, (int, float)) else v}"
            for rule, res in sets.items() for k, v in res.items()]
    return ["--set-resources", *args]


def prepare_data(work: Path, study: Path, dataset: str, source: str, results: str = "results") -> tuple[str, str]:
    """Run a study's data jobs (demo images, indexes, the manifest) locally, not on Slurm: the
    cluster tests are about training. Returns the manifest and validation index paths (in work)."""
    from mimlib import paths as P

    manifest = f"{results}/{P.MANIFEST.format(dataset=dataset)}"
    val_index = f"{results}/{P.INDEX.format(source=source, split='val')}"
    subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work), manifest,
                    val_index, "--cores", "1", "--configfile", str(study)], cwd=ROOT, env=rank_free_env(),
                   check=True, capture_output=True, timeout=300)
    return manifest, val_index


def snakemake_cmd(work: Path, target: str, study: Path, *extra: str) -> list[str]:
    """The user's command on the cluster: the slurm executor, the test's cluster profile
    (tests/slurm/profile) and the workflow profile (profiles/default, picked up by itself)."""
    # The target goes before --configfile (which takes several values).
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work), target,
            "--profile", str(SLURM_DIR / "profile"), *extra, "--configfile", str(study)]


def job_env(**extra: str) -> dict[str, str]:
    """sbatch --export=ALL passes this environment into the jobs: no Slurm or torchrun variables
    from an outer job (MASTER_PORT would be shared by every job; RANK would override srun's)."""
    return {**rank_free_env(), **extra}


def start_snakemake(cluster: Cluster, cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Snakemake on the login node, its output to ``log`` (a file: a pipe nobody reads blocks it)."""
    with open(log, "w") as sink:
        return subprocess.Popen(cluster.login(cmd), cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for Snakemake; past ``timeout`` stop it (Ctrl-C cancels its Slurm jobs). True if it ended itself."""
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return False
