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
from mimlib.data.pretrain_data import PretrainDataset, ValidationDataset, collate
from mimlib.data.sampling import GlobalBatchSampler, stable_seed
from mimlib.models.attention import use_fused_attention
from mimlib.models.simmim import SimMIM, build_simmim
from mimlib.provenance import recipe_hash
from mimlib.train import checkpoint as ckpt
from mimlib.train import final_state
from mimlib.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from mimlib.train.loop import IntervalLog, TrainTask, Update, train
from mimlib.train.metrics import JsonlLogger, copy_atomic, write_json_atomic
from mimlib.train.optim import param_groups
from mimlib.train.precision import autocast_context
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
    tracking: dict[str, Any] | None = None  # the config's tracking block (None: the JSON-lines log only)
    # Keep the final state in resume_dir when done, so a rerun re-creates the outputs without
    # training (the workflow, which removes it once recorded: mimlib/train/final_state.py).
    keep_final: bool = False

    @property
    def log_dir(self) -> Path:
        """The job's folder: TensorBoard's run (a trunk's segments share theirs)."""
        return Path(self.log_out or self.out).parent


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
    if r["fused_attention"]:
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


def job_identity(job: PretrainJob) -> dict[str, Any]:
    """What defines a job's result: a resume state is used only by a job with the same identity.

    The manifest and the init checkpoint by the SHA-256 of their bytes (a rebuilt manifest with
    other images, a trunk point re-run with another seed); the length by the end iteration and
    the decay point.
    """
    return {
        "recipe_hash": recipe_hash(job.recipe),
        "seed": job.seed,
        "model": job.model,
        "manifest_sha256": ckpt.file_sha256(job.manifest),
        "end_iter": job.end_iter,
        "decay_at": job.decay_at,
        "init_sha256": ckpt.file_sha256(job.init) if job.init is not None else None,
    }


def check_init(state: dict[str, Any], job: PretrainJob) -> None:
    """An init checkpoint (a trunk point) must come from the same run as this job: the same
    model, seed, recipe and manifest; otherwise trunk + branch is not the run it claims to be."""
    found = {"model": state.get("model_name"), "seed": state.get("seed"), "recipe_hash": state.get("recipe_hash")}
    want = {"model": job.model, "seed": job.seed, "recipe_hash": recipe_hash(job.recipe)}
    recorded = state.get("job_identity") or {}
    if "manifest_sha256" in recorded:  # checkpoints written before job identities lack it
        found["manifest_sha256"] = recorded["manifest_sha256"]
        want["manifest_sha256"] = ckpt.file_sha256(job.manifest)
    differ = [f"{k}: {ckpt.show_value(found[k])} in {job.init}, {ckpt.show_value(want[k])} for this job"
              for k in want if found[k] != want[k]]
    if differ:
        raise ckpt.ResumeMismatchError(
            f"init checkpoint {job.init} was written by another run than this job continues "
            f"({'; '.join(differ)}). Rebuild it with this job's settings (delete or move it and rerun "
            "its target), or pass the init checkpoint of this run"
        )


def _find_start(job: PretrainJob, info: DistInfo) -> tuple[int, dict[str, Any] | None, str]:
    """(start iteration, state to load, where it came from)."""
    # up to end_iter: a finished job's final state (mimlib/train/final_state.py)
    found = ckpt.load_rolling(job.resume_dir, info.device, below=job.end_iter + 1, set_aside=info.is_main)
    ckpt.agree_across_ranks(found, info, job.resume_dir)
    if found is not None:
        it, path, state = found
        ckpt.check_resume_identity(state, path, job_identity(job), job.resume_dir)
        return it, state, str(path)
    if job.init is not None:
        state = ckpt.load(job.init, map_location=info.device, require=("model", "iteration"))
        if state["iteration"] > job.end_iter:
            raise ValueError(f"{job.init} is at iteration {state['iteration']}, past this job's end {job.end_iter}")
        check_init(state, job)
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


