"""What Slurm would receive for the paper's GPU jobs: the real executor plugin
(snakemake-executor-plugin-slurm), the repo's profiles and config/paper.yaml on a fake
ImageNet layout, submitting to a recording ``sbatch`` on PATH.

One Snakemake run submits every rule shape at once: the first trunk segment of each model on
one dataset, the 125K decay branch of each model on a second (its trunk point exists), and
every fine-tuning task of each model on a third (its cell exists). The test then checks the
flags of each recorded sbatch call: one task per GPU, the same GPUs on every node, CPUs and
memory per node to match, and the launch line that starts the ranks.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_paper import fake_paper_config
from launching import rank_free_env

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "snakemake_executor_plugin_slurm"

# Stand-ins for the Slurm clients the plugin calls. sbatch records its argv (one JSON line)
# and answers a job id; the rest answer what a cluster with account my_account and partition
# gpu would (the plugin validates both before submitting).
SBATCH = """#!/usr/bin/env python3
import json, os, sys
log = os.environ["RECORD_SBATCH"]
with open(log, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
with open(log) as f:
    print(1000 + sum(1 for _ in f))
"""
CLIENTS = {
    "sbatch": SBATCH,
    "sacctmgr": "#!/bin/sh\necho my_account\n",
    "sshare": "#!/bin/sh\necho my_account\n",
    "sinfo": "#!/bin/sh\nprintf 'PARTITION\\ngpu*\\n'\n",
    "scontrol": "#!/bin/sh\nexit 0\n",
    "squeue": "#!/bin/sh\nexit 0\n",
    "sacct": "#!/bin/sh\nexit 0\n",
    "scancel": "#!/bin/sh\nexit 0\n",
}


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    time.sleep(0.01)  # strictly increasing mtimes: nothing upstream looks newer


def _flags(argv: list[str]) -> dict[str, str]:
    """sbatch's options as {flag: value} ('--nodes=8' and '--mem 768000' alike)."""
    out, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--wrap="):
            out["--wrap"] = a[len("--wrap="):]
        elif a.startswith("-") and "=" in a:
            k, v = a.split("=", 1)
            out[k] = v
        elif a.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            out[a] = argv[i + 1]
            i += 1
        elif a.startswith("-"):
            out[a] = ""
        i += 1
    return out


@pytest.mark.slow
def test_paper_gpu_jobs_ask_slurm_for_one_task_per_gpu(tmp_path: Path) -> None:
    if importlib.util.find_spec(PLUGIN) is None:
        msg = f"the Slurm executor plugin is not installed in {sys.executable} (tests/slurm/install.sh)"
        if os.environ.get("MIMSCALE_REQUIRE_SLURM") == "1":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    import json

    from mimlib import paths as P
    from mimlib.config import validate_config
    from mimlib.train.schedule import trunk_points

    raw, config = fake_paper_config(tmp_path)
    cfg = validate_config(raw)
    work = tmp_path / "work"
    results = work / cfg["results"]
    models = cfg["models"]
    first = trunk_points(cfg["lengths"])[0]
    length = min(cfg["lengths"])
    tasks = cfg["finetune"]["tasks"]
    trunk_ds, branch_ds, ft_ds = "in1k_10", "in1k_20", "in1k_50"
    # Inputs that exist already, oldest first.
    for source, splits in (("in1k", ("train", "val")), ("in22k", ("train",))):
        for split in splits:
            _touch(results / P.INDEX.format(source=source, split=split))
    for ds in cfg["datasets"]:
        _touch(results / P.MANIFEST.format(dataset=ds))
    for m in models:
        for ds in (branch_ds, ft_ds):
            _touch(results / P.TRUNK_CKPT.format(model=m, dataset=ds, iter=first))
            _touch(results / P.TRUNK_LOG.format(model=m, dataset=ds, iter=first))
        for pattern in (P.CELL_CKPT, P.CELL_METRICS, P.CELL_LOG):
            _touch(results / pattern.format(model=m, dataset=ft_ds, length=length))
    targets = (
        [f"{cfg['results']}/{P.TRUNK_CKPT.format(model=m, dataset=trunk_ds, iter=first)}" for m in models]
        + [f"{cfg['results']}/{P.CELL_CKPT.format(model=m, dataset=branch_ds, length=length)}" for m in models]
        + [f"{cfg['results']}/{P.FINETUNE_METRICS.format(task=t, model=m, dataset=ft_ds, length=length)}"
           for t in tasks for m in models]
    )

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in CLIENTS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "sbatch.jsonl"
    env = {**rank_free_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD_SBATCH": str(record)}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work), *targets,
           "--profile", str(ROOT / "profiles" / "slurm"), "--configfile", str(config)]
    log = tmp_path / "snakemake.log"  # a file, not a pipe: nobody reads a pipe while it submits
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    t0 = time.monotonic()
    deadline = t0 + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if record.exists() and len(record.read_text().splitlines()) >= len(targets):
            break
        time.sleep(0.2)
    submitted_s = time.monotonic() - t0
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # every job is submitted; nothing runs, nothing to save
    proc.wait(timeout=60)
    out = log.read_text(errors="replace")
    print(f"{len(targets)} jobs submitted in {submitted_s:.1f} s")
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    assert len(calls) == len(targets), f"{len(calls)} sbatch calls for {len(targets)} jobs\n{out[-5000:]}"

    # What each job's shell runs (Snakemake prints it as it submits): launch.sh NODES TASKS ...
    launches = {}
    for m in re.finditer(r"launch\.sh (\d+) (\d+) \S+ (pretrain|finetune) (.*)", out):
        args = m.group(4)
        task = re.search(r"--task (\S+)", args)
        rule = "finetune" if m.group(3) == "finetune" else ("pretrain_branch" if "--decay-at" in args else "pretrain_trunk")
        key = (rule, re.search(r"--model (\S+)", args).group(1), task.group(1) if task else None)
        launches[key] = (int(m.group(1)), int(m.group(2)), "--device cuda" in args)

    res = cfg["resources"]
    per_node_max = res["gpus_per_node"]
    seen: dict[str, set[tuple[int, int]]] = {}
    lines = []
    for argv in calls:
        f = _flags(argv)
        job = re.search(r"--target-jobs '(\w+):([^']*)'", f["--wrap"])
        rule, wildcards = job.group(1), dict(kv.split("=", 1) for kv in job.group(2).split(","))
        model, task = wildcards["model"], wildcards.get("task")
        if rule == "finetune":
            gpus = next(res["finetune_gpus"][k] for k in (f"{task}.{model}", task, "default") if k in res["finetune_gpus"])
            shape = f"finetune {task}"
        else:
            gpus = res["pretrain_gpus"][model]
            shape = rule
        per_node = min(gpus, per_node_max)
        nodes = gpus // per_node
        ctx = f"{shape} {model}: sbatch {shlex.join(a for a in argv if not a.startswith('--wrap'))}"
        # one task per GPU, the same GPUs on every node; no job-wide --gpus total beside --gres
        assert f["--nodes"] == str(nodes), ctx
        assert f["--ntasks"] == str(gpus), ctx
        assert f["--ntasks-per-gpu"] == "1", ctx
        assert f["--gres"] == f"gpu:{per_node}", ctx
        assert "--gpus" not in f and "--ntasks-per-node" not in f, ctx
        # CPUs and memory per node match its tasks
        assert f["--cpus-per-task"] == str(res["cpus_per_task"]), ctx
        assert int(f["--mem"]) == res["mem_mb_per_task"] * per_node, ctx
        assert f["-p"] == "gpu" and f["-A"] == "my_account", ctx
        assert "--no-requeue" in f, ctx  # a lost node's job is retried by Snakemake, never run twice
        assert int(f["-t"]) > 0, ctx
        # the ranks start through launch.sh with the job's shape, on CUDA (no silent CPU run)
        assert launches.get((rule, model, task)) == (nodes, gpus, True), (ctx, launches.get((rule, model, task)))
        seen.setdefault(shape, set()).add((nodes, gpus))
        lines.append(f"{shape:16s} {model:9s} sbatch --nodes={f['--nodes']} --ntasks={f['--ntasks']} "
                     f"--ntasks-per-gpu=1 --gres={f['--gres']} --cpus-per-task={f['--cpus-per-task']} "
                     f"--mem {f['--mem']} -t {f['-t']}")
    print("\n".join(sorted(lines)))
    assert seen["pretrain_trunk"] == seen["pretrain_branch"] == {(1, 8), (2, 16), (4, 32), (8, 64)}
    assert seen["finetune in1k"] == seen["finetune coco"] == {(1, 8), (2, 16), (4, 32)}
    assert seen["finetune ade20k"] == {(1, 8), (2, 16)} and seen["finetune inat18"] == {(1, 8)}
