"""What every fine-tuning engine shares besides the training loop (mimlib.train.loop): the job
description, optimiser groups with layer decay, resumable state, and the metrics file format."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimlib.models.swinv2 import get_spec
from mimlib.provenance import recipe_hash
from mimlib.train import checkpoint as ckpt
from mimlib.train import final_state
from mimlib.train.distributed import DistInfo, barrier
from mimlib.train.layer_decay import layer_decay_param_groups
from mimlib.train.metrics import JsonlLogger, copy_atomic, write_json_atomic


@dataclass
class FinetuneJob:
    """One fine-tuning run: a pre-trained cell (or scratch) on one task.

    ``data`` holds the task's paths (dataset root, annotation files); ``recipe`` the task's
    hyper-parameters (config ``finetune.<task>`` with per-model overrides applied).
    """

    task: str
    model: str
    recipe: dict[str, Any]
    data: dict[str, Any]
    out_dir: Path  # metrics.json, log.jsonl, (best|last).pt end up here
    resume_dir: Path  # rolling state while the job runs (outside declared outputs)
    checkpoint: Path | None = None  # pre-trained cell checkpoint; None = from scratch
    seed: int = 0
    cell: dict[str, Any] = field(default_factory=dict)  # model / dataset / length of the pre-training
    device: str = "auto"
    trust_pickle: bool = False  # for reference checkpoints that pickle their config
    tracking: dict[str, Any] | None = None  # the config's tracking block (None: the JSON-lines log only)
    # Keep the final state in resume_dir when done, so a rerun re-writes metrics.json without
    # training (the workflow, which removes it once recorded: mimlib/train/final_state.py).
    keep_final: bool = False


def build_optimizer(model: nn.Module, recipe: dict[str, Any], device: torch.device,
                    encoder_prefix: str, model_name: str) -> torch.optim.AdamW:
    """AdamW over layer-decay groups (reference layer ids; see mimlib.train.layer_decay)."""
    groups = layer_decay_param_groups(
        model, get_spec(model_name).depths, recipe["weight_decay"], recipe["layer_decay"], encoder_prefix
    )
    return torch.optim.AdamW(
        groups, lr=recipe["lr"], betas=tuple(recipe["betas"]),
        eps=recipe["eps"], fused=device.type == "cuda",
    )


FINISHED_KEY = "finished"  # in load()'s extra state: the finished job's metrics record


class ResumableState:
    """Rolling checkpoints of a fine-tuning job in ``job.resume_dir`` (atomic, newest kept).

    ``step`` counts optimiser updates (classification: across epochs, so a job can stop mid-epoch).
    """

    def __init__(self, job: FinetuneJob, info: DistInfo):
        self.job, self.info = job, info
        self.hash = recipe_hash({**job.recipe, "_task": job.task, "_ckpt": str(job.checkpoint)})
        self._identity: dict[str, Any] | None = None
        self._final: tuple[int, dict[str, Any]] | None = None  # set_final(): kept by finish()

    @property
    def identity(self) -> dict[str, Any]:
        """:func:`finetune_identity` of the job, computed once (it hashes files)."""
        if self._identity is None:
            self._identity = finetune_identity(self.job)
        return self._identity

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, dict[str, Any]]:
        """(step to start from, extra state) — (0, {}) when there is nothing to resume.

        The newest readable rolling checkpoint (an unreadable one is set aside, see
        :func:`mimlib.train.checkpoint.load_rolling`), and only if this job wrote it."""
        found = ckpt.load_rolling(self.job.resume_dir, self.info.device, set_aside=self.info.is_main)
        ckpt.agree_across_ranks(found, self.info, self.job.resume_dir)
        if found is None:
            return 0, {}
        step, path, state = found
        ckpt.check_resume_identity(state, path, self.identity, self.job.resume_dir)
        if state.get("finished"):  # the job's final state: see republish()
            return step, {FINISHED_KEY: final_state.read_finished(self.job.resume_dir, step)}
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return step, state.get("extra", {})

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> None:
        if self.info.is_main:
            ckpt.save_rolling(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "recipe_hash": self.hash,
                 "job_identity": self.identity, "step": step, "extra": extra},
                self.job.resume_dir, step,
            )

    def set_final(self, step: int, record: dict[str, Any]) -> None:
        """The job's last update and its metrics record, for :meth:`finish` to keep."""
        self._final = (step, record)

    def finish(self) -> None:
        """The job is done: publish its log to ``out_dir/log.jsonl``, drop the rolling state --
        or, with ``job.keep_final``, keep its final state (:meth:`set_final`): the metrics record
        and the log, then a rolling file at the last update without weights (read by :meth:`load`)."""
        if not self.info.is_main:
            return
        work_log = Path(self.job.resume_dir) / "log.jsonl"
        if work_log.exists():
            copy_atomic(work_log, Path(self.job.out_dir) / "log.jsonl")
        if self.job.keep_final and self._final is not None:
            self._keep_final(*self._final)
        else:
            work_log.unlink(missing_ok=True)
            for _, p in ckpt.rolling_checkpoints(self.job.resume_dir):
                p.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                Path(self.job.resume_dir).rmdir()

    def _keep_final(self, step: int, record: dict[str, Any]) -> None:
        resume_dir = Path(self.job.resume_dir)
        final_state.write_finished(resume_dir, step, record)
        ckpt.save_rolling({"recipe_hash": self.hash, "job_identity": self.identity, "step": step, "finished": True},
                          resume_dir, step)
        for i, p in ckpt.rolling_checkpoints(resume_dir):
            if i < step:
                p.unlink(missing_ok=True)

    def republish(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The job finished before (:meth:`load` found its final state), but ``metrics.json`` was
        deleted -- by Snakemake, which never recorded a job that completed after Snakemake itself
        was interrupted: write it (and the log) again from the final state, without training."""
        record = extra[FINISHED_KEY]
        resume_dir = Path(self.job.resume_dir)
        if record is None:
            raise RuntimeError(f"{resume_dir} holds a finished job's state but no readable "
                               f"{final_state.FINISHED}; move the folder away to run the job again")
        if self.info.is_main:
            write_json_atomic(record, Path(self.job.out_dir) / "metrics.json")
            if (resume_dir / "log.jsonl").exists():
                copy_atomic(resume_dir / "log.jsonl", Path(self.job.out_dir) / "log.jsonl")
            logging.getLogger(__name__).info(
                "%s %s: finished before (final state in %s): metrics.json re-created without training",
                self.job.task, self.job.model, resume_dir)
            if not self.job.keep_final:
                final_state.drop_final_state(resume_dir)
        barrier(self.info)
        return record


def data_identity(data: dict[str, Any]) -> dict[str, Any]:
    """A fine-tuning job's data as it defines the result: every value as given, and for each
    value that names a file (an index, an annotation JSON) the SHA-256 of its bytes. A folder
    of images is identified by its path only (hashing every image would cost a pass over the
    data set per job)."""
    out: dict[str, Any] = {}
    for key in sorted(data):
        value = data[key]
        out[f"data.{key}"] = json.loads(json.dumps(value, default=str))  # plain values: weights_only loads them
        if isinstance(value, (str, Path)) and Path(value).is_file():
            out[f"data.{key}_sha256"] = ckpt.file_sha256(value)
    return out


def finetune_identity(job: FinetuneJob) -> dict[str, Any]:
    """What defines a fine-tuning job's result; its resume state is used only by a job with
    the same identity (:class:`ResumableState`)."""
    return {
        "recipe_hash": recipe_hash(job.recipe),
        "seed": job.seed,
        "model": job.model,
        "task": job.task,
        "checkpoint_sha256": ckpt.file_sha256(job.checkpoint) if job.checkpoint is not None else None,
        **data_identity(job.data),
    }


def job_logger(job: FinetuneJob, info: DistInfo, start: int, key: str, step: int | None = None) -> JsonlLogger:
    """The job's JSON-lines log, cut back to ``start`` (of ``key``) on resume, and its tracking
    runs (``job.tracking``; TensorBoard's in ``out_dir``) from update ``step`` (default ``start``).

    It lives in ``resume_dir`` while the job runs (Snakemake deletes a failed job's declared
    outputs, and the log must survive to be resumed) and is published to ``out_dir/log.jsonl``
    by :meth:`ResumableState.finish`; close it (:meth:`JsonlLogger.close`) when the job is done.
    """
    from mimlib.train.tracking import open_tracker

    cell = job.cell
    tracker = open_tracker(
        job.tracking, log_dir=job.out_dir, state_dir=job.resume_dir, start=start if step is None else step,
        is_main=info.is_main, recipe=job.recipe, seed=job.seed,
        group=f"finetune/{job.task}/{job.model}",
        tags={"stage": "finetune", "task": job.task, "model": job.model, "dataset": cell.get("dataset"),
              "length": cell.get("length")})
    logger = JsonlLogger(Path(job.resume_dir) / "log.jsonl", enabled=info.is_main, tracker=tracker)
    if logger.enabled and logger.path.exists():
        from mimlib.train.metrics import read_jsonl

        kept = [r for r in read_jsonl(logger.path) if r.get(key, 0) <= start]
        logger.path.unlink()
        for r in kept:
            logger.log(r)
    return logger


def write_metrics(job: FinetuneJob, info: DistInfo, metrics: dict[str, Any], started: float, **extra: Any) -> dict[str, Any]:
    """``out_dir/metrics.json``: task, cell, metric values, wall time, recipe hash (the
    aggregation reads this)."""
    record = {
        "task": job.task,
        "model": job.model,
        "dataset": job.cell.get("dataset"),
        "length": job.cell.get("length"),
        "pretrained": str(job.checkpoint) if job.checkpoint else None,
        "metrics": metrics,
        "wall_time_s": time.time() - started,
        "recipe_hash": recipe_hash(job.recipe),
        "world_size": info.world_size,
        **extra,
    }
    if info.is_main:
        write_json_atomic(record, Path(job.out_dir) / "metrics.json")
    return record

