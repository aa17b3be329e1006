"""How the tests start jobs the way the workflow does: ``python -m mimlib`` arguments built from
a job description, one process or N ranks through ``workflow/scripts/launch.sh``, and an
environment free of rank variables an outer job (torchrun, Slurm) may have left behind."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mimlib.finetune.common import FinetuneJob
from mimlib.train.pretrain import PretrainJob

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "workflow" / "scripts" / "launch.sh"


def rank_free_env() -> dict[str, str]:
    """``os.environ`` without torchrun / Slurm variables: launch.sh, torchrun or srun set the ranks."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "MASTER_"))
            and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}


def pretrain_args(j: PretrainJob) -> list[str]:
    args = ["pretrain", "--model", j.model, "--recipe-json", json.dumps(j.recipe), "--manifest", str(j.manifest),
            "--end-iter", str(j.end_iter), "--out", str(j.out), "--log-out", str(j.log_out),
            "--resume-dir", str(j.resume_dir), "--device", j.device, "--no-progress"]
    if j.val_index is not None:
        args += ["--val-index", str(j.val_index)]
    if j.decay_at is not None:
        args += ["--decay-at", str(j.decay_at)]
    if j.tracking is not None:
        args += ["--tracking-json", json.dumps(j.tracking)]
    return args


def finetune_args(j: FinetuneJob) -> list[str]:
    return ["finetune", "--task", j.task, "--model", j.model, "--recipe-json", json.dumps(j.recipe),
            "--data-json", json.dumps(j.data, default=str), "--out-dir", str(j.out_dir),
            "--resume-dir", str(j.resume_dir), "--device", j.device, "--no-progress",
            *(["--tracking-json", json.dumps(j.tracking)] if j.tracking is not None else [])]


def mimlib_cmd(args: list[str], ranks: int = 1) -> list[str]:
    """One process directly, or ``ranks`` processes on this machine through launch.sh (torchrun
    outside Slurm, srun inside a Slurm job) -- as the workflow's training rules start them."""
    if ranks == 1:
        return [sys.executable, "-m", "mimlib", *args]
    return [str(LAUNCH), "1", str(ranks), sys.executable, *args]
