"""A finished job's final state: what a rerun needs to re-create the job's outputs without
training again, kept in the job's resume folder until the workflow has recorded the job.

Why: Snakemake records a job as complete only after the job's process has exited and it has
checked the outputs. Interrupt Snakemake alone (``kill -INT <snakemake pid>``, a supervisor, a
wrapper script; on Slurm, Snakemake ending while its submitted jobs run on) and the running job
is orphaned: it trains to its end and writes its outputs, but Snakemake never records them, so
the next run (``rerun-incomplete``) deletes them and runs the job again -- and the job, which had
removed its resume folder on completion, started from iteration 0.

So the workflow's training jobs (``--keep-final-state``) leave in their resume folder:

- pre-training: the output checkpoint as the rolling checkpoint ``iter_<end_iter>.pt`` (a hard
  link: no disk while the output exists; a copy where the resume folder is on another file
  system), the job summary (``finished.json``) and the metric log (``metrics.jsonl``);
- fine-tuning: a small rolling file ``iter_<total>.pt`` (the recipe hash and identity, no
  weights), the metrics record (``finished.json``) and the log (``log.jsonl``).

Both are read through the job's ordinary resume load (recipe hash and identity checks
included): a job that finds its state at its last iteration re-creates its declared outputs
from it and trains nothing. The Snakefile's ``onsuccess`` / ``onerror`` handlers remove the
final state of every training job the run has recorded (:func:`drop_final_state`); a job run
without ``--keep-final-state`` (by hand, by the tests) removes its resume folder as before.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FINISHED = "finished.json"  # the summary / metrics record, written before the final rolling file
WORK_LOGS = ("metrics.jsonl", "log.jsonl")  # the work logs of pre-training and of fine-tuning


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` the file ``src`` (a hard link, atomically replacing ``dst``); copy it where a
    hard link is impossible (another file system, a file system without hard links)."""
    from mimlib.train.metrics import copy_atomic

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        copy_atomic(src, dst)
        return
    os.replace(tmp, dst)


def write_finished(resume_dir: str | Path, iteration: int, record: dict[str, Any]) -> None:
    """``finished.json``: what re-creates the outputs (the job summary or metrics record) and the
    job's last iteration. Written *before* the rolling file at that iteration, so a folder whose
    newest rolling file is at ``iteration`` always has it."""
    from mimlib.train.metrics import write_json_atomic

    write_json_atomic({"iteration": int(iteration), "record": record}, Path(resume_dir) / FINISHED)


def read_finished(resume_dir: str | Path, iteration: int) -> dict[str, Any] | None:
    """The record of a final state at ``iteration`` in ``resume_dir``, or None."""
    path = Path(resume_dir) / FINISHED
    try:
        finished = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return finished["record"] if finished.get("iteration") == iteration else None


def is_final_state(resume_dir: str | Path) -> bool:
    """Whether ``resume_dir`` holds a finished job's final state: ``finished.json`` and the
    newest rolling file at its iteration."""
    from mimlib.train import checkpoint as ckpt

    found = ckpt.rolling_checkpoints(resume_dir)
    return bool(found) and read_finished(resume_dir, found[-1][0]) is not None


def drop_final_state(resume_dir: str | Path) -> bool:
    """Remove a finished job's final state (and the folder, if that leaves it empty); a resume
    folder of a job still to finish is left alone. Returns whether something was removed."""
    from mimlib.train import checkpoint as ckpt

    folder = Path(resume_dir)
    if not is_final_state(folder):
        return False
    for _, p in ckpt.rolling_checkpoints(folder):
        p.unlink(missing_ok=True)
    for name in (FINISHED, *WORK_LOGS):
        (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()
    return True
