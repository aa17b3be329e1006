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
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from launching import mimlib_cmd, pretrain_args

from mimlib.train import checkpoint as ckpt
from mimlib.train.metrics import read_jsonl
from mimlib.train.pretrain import PretrainJob, run_pretrain

ROOT = Path(__file__).resolve().parents[1]
TRUNK = "results/pretrain/swinv2_pico/half/trunk/{it}.pt"
JOB_LOG = "results/logs/pretrain/swinv2_pico/half/trunk_{it}.log"


def _study(tmp_path: Path, length: int, checkpoint_every: int, resume_root: Path | None = None) -> Path:
    """The smoke study cut to one trunk job (7/8 of ``length``), no fine-tuning."""
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["lengths"] = [length]
    cfg["datasets"] = {"half": cfg["datasets"]["half"]}
    cfg.pop("finetune")
    cfg["pretrain"].update(checkpoint_every=checkpoint_every, val_every=1000, log_every=1)
    if resume_root is not None:
        cfg["resume_root"] = str(resume_root)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


def _snakemake_cmd(tmp_path: Path, config: Path, target: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path),
            "--cores", "1", target, "--configfile", str(config)]


def _default_sigint() -> None:
    """In the child before exec: SIGINT at its default, so Python (Snakemake, the job) turns it
    into KeyboardInterrupt whatever this test runner inherited (a runner started in the
    background of a non-interactive shell has SIGINT ignored, and so would every child)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
    config = _study(tmp_path, length=32, checkpoint_every=8)  # one trunk job: iterations 0 -> 28
    target, job_log = TRUNK.format(it=28), tmp_path / JOB_LOG.format(it=28)
    work_log = tmp_path / "results/.resume/pretrain/swinv2_pico/half/trunk_28/metrics.jsonl"
    with open(tmp_path / "snakemake1.log", "w") as out:
        proc = subprocess.Popen(_snakemake_cmd(tmp_path, config, target), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_default_sigint)
    _wait(lambda: proc.poll() is not None or (work_log.exists() and work_log.read_text()), "training to start")
    assert proc.poll() is None, "the workflow ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGINT)  # Snakemake alone: its job gets no signal
    proc.wait(timeout=120)
    assert proc.returncode != 0
    # The orphaned job trains to its end and publishes its outputs, which Snakemake never records.
    _wait(lambda: not _running(str(tmp_path / "results/.resume")), "the orphaned job to end")
    assert (tmp_path / target).exists(), job_log.read_text()[-2000:]
    first_weights = ckpt.load(tmp_path / target)["model"]
    first_log = (tmp_path / "results/pretrain/swinv2_pico/half/trunk/28.jsonl").read_text()
    assert _trained_iters(tmp_path / "results/pretrain/swinv2_pico/half/trunk/28.jsonl") == list(range(1, 29))
    assert (tmp_path / target).exists()

    rerun = subprocess.run(_snakemake_cmd(tmp_path, config, target), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    log = job_log.read_text()
    assert "iterations 0 -> 28" not in log, log[-2000:]  # not trained again from scratch
    assert re.search(r"finished at iteration 28 .*outputs re-created without training", log), log[-2000:]
    # the outputs are the orphaned (uninterrupted) job's, bit for bit
    again = ckpt.load(tmp_path / target)["model"]
    assert again.keys() == first_weights.keys() and all(torch.equal(again[k], first_weights[k]) for k in again)
    assert (tmp_path / "results/pretrain/swinv2_pico/half/trunk/28.jsonl").read_text() == first_log
    # Snakemake has now recorded the job: the final state is gone, nothing is left to do
    assert not (tmp_path / "results/.resume/pretrain/swinv2_pico/half/trunk_28").exists()
    dry = subprocess.run(_snakemake_cmd(tmp_path, config, target) + ["-n"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert "Nothing to be done" in dry.stdout + dry.stderr


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_saves_the_job_and_the_rerun_resumes(tmp_path: Path) -> None:
    """Ctrl-C: SIGINT to Snakemake and its job. The job saves after the current iteration (no
    periodic checkpoint exists: checkpoint_every is past the end), exits 130 without a traceback,
    and the rerun resumes from that iteration. The rolling state lives under ``resume_root``
    (e.g. fast node-shared storage), outside the results folder."""
    config = _study(tmp_path, length=32, checkpoint_every=1000, resume_root=tmp_path / "scratch" / "resume")
    target, job_log = TRUNK.format(it=28), tmp_path / JOB_LOG.format(it=28)
    resume = tmp_path / "scratch/resume/pretrain/swinv2_pico/half/trunk_28"
    with open(tmp_path / "snakemake1.log", "w") as out:
        proc = subprocess.Popen(_snakemake_cmd(tmp_path, config, target), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_default_sigint)
    work_log = resume / "metrics.jsonl"
    _wait(lambda: proc.poll() is not None or (work_log.exists() and work_log.read_text()), "training to start")
    assert proc.poll() is None, "the workflow ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    _wait(lambda: not _running(str(resume)), "the job to end")
    log = job_log.read_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    stopped = re.search(r"preempted: stopped by SIGINT after iteration (\d+)", log)
    assert stopped, log[-3000:]
    saved = int(stopped.group(1))
    assert [i for i, _ in ckpt.rolling_checkpoints(resume)] == [saved] and 0 < saved < 28
    assert not (tmp_path / target).exists() and not (tmp_path / "results/.resume").exists()
    rerun = subprocess.run(_snakemake_cmd(tmp_path, config, target), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    log = job_log.read_text()
    assert re.search(rf"iterations {saved} -> 28 from .*iter_0*{saved}\.pt", log), log[-2000:]
    assert _trained_iters(tmp_path / "results/pretrain/swinv2_pico/half/trunk/28.jsonl") == list(range(1, 29))


def _job(tmp: Path, data: dict, recipe: dict, end: int, **kw) -> PretrainJob:
    return PretrainJob(model="swinv2_pico", recipe=recipe, manifest=data["manifest"], end_iter=end,
                       out=tmp / "out.pt", log_out=tmp / "out.jsonl", metrics_out=tmp / "metrics.json",
                       resume_dir=tmp / ".resume" / "job", val_index=data["index_val"], device="cpu", **kw)


def test_sigint_saves_state_and_exits_130(tmp_path: Path, tiny_data: dict, tiny_recipe: dict) -> None:
    """SIGINT to a training process and its loader workers (Ctrl-C): state saved after the
    current iteration, exit code 130, one line, no KeyboardInterrupt traceback."""
    j = _job(tmp_path, tiny_data, {**tiny_recipe, "checkpoint_every": 1000, "num_workers": 2, "log_every": 1}, 40)
    proc = subprocess.Popen(mimlib_cmd(pretrain_args(j)), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_default_sigint)
    work_log = j.resume_dir / "metrics.jsonl"
    _wait(lambda: proc.poll() is not None or (work_log.exists() and work_log.read_text()), "training to start", 120)
    assert proc.poll() is None, "the job finished before SIGINT"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "DataLoader worker" not in err, err[-2000:]
    (saved, _), = ckpt.rolling_checkpoints(j.resume_dir)
    assert 0 < saved < 40 and f"stopped by SIGINT after iteration {saved}" in err


_IGNORED = """
import signal
from mimlib.train.preemption import StopRequest
assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
with StopRequest() as stop:
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # left ignored
    signal.raise_signal(signal.SIGINT)
    assert not stop.requested
    signal.raise_signal(signal.SIGTERM)
    assert stop.requested and stop.signal_name == "SIGTERM"
