"""The workflow on a real (one-node) Slurm cluster, through snakemake-executor-plugin-slurm.

A module fixture starts munged + slurmctld + slurmd under a scratch dir
(tests/slurm/start_cluster.sh; the node advertises 2 fake GPUs) and stops them afterwards by
PID. The first test runs a reduced smoke
study (1 dataset x 1 length, CPU training jobs as 2 gloo ranks started by srun inside the
batch step: resources.cpu_tasks = 2 -> mpi="srun") with the workflow profile
(profiles/default, picked up automatically) plus the test's cluster profile
(tests/slurm/profile), and checks that every job went through Slurm and that training ran as
2 ranks; a second test scancels a 2-rank training job (SIGTERM to every process of it) and
checks that it saved, and that a resubmitted job resumes to the uninterrupted run's weights;
a third submits a GPU-shaped training job (2 GPUs, one task each) and checks that each rank
got a GPU of its own. Multi-node clusters: tests/test_slurm_multinode.py. Needs root and Debian's Slurm + munge + the plugin: tests/slurm/install.sh. Without
them the test is skipped, unless MIMSCALE_REQUIRE_SLURM=1 (CI), where it fails instead.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from launching import mimlib_cmd, pretrain_args, rank_free_env
from slurm_cluster import (Cluster, finish, fit_light_rules, job_env, prepare_data, slurm_cluster, snakemake_cmd,
                           start_snakemake, tail)

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    """One node (this machine) with 2 fake GPUs: CPU jobs and GPU-shaped jobs alike."""
    with slurm_cluster(nodes=1, gpus=2) as c:
        yield c


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


def test_smoke_study_on_slurm(cluster: Cluster, tmp_path: Path, record_property) -> None:
    scratch = cluster.scratch
    node = cluster.node_info()
    if node["cpus"] < 2:
        pytest.fail("the Slurm test needs a machine with >= 2 CPUs (2 ranks x 1 CPU)", pytrace=False)
    work = tmp_path / "work"
    work.mkdir()
    study = _study(tmp_path)
    target = "results/pretrain/summary.csv"
    cmd = snakemake_cmd(work, target, study, *fit_light_rules(node))
    t0 = time.monotonic()
    proc = start_snakemake(cluster, cmd, tmp_path / "snakemake.log", job_env())
    ended = finish(proc, timeout=600)
    out = (tmp_path / "snakemake.log").read_text(errors="replace")
    if not ended:
        out = f"(timed out after 600 s)\n{out}"
    wall = time.monotonic() - t0
    record_property("slurm_workflow_wall_s", round(wall, 1))
    print(f"Slurm smoke workflow: {wall:.1f} s wall")

    queue = cluster.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%k|%S|%e"]).stdout
    print(queue)  # job id | state | comment (rule + wildcards) | start | end

    def context() -> str:
        slurm_logs = "\n".join(f"---- {p}\n{tail(p, 25)}" for p in sorted(work.glob(".snakemake/slurm_logs/**/*.log")))
        return (f"{' '.join(cmd)}\n---- snakemake (last 6000 chars)\n{out[-6000:]}\n---- squeue -t all\n{queue}\n"
                f"{slurm_logs[-8000:]}\n{cluster.daemon_logs()}")

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
    slurmd_log = next((scratch / "log").glob("slurmd.*.log")).read_text()
    training = [j for j in jobids if states[j][1].startswith(("rule_pretrain_trunk", "rule_pretrain_branch"))]
    assert len(training) == 2
    for j in training:
        assert re.search(rf"launch task StepId={j}\.0 ", slurmd_log), f"no srun step in job {j}\n{cluster.daemon_logs()}"
        info = cluster.run(["scontrol", "show", "job", str(j)]).stdout
        assert re.search(r"\bNumTasks=2\b", info), info


def test_scancel_saves_state_and_a_resubmitted_job_resumes(cluster: Cluster, tmp_path: Path, tiny_data: dict,
                                                           tiny_recipe: dict) -> None:
    """scancel (what a time limit or preemption does too): Slurm sends SIGTERM to every process of
    the 2-rank job (srun ranks and their loader workers); the ranks agree to stop, rank 0 saves,
    both exit 143. The same command, submitted again, resumes from that state and ends with the
    same weights as an uninterrupted 2-rank run (started by launch.sh outside Slurm: torchrun)."""
    from mimlib.train import checkpoint as ckpt
    from mimlib.train.pretrain import PretrainJob

    if cluster.node_info()["cpus"] < 2:
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
    assert work_log.exists(), f"the job never trained\n{tail(tmp_path / 'preempted.out')}\n{cluster.daemon_logs()}"
    subprocess.run(["scancel", first], check=True, timeout=30)
    state = cluster.wait_state(first, ("CANCELLED", "COMPLETED", "FAILED"), 120)
    out = (tmp_path / "preempted.out").read_text(errors="replace")
    assert state == "CANCELLED", f"{state}\n{out[-3000:]}"
    assert out.count("preempted: stopped by SIGTERM after iteration") == 2, out[-3000:]  # both ranks, same text
    assert "DataLoader worker" not in out, out[-3000:]
    saved = ckpt.rolling_checkpoints(ranks.resume_dir)
    assert len(saved) == 1 and 0 < saved[0][0] < end, (saved, out[-3000:])
    stopped_at = saved[0][0]
    assert f"after iteration {stopped_at};" in out

    second = submit("resumed")
    state = cluster.wait_state(second, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300)
    out = (tmp_path / "resumed.out").read_text(errors="replace")
    assert state == "COMPLETED", f"{state}\n{out[-3000:]}"
    assert re.search(rf"iterations {stopped_at} -> {end} from .*iter_0*{stopped_at}\.pt", out), out[-3000:]
    a, b = ckpt.load(reference.out)["model"], ckpt.load(ranks.out)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rank_devices(log: str) -> list[tuple[int, str, int, str]]:
    """(rank, host, local rank, GPU id) of every rank's device line in a job log."""
    return [(int(r), host, int(local), gpu) for r, host, local, gpu in
            re.findall(r"rank (\d+)/\d+ on (\S+) \(local rank (\d+)\): GPU (\S+) of CUDA_VISIBLE_DEVICES", log)]


