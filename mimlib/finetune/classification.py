"""Classification fine-tuning (ImageNet-1K, Table 11; iNaturalist 2018, Table 12): one engine.

A SwinV2 at the task size (224 px, window 14 in the paper) is initialised from a SimMIM cell
checkpoint (or from scratch), given timm's own classifier head (``head.fc``, a Linear after
global average pooling, initialised as timm / the reference do: truncated normal std 0.02,
zero bias) and trained with the reference recipe: AdamW over reference layer-decay groups,
cosine schedule with linear warmup stepped per optimiser update, RandAugment + random
erasing, Mixup/CutMix with label smoothing, drop path, gradient clipping, bf16 autocast on GPU.

Learning rates are given per 512 images and scaled linearly with the global batch, as the
reference does (``lr * batch / 512`` for the base, warmup and minimum lr). The paper's
"5e-3 at batch 2048" is ``base_lr=1.25e-3``; warmup and minimum lr are 2.5e-7 per 512
(microsoft/Swin-Transformer ``configs/simmim/simmim_finetune__swinv2_base__img224_window14``;
the paper does not give them). timm's ``CosineLRScheduler`` gives the lr of update ``k``
with ``warmup_prefix=True`` (cosine over the updates after warmup, as the reference's
``build_scheduler`` does).

Determinism: the epoch's sample order is a permutation seeded by ``(seed, epoch)``, each
sample's augmentation by ``(seed, epoch, index)`` (see :mod:`mimlib.data.classification`),
and Mixup / drop path by ``(seed, epoch, update, micro-step, rank)``, so on CPU a killed job
resumed from its rolling checkpoint ends with the same weights and log as an uninterrupted
one. The global batch is ``micro_batch x world_size x accumulation`` and does not depend on
the number of ranks. Accuracy is in percent, over the whole val split (summed across ranks).

Outputs in ``job.out_dir``: ``metrics.json`` (best-epoch top-1 and its top-5, last top-1),
``log.jsonl`` (one record per epoch), ``best.pt`` and ``last.pt`` (model weights only:
``{"model", "model_name", "task", "epoch", "top1", "num_classes", "recipe"}``). While the
job runs, its log, rolling checkpoints and the current best weights live in
``job.resume_dir`` (published at the end), so a failed job's partial outputs never mislead.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from mimlib.data.classification import (
    ClassificationDataset,
    build_eval_transform,
    build_train_transform,
    load_classification_splits,
)
from mimlib.data.sampling import EpochOrder, GlobalBatchSampler, accumulation_steps, stable_seed
from mimlib.finetune.common import (
    FINISHED_KEY,
    FinetuneJob,
    ResumableState,
    build_optimizer,
    job_logger,
    write_metrics,
)
from mimlib.finetune.recipes import CLASSIFICATION, mixup_active
from mimlib.finetune.recipes import check_classification as check_recipe
from mimlib.models.attention import use_fused_attention
from mimlib.models.pretrained import build_finetune_encoder
from mimlib.train import checkpoint as ckpt
from mimlib.train.metrics import copy_atomic
from mimlib.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from mimlib.train.loop import TrainTask, Update, train
from mimlib.train.metrics import JsonlLogger
from mimlib.train.precision import autocast_context
from mimlib.train.preemption import SigtermSafeDataLoader
from mimlib.train.schedule import cosine_lr, scaled_lr
from mimlib.train.step import NonFiniteLossError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RECIPE",
    "KNOWN_KEYS",
    "batch_sampler",
    "NonFiniteLossError",
    "check_recipe",
    "lr_schedule",
    "evaluate",
    "run",
]

#: Table 11 (ImageNet-1K, SwinV2-S). iNat-18 (Table 12) differs in base_lr (1.6e-2 at 2048
#: = 4e-3 per 512) and weight_decay (0.1); per-model layer decay (S/B/L 0.8/0.75/0.7;
#: H/g 0.65 and 50/10 epochs on IN-1K) comes from the config.
DEFAULT_RECIPE: dict[str, Any] = CLASSIFICATION
KNOWN_KEYS: set[str] = set(DEFAULT_RECIPE)


def lr_schedule(r: dict[str, Any], updates_per_epoch: int) -> Callable[[int], float]:
    """lr (before layer-decay scaling) of optimiser update ``k``: warmup then cosine per
    update, every lr scaled per 512 images (:func:`mimlib.train.schedule.cosine_lr`)."""
    g = r["global_batch"]
    return functools.partial(
        cosine_lr,
        base_lr=scaled_lr(r["base_lr"], g),
        total=r["epochs"] * updates_per_epoch,
        warmup=round(r["warmup_epochs"] * updates_per_epoch),  # fractional warmup epochs allowed
        warmup_lr=scaled_lr(r["warmup_lr"], g),
        min_lr=scaled_lr(r["min_lr"], g),
    )


def batch_sampler(num_samples: int, start: int, end: int, global_batch: int, micro_batch: int, rank: int,
                  world_size: int, seed: int) -> GlobalBatchSampler:
    """This rank's micro-batches of ``(index, epoch)`` keys for updates [start, end): epoch e's
    order is a permutation seeded by ``(seed, e)``, its last incomplete global batch dropped."""
    order = EpochOrder(num_samples, global_batch, seed, "ft-order")
    return GlobalBatchSampler(start, end, global_batch, micro_batch, rank, world_size,
                              key=lambda k, s: (order(k, s), order.epoch(k)))


def _seed_step(*parts: Any) -> None:
    s = stable_seed(*parts)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, r: dict[str, Any], info: DistInfo) -> tuple[float, float, float]:
    """(top-1 %, top-5 %, mean CE loss) over the val split, summed across ranks."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=info.device)  # correct1, correct5, loss, n
    for images, labels in loader:
        images = images.to(info.device, non_blocking=True)
        labels = labels.to(info.device, non_blocking=True)
        with autocast_context(r, info.device):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(labels[:, None])
        totals[0] += hit[:, :1].sum()
        totals[1] += hit.any(dim=1).sum()
        totals[2] += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        totals[3] += labels.numel()
    all_reduce_sum(totals, info)
    model.train(was_training)
    n = max(float(totals[3]), 1.0)
    return 100.0 * float(totals[0]) / n, 100.0 * float(totals[1]) / n, float(totals[2]) / n