def share_failed_files(failed: set[str], shared: set[str], info: DistInfo) -> None:
    """Make ``failed`` the union of every rank's unreadable files (in place), so the count is of
    distinct files and rank 0's checkpoints carry all of them; ``shared`` (what every rank
    already holds) is updated. One scalar all-reduce per call, a gather only when a rank met a
    new unreadable file."""
    new = sorted(failed - shared)
    if int(all_reduce_sum(torch.tensor(len(new), device=info.device), info)):
        gathered: list[list[str] | None] = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, new)
        for names in gathered:
            failed.update(names or [])
    shared |= failed


@dataclass(kw_only=True)
class PretrainTraining(TrainTask):
    """SimMIM pre-training in the shared loop: masked-pixel loss, per-interval log, validation
    every ``val_every``, the corrupt-image limit, and the sums the job summary needs."""

    job: PretrainJob
    logger: JsonlLogger
    val_loader: DataLoader | None
    dataset_size: int
    window_start: int  # the summary's train loss is the mean over updates after this one
    tail_losses: list[float] = field(default_factory=list)
    failed_files: set[str] = field(default_factory=set)  # the cell's, since iteration 0 (all ranks')
    shared_failed: set[str] = field(default_factory=set)  # the part every rank already holds
    interval: IntervalLog = field(default_factory=IntervalLog)
    last_val: float | None = None
    trivial_val: float | None = None

    def lr(self, k: int) -> float:
        r = self.recipe
        return step_lr(k, scaled_lr(r["base_lr"], r["global_batch"]), r["warmup_iters"],
                       scaled_lr(r["warmup_lr"], r["global_batch"]), self.job.decay_at, r["decay_ratio"])

    def begin_update(self, k: int) -> None:
        # Drop path draws from the global RNG: seed it per iteration (and rank) so a resumed
        # run or a trunk/branch split draws the same paths as an uninterrupted one.
        torch.manual_seed(stable_seed(self.job.seed, "step", k, self.info.rank))

    def forward(self, train_model: torch.nn.Module, batch: dict[str, Any], k: int, micro: int):
        self.failed_files.update(batch["failed"])
        loss = train_model(batch["image"].to(self.info.device, non_blocking=True),
                           batch["mask"].to(self.info.device, non_blocking=True))
        return loss, loss.detach().double()

    def after_update(self, u: Update) -> dict[str, str] | None:
        r, postfix = self.recipe, None
        self.interval.add(loss=u.losses, grad_norm=u.grad_norm)
        if u.done > self.window_start:
            self.tail_losses.append(float(u.losses))
        self.check_corrupt()
        if u.done % r["log_every"] == 0 or u.done == self.total:
            means = self.interval.means()
            self.logger.log({"iter": u.done, "loss": means["loss"], "lr": u.lr, "grad_norm": means["grad_norm"],
                             "images_per_s": self.interval.rate(r["global_batch"]),
                             "corrupt_images": len(self.failed_files)})
            postfix = {"loss": f"{means['loss']:.4f}", "lr": f"{u.lr:.2e}"}
            self.interval.clear()
        if u.done % r["val_every"] == 0 or u.done == self.total:
            self.evaluate(u.done)
        return postfix

    def check_corrupt(self) -> None:
        if self.info.distributed:  # every rank, every update: the ranks' collectives must pair up
            share_failed_files(self.failed_files, self.shared_failed, self.info)
        n_failed = len(self.failed_files)
        if n_failed > self.recipe["max_corrupt_fraction"] * self.dataset_size:
            raise TooManyCorruptImagesError(
                f"{n_failed} of {self.dataset_size} images in {self.job.manifest} could not be decoded "
                f"(limit max_corrupt_fraction={self.recipe['max_corrupt_fraction']}): "
                + ", ".join(sorted(self.failed_files)[:20])
            )

    def evaluate(self, iteration: int) -> None:
        if self.val_loader is None:
            return
        self.last_val, self.trivial_val = validation_loss(self.model, self.val_loader, self.recipe, self.info)
        self.logger.log({"iter": iteration, "val_loss": self.last_val, "val_trivial_loss": self.trivial_val})

    def save(self, done: int) -> None:
        # What a resumed job needs besides weights: the summary's and the open log interval's sums.
        if self.info.is_main:
            progress_state = {"tail_losses": self.tail_losses, **carried_state(self), **self.interval.state()}
            ckpt.save_rolling(_state(self.model, self.optimizer, done, self.job, **progress_state),
                              self.job.resume_dir, done)

    def should_save(self, done: int) -> bool:
        return done % self.recipe["checkpoint_every"] == 0 and done < self.total

    def stop_message(self, done: int) -> str:
        return f"stopped by SIGTERM after iteration {done}; state saved in {self.resume_dir}"