print("ok")
"""


def test_a_job_started_with_sigint_ignored_keeps_ignoring_it() -> None:
    """A non-interactive shell starts background jobs with SIGINT ignored: StopRequest keeps that."""
    proc = subprocess.run([sys.executable, "-c", _IGNORED], capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_sigint_and_sigterm_handlers_come_back() -> None:
    from mimlib.train.preemption import StopRequest

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in an interactive run
    try:
        with StopRequest() as stop:
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:  # (not let through: it would end the whole test session)
                pytest.fail("SIGINT raised KeyboardInterrupt instead of asking the loop to stop")
            assert stop.requested and stop.signal_name == "SIGINT"
            signal.raise_signal(signal.SIGTERM)
            assert stop.signal_name == "SIGTERM"  # SIGTERM wins: exit 143, what a scheduler expects
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_finished_pretraining_job_re_creates_its_outputs_without_training(
    tmp_path: Path, tiny_data: dict, tiny_recipe: dict, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--keep-final-state: the output checkpoint stays in the resume folder (a hard link, no
    disk), with the summary and the log; a rerun whose outputs were deleted (as Snakemake's
    rerun-incomplete deletes them) writes them again, bit for bit, and trains nothing."""
    from mimlib.train import final_state, pretrain

    j = _job(tmp_path, tiny_data, {**tiny_recipe, "checkpoint_every": 2}, 6, keep_final=True)
    first = run_pretrain(j, progress=False)
    final = j.resume_dir / "iter_000000006.pt"
    assert [i for i, _ in ckpt.rolling_checkpoints(j.resume_dir)] == [6] and final.samefile(j.out)
    assert final_state.is_final_state(j.resume_dir)
    outputs = {p: p.read_bytes() for p in (j.out, j.log_out, j.metrics_out)}
    for p in outputs:
        p.unlink()

    def no_training(task):
        raise AssertionError("trained again")

    monkeypatch.setattr(pretrain, "train", no_training)
    assert run_pretrain(j, progress=False) == first
    assert {p: p.read_bytes() for p in outputs} == outputs
    assert final.samefile(j.out)  # still one copy on disk
    # once the workflow has recorded the job, its final state goes (the Snakefile's handlers)
    assert final_state.drop_final_state(j.resume_dir) and not j.resume_dir.exists()


