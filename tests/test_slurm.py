"""The workflow on a real (one-node) Slurm cluster, through snakemake-executor-plugin-slurm.

A module fixture starts munged + slurmctld + slurmd under a scratch dir
(tests/slurm/start_cluster.sh) and stops them afterwards by PID. The test runs a reduced smoke
study (1 dataset x 1 length, CPU training jobs as 2 gloo ranks started by srun inside the
batch step: resources.cpu_tasks = 2 -> mpi="srun") with the workflow profile
(profiles/default, picked up automatically) plus the test's cluster profile
(tests/slurm/profile), and checks that every job went through Slurm and that training ran as
2 ranks; a second test scancels a 2-rank training job (SIGTERM to every process of it) and
checks that it saved, and that a resubmitted job resumes to the uninterrupted run's weights.
Needs root and Debian's Slurm + munge + the plugin: tests/slurm/install.sh. Without
them the test is skipped, unless MIMSCALE_REQUIRE_SLURM=1 (CI), where it fails instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from launching import mimlib_cmd, pretrain_args, rank_free_env

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "tests" / "slurm"
SKIP_MSG = "Slurm is not installed: run tests/slurm/install.sh (CI does)"
TOOLS = ("munged", "slurmctld", "slurmd", "sinfo", "squeue", "sbatch", "srun", "scontrol", "scancel")
PLUGIN = "snakemake_executor_plugin_slurm"

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _missing() -> list[str]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    for mod in (PLUGIN, "snakemake_executor_plugin_slurm_jobstep"):
        if importlib.util.find_spec(mod) is None:
            missing.append(f"python module {mod} (in {sys.executable})")
    return missing


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({exc})"
    return "\n".join(lines[-n:])


def _daemon_logs(scratch: Path) -> str:
    return "\n".join(f"---- {p}\n{_tail(p)}" for p in sorted((scratch / "log").glob("*.log")))


def _node(scratch: Path) -> dict[str, int]:
    out = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True, timeout=30).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return {"cpus": int(fields["CPUTot"]), "real_memory": int(fields["RealMemory"])}


@pytest.fixture(scope="module")
def slurm_cluster():
    problems = _missing()
    if not problems and os.geteuid() != 0:
        problems = ["root (the test cluster runs SlurmUser=root and links /etc/slurm/slurm.conf)"]
    if problems:
        msg = f"{SKIP_MSG}; missing: {', '.join(problems)}"
        if os.environ.get("MIMSCALE_REQUIRE_SLURM") == "1":
            pytest.fail(f"MIMSCALE_REQUIRE_SLURM=1 but {msg}", pytrace=False)
        pytest.skip(msg)
    # A short path: the munge socket lives here (unix socket paths max out at 107 bytes).
    scratch = Path(tempfile.mkdtemp(prefix="mimscale-slurm-", dir="/tmp"))
    ok = False
    try:
        start = subprocess.run([str(SLURM_DIR / "start_cluster.sh"), str(scratch)],
                               capture_output=True, text=True, timeout=180)
        if start.returncode:
            pytest.fail(f"start_cluster.sh failed:\n{start.stdout}\n{start.stderr}", pytrace=False)
        yield {"scratch": scratch, **_node(scratch)}
        ok = True
    finally:
        stop = subprocess.run([str(SLURM_DIR / "stop_cluster.sh"), str(scratch)],
                              capture_output=True, text=True, timeout=120)
        if stop.returncode:
            print(f"stop_cluster.sh failed:\n{stop.stdout}\n{stop.stderr}", file=sys.stderr)
        if ok and stop.returncode == 0:
            shutil.rmtree(scratch, ignore_errors=True)


def _study(tmp_path: Path) -> Path:
    """config/smoke.yaml cut to 1 dataset x 1 length; CPU training jobs as 2 gloo ranks."""
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    first = next(iter(cfg["datasets"]))
    cfg["datasets"] = {first: cfg["datasets"][first]}
    cfg["lengths"] = [min(cfg["lengths"])]
    cfg.pop("finetune", None)  # this test is about scheduling: pre-training jobs only
    # 2 ranks x 1 core fit a 2-core node; --mem = 2 x 500 MB
    cfg.setdefault("resources", {}).update(cpu_tasks=2, cpus_per_task=1, mem_mb_per_task=500)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit_light_rules(node: dict[str, int]) -> list[str]:
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


def test_smoke_study_on_slurm(slurm_cluster, tmp_path: Path, record_property) -> None:
    scratch = slurm_cluster["scratch"]
    if slurm_cluster["cpus"] < 2:
        pytest.fail("the Slurm test needs a machine with >= 2 CPUs (2 ranks x 1 CPU)", pytrace=False)
    work = tmp_path / "work"
    work.mkdir()
    study = _study(tmp_path)
    target = "results/pretrain/summary.csv"
    # The target goes before --configfile (which takes several values).
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work), target,
           "--profile", str(SLURM_DIR / "profile"), "--configfile", str(study),
           *_fit_light_rules(slurm_cluster)]
    # sbatch --export=ALL passes this environment into the jobs: no Slurm or torchrun variables
    # from an outer job (MASTER_PORT would be shared by every job; RANK would override srun's).
    env = rank_free_env()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)  # Snakemake cancels its Slurm jobs on Ctrl-C
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        out = f"(timed out after 600 s)\n{out}"
    wall = time.monotonic() - t0
    record_property("slurm_workflow_wall_s", round(wall, 1))
    print(f"Slurm smoke workflow: {wall:.1f} s wall")

    queue = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%k|%S|%e"],
                           capture_output=True, text=True, timeout=30).stdout
    print(queue)  # job id | state | comment (rule + wildcards) | start | end

    def context() -> str:
        slurm_logs = "\n".join(f"---- {p}\n{_tail(p, 25)}" for p in sorted(work.glob(".snakemake/slurm_logs/**/*.log")))
        return (f"{' '.join(cmd)}\n---- snakemake (last 6000 chars)\n{out[-6000:]}\n---- squeue -t all\n{queue}\n"
                f"{slurm_logs[-8000:]}\n{_daemon_logs(scratch)}")

    assert proc.returncode == 0, context()

    # Every job was submitted to Slurm (one sbatch each) and completed there.
    jobids = [int(j) for j in re.findall(r"has been submitted with SLURM jobid (\d+)", out)]
    rules = {"demo_data": 1, "index": 2, "manifest": 1, "pretrain_trunk": 1, "pretrain_branch": 1, "pretrain_summary": 1}
    assert len(jobids) == sum(rules.values()) == len(set(jobids)), context()
    states = {int(i): (state, comment) for i, state, comment, *_ in
              (line.split("|") for line in queue.splitlines() if line.strip())}
    for j in jobids:
        assert states.get(j, ("missing",))[0] == "COMPLETED", f"Slurm job {j}: {states.get(j)}\n{context()}"
    comments = [states[j][1] for j in jobids]
    for rule, n in rules.items():
        assert sum(c == f"rule_{rule}" or c.startswith(f"rule_{rule}_wildcards") for c in comments) == n, comments
    logs = {int(p.stem) for p in work.glob(".snakemake/slurm_logs/rule_*/**/*.log")}
    assert set(jobids) <= logs, f"Slurm job logs {sorted(logs)} vs jobs {jobids}"

    # The outputs.
    summary = pd.read_csv(work / target)
    assert len(summary) == 1 and (summary["val_loss"] > 0).all(), summary

    # Training ran as 2 gloo ranks started by launch.sh's srun inside the Slurm job, not torchrun:
    # a job with an `mpi` resource runs its shell in the batch step without the plugin's own
    # `srun -n1`, so its step <id>.0 on slurmd is launch.sh's srun.
    cell = next(work.glob("results/pretrain/*/*/*/metrics.json"))
    assert json.loads(cell.read_text())["world_size"] == 2, cell.read_text()
    slurmd_log = (scratch / "log" / "slurmd.log").read_text()
    training = [j for j in jobids if states[j][1].startswith(("rule_pretrain_trunk", "rule_pretrain_branch"))]
    assert len(training) == 2
    for j in training:
        assert re.search(rf"launch task StepId={j}\.0 ", slurmd_log), f"no srun step in job {j}\n{_daemon_logs(scratch)}"
        info = subprocess.run(["scontrol", "show", "job", str(j)], capture_output=True, text=True, timeout=30).stdout
        assert re.search(r"\bNumTasks=2\b", info), info


def _wait_state(jobid: str, states: tuple[str, ...], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    state = "?"
    while time.monotonic() < deadline:
        state = subprocess.run(["squeue", "-h", "-t", "all", "-j", jobid, "-o", "%T"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        if state in states:
            return state
        time.sleep(0.2)
    return state


def test_scancel_saves_state_and_a_resubmitted_job_resumes(slurm_cluster, tmp_path: Path, tiny_data: dict,
                                                           tiny_recipe: dict) -> None:
    """scancel (what a time limit or preemption does too): Slurm sends SIGTERM to every process of
    the 2-rank job (srun ranks and their loader workers); the ranks agree to stop, rank 0 saves,
    both exit 143. The same command, submitted again, resumes from that state and ends with the
    same weights as an uninterrupted 2-rank run (started by launch.sh outside Slurm: torchrun)."""
    from mimlib.train import checkpoint as ckpt
    from mimlib.train.pretrain import PretrainJob

    if slurm_cluster["cpus"] < 2:
        pytest.fail("the Slurm test needs a machine with >= 2 CPUs (2 ranks x 1 CPU)", pytrace=False)
    end = 48
    recipe = {**tiny_recipe, "drop_path": 0.0, "checkpoint_every": 1000, "log_every": 1, "val_every": 1000}

    def job(name: str, r: dict) -> PretrainJob:
        return PretrainJob(model="swinv2_pico", recipe=r, manifest=tiny_data["manifest"], end_iter=end,
                           out=tmp_path / f"{name}.pt", log_out=tmp_path / f"{name}.jsonl",
                           resume_dir=tmp_path / "resume" / name, device="cpu")

    def command(j: PretrainJob) -> list[str]:
        return mimlib_cmd(pretrain_args(j), ranks=2)

    env = rank_free_env()
    two_ranks = {**recipe, "micro_batch": 2, "num_workers": 1}  # 2 ranks x micro 2 x 2 accumulation
    reference = job("reference", two_ranks)
    subprocess.run(command(reference), cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    ranks = job("ranks", two_ranks)
    wrap = " ".join(map(shlex.quote, command(ranks)))

    def submit(name: str) -> str:
        return subprocess.run(
            ["sbatch", "--parsable", "-p", "test", "-N", "1", "-n", "2", "-c", "1", "--mem", "1000", "-t", "10",
             "-J", name, "-o", str(tmp_path / f"{name}.out"), "--chdir", str(ROOT), "--wrap", wrap],
            capture_output=True, text=True, timeout=60, env=env, check=True).stdout.strip().split(";")[0]

    first = submit("preempted")
    work_log = ranks.resume_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (work_log.exists() and len(work_log.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    assert work_log.exists(), f"the job never trained\n{_tail(tmp_path / 'preempted.out')}\n{_daemon_logs(slurm_cluster['scratch'])}"
    subprocess.run(["scancel", first], check=True, timeout=30)
    state = _wait_state(first, ("CANCELLED", "COMPLETED", "FAILED"), 120)
    out = (tmp_path / "preempted.out").read_text(errors="replace")
    assert state == "CANCELLED", f"{state}\n{out[-3000:]}"
    assert out.count("preempted: stopped by SIGTERM after iteration") == 2, out[-3000:]  # both ranks, same text
    assert "DataLoader worker" not in out, out[-3000:]
    saved = ckpt.rolling_checkpoints(ranks.resume_dir)
    assert len(saved) == 1 and 0 < saved[0][0] < end, (saved, out[-3000:])
    stopped_at = saved[0][0]
    assert f"after iteration {stopped_at};" in out

    second = submit("resumed")
    state = _wait_state(second, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300)
    out = (tmp_path / "resumed.out").read_text(errors="replace")
    assert state == "COMPLETED", f"{state}\n{out[-3000:]}"
    assert re.search(rf"iterations {stopped_at} -> {end} from .*iter_0*{stopped_at}\.pt", out), out[-3000:]
    a, b = ckpt.load(reference.out)["model"], ckpt.load(ranks.out)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
