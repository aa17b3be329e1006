"""Training across nodes on a real 2-node Slurm cluster on this machine.

Each node (node1, node2) is a network + UTS namespace of its own with its own slurmd, address
and hostname, and one fake GPU (tests/slurm/start_cluster.sh --nodes 2 --gpus 1); node1 also
runs slurmctld and is the login node where Snakemake runs. A pre-training trunk segment asks
for 2 GPUs on nodes of 1 GPU: Slurm gives it both nodes, launch.sh's srun starts one rank on
each, and they rendezvous on node1 over the namespaces' network. Through the slurm executor
with the project's profiles:
- the 2-node job ends with the weights of a 1-process run of the same global batch;
- scancel mid-run, then the same Snakemake command: it resumes to the same weights;
- a node lost mid-run (everything on node2 SIGKILLed): the job fails, Snakemake's retry
  resubmits it (the profiles submit with --no-requeue, so Slurm never restarts the first copy
  beside it), it waits until node2 is back, resumes from the last rolling checkpoint and ends
  with the same weights.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from launching import mimlib_cmd, pretrain_args, rank_free_env
from slurm_cluster import (ROOT, Cluster, finish, job_env, prepare_data, slurm_cluster, snakemake_cmd,
                           start_snakemake, tail)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MODEL = "swinv2_pico"
SHORT, LONG = 8, 64  # lengths: trunk points 7 (as short as the DDP test) and 56 (long enough to interrupt)


def trunk_point(length: int) -> int:
    return length * 7 // 8


def target(dataset: str, length: int) -> str:
    return f"results/pretrain/{MODEL}/{dataset}/trunk/{trunk_point(length)}.pt"


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster(nodes=2, gpus=1) as c:
        yield c


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The smoke study cut to one trunk segment (of 7 or of 112 iterations), its data prepared
    locally (the tests are about training), and the reference runs on this machine: 1 process
    for the short job, 2 ranks through launch.sh (torchrun) for the long one."""
    from mimlib.config import pretrain_recipe, validate_config
    from mimlib.train.pretrain import PretrainJob

    base = tmp_path_factory.mktemp("multinode")
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    dataset = next(iter(cfg["datasets"]))
    cfg["datasets"] = {dataset: cfg["datasets"][dataset]}
    cfg.pop("finetune", None)
    # 2 ranks x micro 2 x 2 accumulation = global batch 8; drop path 0 (its draws depend on the
    # rank layout); rolling checkpoints often, validation only at the end.
    cfg["pretrain"].update(micro_batch=2, drop_path=0.0, log_every=2, checkpoint_every=8, val_every=1000)
    # 2 GPUs on nodes of 1: one rank on each node
    cfg["resources"] = {"pretrain_gpus": {MODEL: 2}, "gpus_per_node": 1, "cpus_per_task": 1, "mem_mb_per_task": 1000}
    configs = {}
    for length in (SHORT, LONG):
        configs[length] = base / f"study_{length}.yaml"
        configs[length].write_text(yaml.safe_dump({**cfg, "lengths": [length]}))
    work = base / "prepared"
    manifest, val_index = prepare_data(work, configs[LONG], dataset, cfg["validation"]["source"], cfg["results"])
    recipe = pretrain_recipe(validate_config({**cfg, "lengths": [LONG]}), MODEL)
    references = {}
    for length, ranks in ((SHORT, 1), (LONG, 2)):
        ref = PretrainJob(model=MODEL, recipe=recipe, manifest=work / manifest, end_iter=trunk_point(length),
                          out=base / f"reference_{length}.pt", log_out=base / f"reference_{length}.jsonl",
                          resume_dir=base / f"reference_resume_{length}", val_index=work / val_index, device="cpu")
        subprocess.run(mimlib_cmd(pretrain_args(ref), ranks=ranks), cwd=work, env=rank_free_env(), check=True,
                       capture_output=True, timeout=600)
        references[length] = ref.out
    return {"configs": configs, "dataset": dataset, "prepared": work, "references": references}