def test_gpu_job_gets_one_gpu_per_rank(cluster: Cluster, tmp_path: Path) -> None:
    """A GPU-shaped job of the workflow (2 GPUs on one node, one task each) through the slurm
    executor: Slurm accepts it, launch.sh starts 2 ranks, each sees a GPU of its own. The node's
    "GPUs" are not CUDA devices: without the explicit override the job stops and says so; with
    MIMSCALE_GPU_FALLBACK=cpu the ranks train on the CPU with gloo and finish."""
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    dataset = next(iter(cfg["datasets"]))
    cfg["datasets"] = {dataset: cfg["datasets"][dataset]}
    cfg["lengths"] = [16]
    cfg.pop("finetune", None)
    cfg["pretrain"]["micro_batch"] = 2  # 2 ranks x 2 x 2 accumulation = global batch 8
    cfg["resources"] = {"pretrain_gpus": {"swinv2_pico": 2}, "gpus_per_node": 2, "cpus_per_task": 1,
                        "mem_mb_per_task": 500}
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    prepare_data(work, study, dataset, cfg["validation"]["source"])
    target = f"results/pretrain/swinv2_pico/{dataset}/trunk/14.pt"
    job_log = work / f"results/logs/pretrain/swinv2_pico/{dataset}/trunk_14.log"
    cmd = snakemake_cmd(work, target, study)

    # The default: a job given GPUs on a node where PyTorch sees no CUDA device stops, saying so.
    env = job_env()
    env.pop("MIMSCALE_GPU_FALLBACK", None)
    proc = start_snakemake(cluster, cmd, tmp_path / "no_cuda.log", env)
    ended = finish(proc, timeout=300)
    out = (tmp_path / "no_cuda.log").read_text(errors="replace")
    assert ended and proc.returncode != 0, out[-4000:]
    assert "Error in rule pretrain_trunk" in out, out[-4000:]
    log = job_log.read_text(errors="replace")
    assert "this job was given GPUs" in log and "MIMSCALE_GPU_FALLBACK=cpu" in log, log[-3000:]
    assert "Traceback" not in log and not (work / target).exists()

    t0 = time.monotonic()
    proc = start_snakemake(cluster, cmd, tmp_path / "fallback.log", job_env(MIMSCALE_GPU_FALLBACK="cpu"))
    ended = finish(proc, timeout=400)
    out = (tmp_path / "fallback.log").read_text(errors="replace")
    print(f"GPU-shaped job through the slurm executor: {time.monotonic() - t0:.1f} s wall")
    assert ended and proc.returncode == 0, f"{out[-5000:]}\n{tail(job_log)}\n{cluster.daemon_logs()}"
    jobid = re.findall(r"has been submitted with SLURM jobid (\d+)", out)
    assert len(jobid) == 1, out[-3000:]
    info = cluster.run(["scontrol", "show", "job", jobid[0]]).stdout
    assert "JobState=COMPLETED" in info and re.search(r"\bNumTasks=2\b", info), info
    assert "TresPerNode=gres:gpu:2" in info and re.search(r"\bNtasksPerTRES=1\b", info), info
    log = job_log.read_text(errors="replace")
    devices = rank_devices(log)
    print("\n".join(line for line in log.splitlines() if "CUDA_VISIBLE_DEVICES=" in line))
    assert sorted(r for r, *_ in devices) == [0, 1], log[-3000:]
    assert sorted(local for _, _, local, _ in devices) == [0, 1]
    assert len({gpu for *_, gpu in devices}) == 2, devices  # a GPU of its own each
    assert ": iterations 0 -> 14 from " in log, log[-2000:]
    assert (work / target).exists()