def carried_state(task: PretrainTraining) -> dict[str, Any]:
    """What every checkpoint of a job carries besides weights and recipe: the job's identity
    (a rolling state is resumed only by the same job; an init checkpoint is checked against the
    job that starts from it) and the cell's unreadable files so far (the next job continues them)."""
    return {"job_identity": job_identity(task.job), "failed_files": sorted(task.failed_files)}


def carried_failed_files(state: dict[str, Any] | None) -> set[str]:
    """The unreadable files a cell met before this job: from its rolling state, or from the
    trunk point it starts from (``job.init``), so ``corrupt_images`` and the
    ``max_corrupt_fraction`` limit count over the whole cell since iteration 0."""
    return set((state or {}).get("failed_files", []))


def run_pretrain(job: PretrainJob, progress: bool = True) -> dict[str, Any]:
    """Run one job to ``job.end_iter``; returns the job summary (also written to metrics_out)."""
    info = init_distributed(job.device)
    r = job.recipe
    if r["threads"]:
        torch.set_num_threads(r["threads"])
    model = build_model(job).to(info.device)
    optimizer = build_optimizer(model, r, info.device)
    start, state, source = _find_start(job, info)
    if start == job.end_iter and Path(source).parent == Path(job.resume_dir):
        return _republish(job, info, Path(source))
    if state is not None:
        model.load_state_dict(state["model"])
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        elif start > 0 and start < job.end_iter:
            raise RuntimeError(f"{source} has no optimizer state; cannot continue training from it")
    logger = JsonlLogger(Path(job.resume_dir) / "metrics.jsonl", enabled=info.is_main,
                         tracker=_tracker(job, info, start))
    logger.truncate_after(start)
    if info.is_main:
        log.info("%s: iterations %d -> %d from %s", job.out, start, job.end_iter, source)
    manifest, root, _ = read_manifest(job.manifest)
    dataset = PretrainDataset(manifest, root, r, job.seed)
    sampler = GlobalBatchSampler(start, job.end_iter, r["global_batch"], r["micro_batch"], info.rank, info.world_size)
    loader = SigtermSafeDataLoader(dataset, batch_sampler=sampler, num_workers=r["num_workers"], collate_fn=collate,
                                   pin_memory=info.device.type == "cuda", persistent_workers=False,
                                   prefetch_factor=4 if r["num_workers"] > 0 else None)
    resumed = state if state is not None and source != str(job.init) else {}  # mid-job: restore the sums
    task = PretrainTraining(
        name=job.model, model=model, optimizer=optimizer, recipe=r, info=info, batches=iter(loader), start=start,
        total=job.end_iter, accum=sampler.accum, resume_dir=job.resume_dir, progress=progress,
        desc=f"{job.model} -> {job.end_iter}", job=job, logger=logger, val_loader=_validation_loader(job, info),
        dataset_size=len(dataset),
        window_start=job.end_iter - max(1, round(r["train_loss_window"] * (job.cell.get("length") or job.end_iter))),
        tail_losses=list(resumed.get("tail_losses", [])), failed_files=carried_failed_files(state),
        interval=IntervalLog(resumed),
    )
    t_job = time.perf_counter()
    train(task)
    if start == job.end_iter:
        task.evaluate(job.end_iter)
    return _finish(job, task, source, time.perf_counter() - t_job)


