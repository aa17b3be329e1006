"""SimMIM pre-training engine: one job = iterations [start, end) of one model on one manifest.

A job starts from scratch, from a trunk checkpoint (``init``), or -- automatically -- from the
newest rolling checkpoint in its resume folder. The lr schedule, the data and the drop-path
randomness are pure functions of the iteration, so the cut points do not change the result:
trunk + decay branch == one uninterrupted run, and a killed job resumes bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mimlib.data.index import read_index
from mimlib.data.manifests import read_manifest
from mimlib.data.pretrain_data import (
    GlobalBatchSampler,
    PretrainDataset,
    ValidationDataset,
    collate,
    stable_seed,
)
from mimlib.models.attention import use_fused_attention
from mimlib.models.simmim import SimMIM, build_simmim
from mimlib.provenance import recipe_hash
from mimlib.train import checkpoint as ckpt
from mimlib.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from mimlib.train.metrics import JsonlLogger, copy_atomic, write_json_atomic
from mimlib.train.optim import param_groups
from mimlib.train.precision import autocast_context
from mimlib.train.loop import IntervalLog, TrainTask, Update, train
from mimlib.train.preemption import SigtermSafeDataLoader
from mimlib.train.schedule import scaled_lr, step_lr

log = logging.getLogger(__name__)


class TooManyCorruptImagesError(RuntimeError):
    """More than ``max_corrupt_fraction`` of the dataset failed to decode."""


@dataclass
class PretrainJob:
    """Everything one pre-training job needs; the CLI builds it from the config."""

    model: str
    recipe: dict[str, Any]
    manifest: Path
    end_iter: int
    out: Path  # checkpoint written when ``end_iter`` is reached (the declared output)
    resume_dir: Path  # rolling checkpoints and the job's metric log while it runs
    log_out: Path | None = None  # the metric log is copied here when the job completes
    seed: int = 0
    decay_at: int | None = None  # iteration of the x0.1 step; None for a trunk
    init: Path | None = None  # start from this checkpoint (a trunk point)
    val_index: Path | None = None
    val_max_images: int | None = None
    metrics_out: Path | None = None  # cell summary written at the end (decay branches)
    cell: dict[str, Any] = field(default_factory=dict)  # model/dataset/length for metrics_out
    save_optimizer: bool = True  # trunk points keep AdamW state for the branches after them
    device: str = "auto"


def build_model(job: PretrainJob) -> SimMIM:
    r = job.recipe
    # Same initial weights on every rank and for every cut of the run.
    torch.manual_seed(stable_seed(job.seed, "init", job.model))
    model = build_simmim(
        job.model,
        img_size=r["img_size"],
        window_size=r["window_size"],
        drop_path_rate=r["drop_path"],
        decoder=r["decoder"],
        loss=r["loss"],
        norm_target_window=r["norm_target_window"],
    )
    if r.get("fused_attention", True):
        use_fused_attention(model)
    return model


def build_optimizer(model: torch.nn.Module, recipe: dict[str, Any], device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, recipe["weight_decay"]),
        lr=0.0,  # set every iteration from the schedule
        betas=tuple(recipe["betas"]),
        eps=recipe["eps"],
        fused=device.type == "cuda",
    )


@torch.no_grad()
def validation_loss(model: SimMIM, loader: DataLoader, recipe: dict[str, Any],
                    info: DistInfo) -> tuple[float, float]:
    """(mean per-image masked-reconstruction loss, the same for the trivial predictor of
    :meth:`SimMIM.trivial_losses`) over the (sharded) validation set."""
    was_training = model.training
    model.eval()
    total = torch.zeros(3, dtype=torch.float64, device=info.device)
    for batch in loader:
        images = batch["image"].to(info.device, non_blocking=True)
        masks = batch["mask"].to(info.device, non_blocking=True)
        valid = batch["valid"].to(info.device)
        with autocast_context(recipe, info.device):
            losses = model.forward_losses(images, masks).float()
        total[0] += losses[valid].double().sum()
        total[1] += model.trivial_losses(images, masks)[valid].double().sum()
        total[2] += valid.sum()
    all_reduce_sum(total, info)
    model.train(was_training)
    if total[2] == 0:
        return math.nan, math.nan
    return float(total[0] / total[2]), float(total[1] / total[2])


def _validation_loader(job: PretrainJob, info: DistInfo) -> DataLoader | None:
    if job.val_index is None:
        return None
    index, root = read_index(job.val_index)
    dataset = ValidationDataset(index, root, job.recipe, job.seed, job.val_max_images)
    shard = list(range(info.rank, len(dataset), info.world_size))
    return SigtermSafeDataLoader(
        torch.utils.data.Subset(dataset, shard),
        batch_size=job.recipe["micro_batch"],
        num_workers=min(job.recipe["num_workers"], 4),
        collate_fn=collate,
        pin_memory=info.device.type == "cuda",
    )


def _find_start(job: PretrainJob, info: DistInfo) -> tuple[int, dict[str, Any] | None, str]:
    """(start iteration, state to load, where it came from)."""
    rolling = [(i, p) for i, p in ckpt.rolling_checkpoints(job.resume_dir) if i < job.end_iter]
    if rolling:
        it, path = rolling[-1]
        state = ckpt.load(path, map_location=info.device)
        if state.get("recipe_hash") != recipe_hash(job.recipe):
            raise RuntimeError(
                f"resume checkpoint {path} was written with another recipe "
                f"(hash {state.get('recipe_hash')} != {recipe_hash(job.recipe)}); "
                "move it away to start this job over"
            )
        return it, state, str(path)
    if job.init is not None:
        state = ckpt.load(job.init, map_location=info.device)
        if state["iteration"] > job.end_iter:
            raise ValueError(f"{job.init} is at iteration {state['iteration']}, past this job's end {job.end_iter}")
        return state["iteration"], state, str(job.init)
    return 0, None, "scratch"


def _state(
    model: SimMIM, optimizer: torch.optim.Optimizer | None, iteration: int, job: PretrainJob, **extra: Any
) -> dict[str, Any]:
    state: dict[str, Any] = {
        **extra,
        "model": model.state_dict(),
        "iteration": iteration,
        "model_name": job.model,
        "recipe": job.recipe,
        "recipe_hash": recipe_hash(job.recipe),
        "seed": job.seed,
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    return state


def run_pretrain(job: PretrainJob, progress: bool = True) -> dict[str, Any]:
    """Run one job to ``job.end_iter``; returns the job summary (also written to metrics_out)."""
    info = init_distributed(job.device)
    r = job.recipe
    if r.get("threads"):
        torch.set_num_threads(r["threads"])
    model = build_model(job).to(info.device)
    optimizer = build_optimizer(model, r, info.device)
    start, state, source = _find_start(job, info)
    if state is not None:
        model.load_state_dict(state["model"])
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        elif start > 0 and start < job.end_iter:
            raise RuntimeError(f"{source} has no optimizer state; cannot continue training from it")
    logger = JsonlLogger(Path(job.resume_dir) / "metrics.jsonl", enabled=info.is_main)
    logger.truncate_after(start)
    if info.is_main:
        log.info("%s: iterations %d -> %d from %s", job.out, start, job.end_iter, source)

    manifest, root, _ = read_manifest(job.manifest)
    dataset = PretrainDataset(manifest, root, r, job.seed)
    sampler = GlobalBatchSampler(start, job.end_iter, r["global_batch"], r["micro_batch"], info.rank, info.world_size)
    loader = SigtermSafeDataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=r["num_workers"],
        collate_fn=collate,
        pin_memory=info.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if r["num_workers"] > 0 else None,
    )
    val_loader = _validation_loader(job, info)

    max_corrupt = r["max_corrupt_fraction"] * len(dataset)
    window_start = job.end_iter - max(1, round(r["train_loss_window"] * (job.cell.get("length") or job.end_iter)))
    resumed = state if state is not None and source != str(job.init) else {}  # mid-job: restore the sums
    tail_losses: list[float] = list(resumed.get("tail_losses", []))
    failed_files: set[str] = set(resumed.get("failed_files", []))
    interval = IntervalLog(resumed)
    t_job = time.perf_counter()
    last_val: float | None = None
    trivial_val: float | None = None

    def evaluate(iteration: int) -> None:
        nonlocal last_val, trivial_val
        if val_loader is None:
            return
        last_val, trivial_val = validation_loss(model, val_loader, r, info)
        logger.log({"iter": iteration, "val_loss": last_val, "val_trivial_loss": trivial_val})

    def forward(train_model: torch.nn.Module, batch: dict[str, Any], k: int, micro: int):
        failed_files.update(batch["failed"])
        loss = train_model(batch["image"].to(info.device, non_blocking=True),
                           batch["mask"].to(info.device, non_blocking=True))
        return loss, loss.detach().double()

    def after_update(u: Update) -> dict[str, str] | None:
        interval.add(loss=u.losses, grad_norm=u.grad_norm)
        if u.done > window_start:
            tail_losses.append(float(u.losses))
        if len(failed_files) > 0:
            n_failed = int(all_reduce_sum(torch.tensor(len(failed_files), device=info.device), info))
            if n_failed > max_corrupt:
                names = ", ".join(sorted(failed_files)[:20])
                raise TooManyCorruptImagesError(
                    f"{n_failed} of {len(dataset)} images in {job.manifest} could not be decoded "
                    f"(limit max_corrupt_fraction={r['max_corrupt_fraction']}): {names}"
                )
        postfix = None
        if u.done % r["log_every"] == 0 or u.done == job.end_iter:
            means = interval.means()
            logger.log({"iter": u.done, "loss": means["loss"], "lr": u.lr, "grad_norm": means["grad_norm"],
                        "images_per_s": interval.rate(r["global_batch"]), "corrupt_images": len(failed_files)})
            postfix = {"loss": f"{means['loss']:.4f}", "lr": f"{u.lr:.2e}"}
            interval.clear()
        if u.done % r["val_every"] == 0 or u.done == job.end_iter:
            evaluate(u.done)
        return postfix

    def save(done: int) -> None:
        # What a resumed job needs besides weights: the summary's and the open log interval's sums.
        if info.is_main:
            progress_state = {"tail_losses": tail_losses, "failed_files": sorted(failed_files), **interval.state()}
            ckpt.save_rolling(_state(model, optimizer, done, job, **progress_state), job.resume_dir, done)

    base_lr = scaled_lr(r["base_lr"], r["global_batch"])
    warmup_lr = scaled_lr(r["warmup_lr"], r["global_batch"])
    train(TrainTask(
        name=job.model, model=model, optimizer=optimizer, recipe=r, info=info, batches=iter(loader),
        start=start, total=job.end_iter, accum=sampler.accum,
        lr=lambda k: step_lr(k, base_lr, r["warmup_iters"], warmup_lr, job.decay_at, r["decay_ratio"]),
        # Drop path draws from the global RNG: seed it per iteration (and rank) so a resumed
        # run or a trunk/branch split draws the same paths as an uninterrupted one.
        begin_update=lambda k: torch.manual_seed(stable_seed(job.seed, "step", k, info.rank)),
        forward=forward, after_update=after_update, save=save, resume_dir=job.resume_dir,
        should_save=lambda done: done % r["checkpoint_every"] == 0 and done < job.end_iter,
        stop_message=lambda done: f"stopped by SIGTERM after iteration {done}; state saved in {job.resume_dir}",
        progress=progress, desc=f"{job.model} -> {job.end_iter}",
    ))
    if start == job.end_iter and val_loader is not None:
        evaluate(job.end_iter)

    summary = {
        **job.cell,
        "model": job.model,
        "iterations": job.end_iter,
        "train_loss": sum(tail_losses) / len(tail_losses) if tail_losses else None,
        "train_loss_window": [window_start, job.end_iter],
        "val_loss": last_val,
        "val_trivial_loss": trivial_val,
        "corrupt_images": len(failed_files),
        "wall_time_s": time.perf_counter() - t_job,
        "world_size": info.world_size,
        "recipe_hash": recipe_hash(r),
        "resumed_from": source,
    }
    if info.is_main:
        ckpt.save_atomic(_state(model, optimizer if job.save_optimizer else None, job.end_iter, job), job.out)
        if job.metrics_out is not None:
            write_json_atomic(summary, job.metrics_out)
        if job.log_out is not None:
            copy_atomic(logger.path, job.log_out)
        # The job is complete: its rolling checkpoints and work log are no longer needed.
        for _, p in ckpt.rolling_checkpoints(job.resume_dir):
            p.unlink(missing_ok=True)
        logger.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            Path(job.resume_dir).rmdir()
    barrier(info)
    return summary


def job_to_dict(job: PretrainJob) -> dict[str, Any]:
    d = asdict(job)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