def _work(study: dict, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(study["prepared"], work, ignore=shutil.ignore_patterns(".snakemake"))
    return work


def _close_weights(reference: Path, out: Path) -> None:
    """Equal to the tolerance of the DDP test (tests/test_engine.py): other ranks sum in another order."""
    a, b = _weights(reference), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def _same_weights(reference: Path, out: Path) -> None:
    """Bit-identical: the same 2-rank layout, uninterrupted or resumed."""
    a, b = _weights(reference), _weights(out)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def _weights(path: Path) -> dict:
    from mimlib.train import checkpoint as ckpt

    return ckpt.load(path)["model"]


def _job_log(work: Path, dataset: str, length: int = LONG) -> Path:
    return work / f"results/logs/pretrain/{MODEL}/{dataset}/trunk_{trunk_point(length)}.log"


def _resume_dir(work: Path, dataset: str) -> Path:
    return work / f"results/.resume/pretrain/{MODEL}/{dataset}/trunk_{trunk_point(LONG)}"


def _wait_for_checkpoint(work: Path, dataset: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    """Wait until the long job has written a rolling checkpoint; its iteration."""
    from mimlib.train import checkpoint as ckpt

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        saved = ckpt.rolling_checkpoints(_resume_dir(work, dataset))
        if saved:
            return saved[-1][0]
        time.sleep(0.2)
    raise AssertionError(f"no rolling checkpoint (snakemake {proc.poll()})\n{tail(log)}\n{tail(_job_log(work, dataset))}")


def _running_job(cluster: Cluster) -> str:
    jobs = cluster.run(["squeue", "-h", "-t", "running", "-o", "%i"]).stdout.split()
    assert len(jobs) == 1, jobs
    return jobs[0]


def test_a_stopped_cluster_leaves_nothing_behind() -> None:
    """stop_cluster.sh ends every daemon it started (by PID) and removes its namespaces and
    /etc/netns entries (by name), whatever the test did in between."""
    with slurm_cluster(nodes=2, gpus=1) as c:
        pids = [int(line.split()[1]) for line in (c.scratch / "pids").read_text().splitlines()]
        netns = [line.split()[1] for line in (c.scratch / "nodes").read_text().splitlines()]
        names = {line.split()[0] for line in (c.scratch / "pids").read_text().splitlines()}
        assert names == {"munged", "slurmctld", "slurmd:node1", "slurmd:node2"}
        for pid in pids:  # the recorded PIDs are the daemons themselves, not wrappers
            assert Path(f"/proc/{pid}/comm").read_text().strip() in ("munged", "slurmctld", "slurmd")
        assert c.run(["hostname"]).stdout.strip() == "node1"
        assert "node2" in c.run(["getent", "hosts", "node2"]).stdout
    alive = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]]
    assert not alive
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ns for ns in netns if ns in listed]
    assert not [ns for ns in netns if Path("/etc/netns", ns).exists()]


def test_two_node_job_matches_one_process(cluster: Cluster, study: dict, tmp_path: Path) -> None:
    work, dataset = _work(study, tmp_path), study["dataset"]
    cmd = snakemake_cmd(work, target(dataset, SHORT), study["configs"][SHORT])
    t0 = time.monotonic()
    proc = start_snakemake(cluster, cmd, tmp_path / "snakemake.log", job_env(MIMSCALE_GPU_FALLBACK="cpu"))
    ended = finish(proc, timeout=500)
    out = (tmp_path / "snakemake.log").read_text(errors="replace")
    log = tail(_job_log(work, dataset, SHORT), 200)
    print(f"2-node job through the slurm executor: {time.monotonic() - t0:.1f} s wall")
    assert ended and proc.returncode == 0, f"{out[-4000:]}\n{log}\n{cluster.daemon_logs()}"
    # one rank on each node, each on its node's GPU, meeting at the first node
    hosts = sorted(re.findall(r"rank \d+/2 on (\S+) \(local rank 0\): GPU 0 of CUDA_VISIBLE_DEVICES=0", log))
    assert hosts == ["node1", "node2"], log
    assert "launch.sh: 2 ranks on 2 nodes, rendezvous at node1:" in log, log
    jobid = re.findall(r"has been submitted with SLURM jobid (\d+)", out)[0]
    info = cluster.run(["scontrol", "show", "job", jobid]).stdout
    assert "NodeList=node[1-2]" in info and re.search(r"\bNumNodes=2\b", info), info
    _close_weights(study["references"][SHORT], work / target(dataset, SHORT))