def _tracker(job: PretrainJob, info: DistInfo, start: int):
    from mimlib.train.tracking import open_tracker

    dataset = job.cell.get("dataset") or Path(job.manifest).stem  # manifests/<dataset>.parquet
    kind = "branch" if job.decay_at is not None else "trunk"
    return open_tracker(job.tracking, log_dir=job.log_dir, state_dir=job.resume_dir, start=start,
                        is_main=info.is_main, recipe=job.recipe, seed=job.seed, group=f"pretrain/{job.model}/{dataset}",
                        tags={"stage": "pretrain", "job": kind, "model": job.model, "dataset": dataset,
                              "length": job.cell.get("length"), "end_iter": job.end_iter})


def _finish(job: PretrainJob, task: PretrainTraining, source: str, wall_time_s: float) -> dict[str, Any]:
    """Write the declared outputs (checkpoint, summary, log), drop the resume state."""
    info = task.info
    tail = task.tail_losses
    summary = {
        **job.cell,
        "model": job.model,
        "iterations": job.end_iter,
        "train_loss": sum(tail) / len(tail) if tail else None,
        "train_loss_window": [task.window_start, job.end_iter],
        "val_loss": task.last_val,
        "val_trivial_loss": task.trivial_val,
        "corrupt_images": len(task.failed_files),
        "wall_time_s": wall_time_s,
        "world_size": info.world_size,
        "recipe_hash": recipe_hash(job.recipe),
        "resumed_from": source,
    }
    if info.is_main:
        task.logger.close()  # its tracking runs are complete
        ckpt.save_atomic(_state(task.model, task.optimizer if job.save_optimizer else None, job.end_iter, job,
                                **carried_state(task)), job.out)
        if job.metrics_out is not None:
            write_json_atomic(summary, job.metrics_out)
        if job.log_out is not None:
            copy_atomic(task.logger.path, job.log_out)
        if job.keep_final:
            _keep_final_state(job, summary)
        else:
            # The job is complete: its rolling checkpoints and work log are no longer needed.
            for _, p in ckpt.rolling_checkpoints(job.resume_dir):
                p.unlink(missing_ok=True)
            task.logger.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                Path(job.resume_dir).rmdir()
    barrier(info)
    return summary


def _keep_final_state(job: PretrainJob, summary: dict[str, Any]) -> None:
    """After the outputs are written: the summary, then the output checkpoint as the rolling
    checkpoint at ``end_iter`` (a hard link), then the older rolling checkpoints go; the work log
    stays. Cut off anywhere, the folder still resumes: from the older checkpoints or the final one."""
    resume_dir = Path(job.resume_dir)
    final_state.write_finished(resume_dir, job.end_iter, summary)
    final_state.link_or_copy(job.out, resume_dir / f"iter_{job.end_iter:09d}.pt")
    for i, p in ckpt.rolling_checkpoints(resume_dir):
        if i < job.end_iter:
            p.unlink(missing_ok=True)


def _republish(job: PretrainJob, info: DistInfo, final: Path) -> dict[str, Any]:
    """The job finished before (its final state at ``end_iter`` passed the resume checks in
    :func:`_find_start`), but its outputs were deleted -- by Snakemake, which never recorded a job
    that completed after Snakemake itself was interrupted: write them again, without training."""
    resume_dir = Path(job.resume_dir)
    summary = final_state.read_finished(resume_dir, job.end_iter)
    if summary is None:
        raise RuntimeError(f"{final} is at this job's end ({job.end_iter}) but {resume_dir / final_state.FINISHED} "
                           "is missing or of another iteration; move the folder away to run the job again")
    if info.is_main:
        final_state.link_or_copy(final, job.out)
        if job.metrics_out is not None:
            write_json_atomic(summary, job.metrics_out)
        if job.log_out is not None:
            copy_atomic(resume_dir / "metrics.jsonl", job.log_out)
        log.info("%s: finished at iteration %d before (final state %s): outputs re-created without training",
                 job.out, job.end_iter, final)
        if not job.keep_final:
            final_state.drop_final_state(resume_dir)
    barrier(info)
    return summary


def job_to_dict(job: PretrainJob) -> dict[str, Any]:
    d = asdict(job)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