def _weights(model: nn.Module, job: FinetuneJob, r: dict[str, Any], epoch: int, top1: float, num_classes: int) -> dict:
    return {"model": model.state_dict(), "model_name": job.model, "task": job.task, "epoch": epoch,
            "top1": top1, "num_classes": num_classes, "recipe": job.recipe}


def _mixup_and_criterion(r: dict[str, Any], num_classes: int) -> tuple[Callable | None, nn.Module]:
    """timm's Mixup/CutMix with its soft-target loss, or plain (label-smoothed) cross entropy."""
    if not mixup_active(r):
        return None, nn.CrossEntropyLoss(label_smoothing=r["label_smoothing"])
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    mixup_fn = Mixup(mixup_alpha=r["mixup"], cutmix_alpha=r["cutmix"], prob=r["mixup_prob"],
                     switch_prob=r["mixup_switch_prob"], mode="batch",
                     label_smoothing=r["label_smoothing"], num_classes=num_classes)
    return mixup_fn, SoftTargetCrossEntropy()


@dataclass(kw_only=True)
class ClassificationTraining(TrainTask):
    """Classification in the shared loop: updates counted across epochs; at each epoch's end
    the val split is evaluated, the epoch logged and the best weights kept."""

    job: FinetuneJob
    state: ResumableState
    logger: JsonlLogger
    updates: int  # per epoch
    schedule: Callable[[int], float]  # lr_schedule(recipe, updates)
    val_loader: Any
    num_classes: int
    mixup_fn: Callable | None
    criterion: nn.Module
    best: dict[str, Any]  # best_top1, best_top5, best_epoch, last_top1 (resumed with the state)
    epoch_loss: float = 0.0  # summed over this epoch's updates (a mid-epoch resume continues it)
    epoch_grad_norm: float = 0.0  # likewise
    epoch_first: int = 0  # first update of this epoch run by this job (for images/s)
    epoch_t0: float = field(default_factory=time.perf_counter)

    @property
    def work_best(self) -> Path:
        return Path(self.job.resume_dir) / "best.pt"

    def lr(self, k: int) -> float:
        return self.schedule(k)

    def forward(self, train_model: nn.Module, batch: Any, k: int, micro: int):
        images, labels = batch
        # Mixup (NumPy) and drop path (torch) draw from global generators: seed them per
        # micro-step so the run does not depend on where it was resumed.
        _seed_step(self.job.seed, "ft-step", *divmod(k, self.updates), micro, self.info.rank)
        images = images.to(self.info.device, non_blocking=True)
        labels = labels.to(self.info.device, non_blocking=True)
        targets = labels
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, labels)
        loss = self.criterion(train_model(images), targets)
        return loss, loss.detach().double()

    def after_update(self, u: Update) -> dict[str, str] | None:
        self.epoch_loss += float(u.losses)
        self.epoch_grad_norm += float(u.grad_norm)
        epoch, at = divmod(u.done, self.updates)
        if at:  # mid-epoch
            return {"loss": f"{float(u.losses):.4f}", "lr": f"{u.lr:.2e}"} if at % self.recipe["log_every"] == 0 else None
        r, best = self.recipe, self.best
        train_time = time.perf_counter() - self.epoch_t0
        top1, top5, val_loss = evaluate(self.model, self.val_loader, r, self.info)
        best["last_top1"] = top1
        if top1 > best["best_top1"]:
            best.update(best_top1=top1, best_top5=top5, best_epoch=epoch)
            if self.info.is_main:
                ckpt.save_atomic(_weights(self.model, self.job, r, epoch, top1, self.num_classes), self.work_best)
        self.logger.log({"iter": u.done, "epoch": epoch, "train_loss": self.epoch_loss / self.updates, "lr": u.lr,
                         "grad_norm": self.epoch_grad_norm / self.updates, "top1": top1, "top5": top5,
                         "val_loss": val_loss,
                         "images_per_s": (self.updates - self.epoch_first) * r["global_batch"] / max(train_time, 1e-9)})
        self.epoch_loss, self.epoch_grad_norm, self.epoch_first, self.epoch_t0 = 0.0, 0.0, 0, time.perf_counter()
        return {"loss": f"{float(u.losses):.4f}", "top1": f"{top1:.2f}", "best": f"{best['best_top1']:.2f}"}

    def save(self, done: int) -> None:
        # after every epoch; SIGTERM saves mid-epoch too, with the epoch's loss sum
        self.state.save(done, self.model, self.optimizer,
                        {**self.best, **({"epoch_loss": self.epoch_loss, "epoch_grad_norm": self.epoch_grad_norm}
                                         if done % self.updates else {})})

    def should_save(self, done: int) -> bool:
        return done % self.updates == 0 and done < self.total

    def where(self, k: int) -> str:
        return "epoch {} (0-based), update {} of {}".format(*divmod(k, self.updates), self.updates)

    def stop_message(self, done: int) -> str:
        e, at = divmod(done, self.updates)
        where = f"update {at} of {self.updates} in epoch {e + 1}" if at else f"epoch {e}"
        return f"{self.job.task} {self.job.model}: stopped by SIGTERM after {where}; state saved in {self.resume_dir}"


