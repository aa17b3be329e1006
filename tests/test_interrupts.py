"""Interrupts never throw a finished job's work away (issue 12, item 5).

- SIGINT to the Snakemake process alone (a supervisor, a wrapper script): Snakemake stops at
  once, its running job is orphaned and completes, but Snakemake never records that; the rerun
  (``rerun-incomplete``) deletes the job's outputs and runs it again. The job leaves its final
  state in its resume folder, so the rerun re-creates the outputs without training.
- Ctrl-C (SIGINT to the whole process group): the training job saves its state after the
  current update, like on SIGTERM, and exits 130 without a traceback; the rerun resumes there.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mimlib.train import checkpoint as ckpt
from mimlib.train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TRUNK = "results/pretrain/swinv2_pico/half/trunk/{it}.pt"
JOB_LOG = "results/logs/pretrain/swinv2_pico/half/trunk_{it}.log"


def _study(tmp_path: Path, length: int, checkpoint_every: int) -> Path:
    """The smoke study cut to one trunk job (7/8 of ``length``), no fine-tuning."""
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["lengths"] = [length]
    cfg["datasets"] = {"half": cfg["datasets"]["half"]}
    cfg.pop("finetune")
    cfg["pretrain"].update(checkpoint_every=checkpoint_every, val_every=1000, log_every=1)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


def _snakemake_cmd(tmp_path: Path, config: Path, target: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path),
            "--cores", "1", target, "--configfile", str(config)]


def _wait(cond, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _running(marker: str) -> list[int]:
    """PIDs of the processes whose command line contains ``marker`` (a path unique to the test)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmdline = (p / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and "snakemake" not in cmdline and int(p.name) != os.getpid():
                pids.append(int(p.name))
    return pids


def _trained_iters(log: Path) -> list[int]:
    return [r["iter"] for r in read_jsonl(log) if "loss" in r]


@pytest.mark.slow
def test_sigint_to_snakemake_alone_keeps_the_orphaned_jobs_work(tmp_path: Path) -> None:
    """kill -INT <snakemake pid>: the job finishes on its own; the rerun does not train it again."""
    config = _study(tmp_path, length=64, checkpoint_every=8)  # one trunk job: iterations 0 -> 56
    target, job_log = TRUNK.format(it=56), tmp_path / JOB_LOG.format(it=56)
    work_log = tmp_path / "results/.resume/pretrain/swinv2_pico/half/trunk_56/metrics.jsonl"
    with open(tmp_path / "snakemake1.log", "w") as out:
        proc = subprocess.Popen(_snakemake_cmd(tmp_path, config, target), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _wait(lambda: proc.poll() is not None or (work_log.exists() and work_log.read_text()), "training to start")
    assert proc.poll() is None, "the workflow ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGINT)  # Snakemake alone: its job gets no signal
    proc.wait(timeout=120)
    assert proc.returncode != 0
    # The orphaned job trains to its end and publishes its outputs, which Snakemake never records.
    _wait(lambda: not _running(str(tmp_path / "results/.resume")), "the orphaned job to end")
    assert (tmp_path / target).exists(), job_log.read_text()[-2000:]
    first_weights = ckpt.load(tmp_path / target)["model"]
    first_log = (tmp_path / "results/pretrain/swinv2_pico/half/trunk/56.jsonl").read_text()
    assert _trained_iters(tmp_path / "results/pretrain/swinv2_pico/half/trunk/56.jsonl") == list(range(1, 57))

    rerun = subprocess.run(_snakemake_cmd(tmp_path, config, target), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    log = job_log.read_text()
    assert "iterations 0 -> 56" not in log, log[-2000:]  # not trained again from scratch
    assert re.search(r"finished at iteration 56 .*outputs re-created without training", log), log[-2000:]
    # the outputs are the orphaned (uninterrupted) job's, bit for bit
    again = ckpt.load(tmp_path / target)["model"]
    assert again.keys() == first_weights.keys() and all(torch.equal(again[k], first_weights[k]) for k in again)
    assert (tmp_path / "results/pretrain/swinv2_pico/half/trunk/56.jsonl").read_text() == first_log
    # Snakemake has now recorded the job: the final state is gone, nothing is left to do
    assert not (tmp_path / "results/.resume/pretrain/swinv2_pico/half/trunk_56").exists()
    dry = subprocess.run(_snakemake_cmd(tmp_path, config, target) + ["-n"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert "Nothing to be done" in dry.stdout + dry.stderr