def test_a_finished_finetuning_job_re_creates_metrics_without_training(
    tmp_path: Path, tiny_data: dict, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mimlib.finetune import classification as cls
    from mimlib.finetune.common import FinetuneJob
    from mimlib.train import final_state

    recipe = {"img_size": 64, "window_size": 4, "epochs": 1, "warmup_epochs": 0, "global_batch": 8,
              "micro_batch": 8, "base_lr": 0.05, "warmup_lr": 1e-3, "min_lr": 1e-3, "layer_decay": 0.8,
              "num_workers": 0, "threads": 1}
    data = {"train_index": str(tiny_data["index_train"]), "val_index": str(tiny_data["index_val"]), "num_classes": 4}
    job = FinetuneJob(task="in1k", model="swinv2_pico", recipe=recipe, data=data, out_dir=tmp_path / "out",
                      resume_dir=tmp_path / ".resume" / "ft", device="cpu", keep_final=True)
    first = cls.run(job, progress=False)
    assert final_state.is_final_state(job.resume_dir)
    (saved, path), = ckpt.rolling_checkpoints(job.resume_dir)
    assert path.stat().st_size < 10_000  # the record, not the weights
    metrics, log = (job.out_dir / "metrics.json").read_text(), (job.out_dir / "log.jsonl").read_text()
    (job.out_dir / "metrics.json").unlink()  # Snakemake's rerun-incomplete deletes the declared output

    def no_training(task):
        raise AssertionError("trained again")

    monkeypatch.setattr(cls, "train", no_training)
    assert cls.run(job, progress=False) == first
    assert (job.out_dir / "metrics.json").read_text() == metrics and (job.out_dir / "log.jsonl").read_text() == log
    assert final_state.drop_final_state(job.resume_dir) and not job.resume_dir.exists()


def test_the_final_state_is_a_copy_where_a_hard_link_is_impossible(tmp_path: Path, monkeypatch) -> None:
    """resume_root on another file system (os.link: EXDEV): the final state is a copy."""
    import errno

    from mimlib.train import final_state

    src = tmp_path / "out.pt"
    src.write_bytes(b"weights")
    final_state.link_or_copy(src, tmp_path / "linked" / "iter_000000006.pt")
    assert (tmp_path / "linked" / "iter_000000006.pt").samefile(src)

    def cross_device(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    final_state.link_or_copy(src, tmp_path / "copied" / "iter_000000006.pt")
    copied = tmp_path / "copied" / "iter_000000006.pt"
    assert copied.read_bytes() == b"weights" and not copied.samefile(src)
    assert sorted(p.name for p in copied.parent.iterdir()) == ["iter_000000006.pt"]  # no temporary debris