def run(job: FinetuneJob, progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``job`` to ``recipe['epochs']`` (resuming from ``job.resume_dir`` if a rolling
    checkpoint is there); returns the ``metrics.json`` record."""
    started = time.time()
    r = check_recipe(job.recipe)
    info = init_distributed(job.device)
    accum = accumulation_steps(r["global_batch"], r["micro_batch"], info.world_size)
    if r["threads"]:
        torch.set_num_threads(int(r["threads"]))
    splits = load_classification_splits(job.data)
    # Same initial weights (the head; everything for scratch) on every rank and every resume.
    torch.manual_seed(stable_seed(job.seed, "ft-init", job.task, job.model))
    model, init_info = build_finetune_encoder(job.model, job.checkpoint, r["img_size"], r["window_size"],
                                              r["drop_path"], trust_pickle=job.trust_pickle,
                                              num_classes=splits.num_classes)
    if r["fused_attention"]:
        use_fused_attention(model)
    model.to(info.device)
    optimizer = build_optimizer(model, {**r, "lr": 0.0}, info.device, "", job.model)
    state = ResumableState(job, info)
    start, extra = state.load(model, optimizer)  # counted in updates: SIGTERM can stop mid-epoch
    if FINISHED_KEY in extra:  # finished before; only its outputs are gone
        return state.republish(extra)
    train_set = ClassificationDataset(splits.train, build_train_transform(r), seed=job.seed)
    updates = len(train_set) // r["global_batch"]  # per epoch
    sampler = batch_sampler(len(train_set), start, r["epochs"] * updates, r["global_batch"], r["micro_batch"],
                            info.rank, info.world_size, job.seed)
    pin = info.device.type == "cuda"
    loader = SigtermSafeDataLoader(train_set, batch_sampler=sampler, num_workers=r["num_workers"], pin_memory=pin,
                                   persistent_workers=False, prefetch_factor=4 if r["num_workers"] > 0 else None)
    start_epoch, start_update = divmod(start, updates)
    logger = job_logger(job, info, start_epoch, key="epoch", step=start_epoch * updates)
    if info.is_main:
        log.info("%s/%s: epoch %d update %d -> %d epochs (%s init)", job.task, job.model, start_epoch, start_update,
                 r["epochs"], init_info["format"])
    val_set = ClassificationDataset(splits.val, build_eval_transform(r), seed=job.seed)
    val_loader = SigtermSafeDataLoader(Subset(val_set, list(range(info.rank, len(val_set), info.world_size))),
                                       batch_size=r["micro_batch"], num_workers=min(r["num_workers"], 4), pin_memory=pin)

    mixup_fn, criterion = _mixup_and_criterion(r, splits.num_classes)
    best = {"best_top1": float(extra.get("best_top1", -1.0)), "best_top5": float(extra.get("best_top5", 0.0)),
            "best_epoch": int(extra.get("best_epoch", 0)), "last_top1": extra.get("last_top1")}
    task = ClassificationTraining(
        name=f"{job.task}/{job.model}", model=model, optimizer=optimizer, recipe=r, info=info,
        batches=iter(loader), start=start, total=r["epochs"] * updates, accum=accum, resume_dir=job.resume_dir,
        progress=progress, desc=f"{job.task} {job.model} {'scratch' if job.checkpoint is None else 'ft'}",
        job=job, state=state, logger=logger, updates=updates, val_loader=val_loader, num_classes=splits.num_classes,
        mixup_fn=mixup_fn, criterion=criterion, best=best, schedule=lr_schedule(r, updates),
        epoch_loss=float(extra.get("epoch_loss", 0.0)) if start_update else 0.0,
        epoch_grad_norm=float(extra.get("epoch_grad_norm", 0.0)) if start_update else 0.0, epoch_first=start_update,
    )
    train(task)
    return _finish(job, info, task, started, init_info, splits.classes_without_val_images)


def _finish(job: FinetuneJob, info: DistInfo, task: ClassificationTraining, started: float,
            init_info: dict[str, Any], classes_without_val_images: list[Any]) -> dict[str, Any]:
    """Publish last.pt and the best epoch's best.pt, write metrics.json, drop the resume state."""
    r, best, out_dir = task.recipe, task.best, Path(job.out_dir)
    if info.is_main:
        ckpt.save_atomic(_weights(task.model, job, r, r["epochs"], float(best["last_top1"]), task.num_classes),
                         out_dir / "last.pt")
        if task.work_best.exists():
            copy_atomic(task.work_best, out_dir / "best.pt")
        elif not (out_dir / "best.pt").exists():
            raise RuntimeError(f"the best epoch's weights are neither in {task.work_best} nor in {out_dir / 'best.pt'}")
    metrics = {"top1": best["best_top1"], "top5": best["best_top5"], "top1_last": float(best["last_top1"]),
               "best_epoch": best["best_epoch"]}
    # A train class without val images is not evaluated (a warning in the log); kept here too.
    record = write_metrics(job, info, metrics, started, epochs=r["epochs"], num_classes=task.num_classes,
                           init=init_info.get("format"), classes_without_val_images=list(classes_without_val_images))
    if info.is_main:
        task.logger.close()
        task.work_best.unlink(missing_ok=True)
        task.state.set_final(task.total, record)
        task.state.finish()
    barrier(info)
    return record