def test_scancel_then_the_same_command_resumes(cluster: Cluster, study: dict, tmp_path: Path) -> None:
    work, dataset = _work(study, tmp_path), study["dataset"]
    end = trunk_point(LONG)
    cmd = snakemake_cmd(work, target(dataset, LONG), study["configs"][LONG])
    env = job_env(MIMSCALE_GPU_FALLBACK="cpu")
    t0 = time.monotonic()
    proc = start_snakemake(cluster, cmd, tmp_path / "first.log", env)
    _wait_for_checkpoint(work, dataset, proc, tmp_path / "first.log")
    jobid = _running_job(cluster)
    cluster.run(["scancel", jobid], check=True)
    assert cluster.wait_state(jobid, ("CANCELLED",), 120) == "CANCELLED"
    ended = finish(proc, timeout=300)
    assert ended and proc.returncode != 0, tail(tmp_path / "first.log")  # the job failed: no retries here
    log = _job_log(work, dataset).read_text(errors="replace")
    stopped = re.findall(r"preempted: stopped by SIGTERM after iteration (\d+)", log)
    assert len(stopped) == 2 and stopped[0] == stopped[1], log[-3000:]  # both ranks, the same update
    assert not (work / target(dataset, LONG)).exists()

    proc = start_snakemake(cluster, cmd, tmp_path / "second.log", env)
    ended = finish(proc, timeout=500)
    log = _job_log(work, dataset).read_text(errors="replace")
    assert ended and proc.returncode == 0, f"{tail(tmp_path / 'second.log')}\n{log[-3000:]}"
    print(f"2-node scancel + rerun: {time.monotonic() - t0:.1f} s wall")
    assert re.search(rf"iterations {stopped[0]} -> {end} from .*iter_0*{stopped[0]}\.pt", log), log[-3000:]
    _same_weights(study["references"][LONG], work / target(dataset, LONG))


def test_a_lost_node_is_retried_and_resumes(cluster: Cluster, study: dict, tmp_path: Path) -> None:
    from mimlib.train import checkpoint as ckpt

    work, dataset = _work(study, tmp_path), study["dataset"]
    end = trunk_point(LONG)
    cmd = snakemake_cmd(work, target(dataset, LONG), study["configs"][LONG], "--retries", "1")
    t0 = time.monotonic()
    proc = start_snakemake(cluster, cmd, tmp_path / "snakemake.log", job_env(MIMSCALE_GPU_FALLBACK="cpu"))
    _wait_for_checkpoint(work, dataset, proc, tmp_path / "snakemake.log")
    jobid = _running_job(cluster)
    assert cluster.kill_node("node2")  # a power cut: slurmd, the job step and its rank
    # The job ends (FAILED, or NODE_FAIL once Slurm notices the silent node); submitted with
    # --no-requeue, Slurm does not restart it, Snakemake's retry resubmits it (attempt 2), and
    # the new job waits for 2 nodes.
    log = tmp_path / "snakemake.log"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and \
            len(re.findall(r"has been submitted with SLURM jobid", log.read_text(errors="replace"))) < 2:
        time.sleep(0.5)
    state = cluster.job_state(jobid)
    assert state in ("FAILED", "NODE_FAIL"), f"{state}\n{tail(log)}\n{tail(_job_log(work, dataset))}\n{cluster.daemon_logs()}"
    saved = ckpt.rolling_checkpoints(_resume_dir(work, dataset))
    assert saved and saved[-1][0] < end
    last = saved[-1][0]
    cluster.start_slurmd("node2")
    ended = finish(proc, timeout=600)
    out = log.read_text(errors="replace")
    job_log = _job_log(work, dataset).read_text(errors="replace")
    assert ended and proc.returncode == 0, f"{out[-4000:]}\n{job_log[-3000:]}\n{cluster.daemon_logs()}"
    print(f"2-node job, node lost, retried: {time.monotonic() - t0:.1f} s wall")
    # the first try and the retry, one after the other: Slurm never restarted the first beside it
    jobs = re.findall(r"has been submitted with SLURM jobid (\d+)", out)
    assert len(jobs) == 2 and jobs[0] == jobid, out[-3000:]
    first = cluster.run(["scontrol", "show", "job", jobid]).stdout
    assert re.search(r"\bRestarts=0\b", first) and re.search(r"\bRequeue=0\b", first), first
    assert cluster.job_state(jobs[1]) == "COMPLETED"
    # nothing lost: the retry starts from the newest rolling checkpoint, not from 0
    assert re.search(rf"iterations {last} -> {end} from .*iter_0*{last}\.pt", job_log), job_log[-3000:]
    _same_weights(study["references"][LONG], work / target(dataset, LONG))
