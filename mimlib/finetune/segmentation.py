"""ADE20K semantic segmentation fine-tuning (paper section 2.5, Table 14): UPerNet on SwinV2.

One job = one pre-trained cell (or scratch) fine-tuned for ``iters`` iterations, then
evaluated on the validation split with sliding windows; ``out_dir/metrics.json`` gets
``{"miou", "acc"}`` in percent (as the paper's Table 5 and every other task's scores) plus the
per-class IoU (percent).

Recipe (:data:`DEFAULT_RECIPE`, Table 14 / mmseg's UPerNet-Swin ADE20K config at 640):

* crop 640, window 20 (every stage of a 640 crop tiles with 20), 80K iterations, global
  batch 32 (``micro_batch`` per process, gradient accumulation fills the rest: the global
  batch does not depend on the GPU count);
* AdamW, betas (0.9, 0.999), eps 1e-8, weight decay 0.05 (none on norms, biases and the
  SwinV2 position / scale parameters), layer decay 0.95 (S, B; 0.9 for L through the
  config's per-model overrides) with the reference layer ids (the heads at scale 1);
* ``lr`` is absolute -- the paper searched [1e-4, 3e-4] at batch 32 -- and is *not* rescaled
  when ``global_batch`` changes;
* schedule = mmcv's ``poly`` (power 1.0, min_lr 0: linear to 0 at ``iters``) with a linear
  warmup over ``warmup_iters`` (750) from ``warmup_ratio`` (1e-6) of it, per iteration:
  ``lr_k = lr * (1 - k/iters)`` and during warmup ``lr_k * (1 - (1 - k/warmup) * (1 - ratio))``;
* loss: cross entropy over non-ignored pixels (label 255), averaged per micro-batch over
  its labelled pixels (mmseg's ``avg_non_ignore=True``; older mmseg divided by all pixels,
  a constant factor AdamW barely sees), plus 0.4 x the auxiliary FCN head's;
* augmentation and evaluation: :mod:`mimlib.data.ade20k` (rescale [0.5, 2] of (2560, 640),
  crop with cat_max_ratio 0.75, flip, photometric distortion; test at short side 640 with
  640 windows, stride 426, logits averaged over overlaps).

Everything random at iteration k (which images, their augmentation, drop path, dropout) is
a pure function of (seed, k), so a killed job resumed from its rolling checkpoint
(``job.resume_dir``) continues exactly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mimlib.data.ade20k import IGNORE_INDEX, ADE20KTrain, ADE20KVal, _first, collate_train
from mimlib.data.sampling import GlobalBatchSampler, stable_seed
from mimlib.finetune.common import (
    FINISHED_KEY,
    FinetuneJob,
    ResumableState,
    build_optimizer,
    job_logger,
    write_metrics,
)
from mimlib.models.attention import use_fused_attention
from mimlib.finetune.recipes import SEGMENTATION
from mimlib.finetune.recipes import check_segmentation as check_recipe
from mimlib.models.upernet import ENCODER_PREFIX, SegmentationModel, build_upernet, resize
from mimlib.train import checkpoint as ckpt
from mimlib.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from mimlib.train.loop import IntervalLog, TrainTask, Update, train
from mimlib.train.metrics import JsonlLogger
from mimlib.train.precision import autocast_context
from mimlib.train.preemption import SigtermSafeDataLoader
from mimlib.train.schedule import poly_lr

log = logging.getLogger(__name__)

__all__ = [
    "TASK",
    "DEFAULT_RECIPE",
    "check_recipe",
    "lr_at",
    "seg_loss",
    "slide_inference",
    "ConfusionMatrix",
    "miou_from_confusion",
    "evaluate",
    "build_model",
    "full_recipe",
    "run",
]

TASK = "ade20k"

DEFAULT_RECIPE: dict[str, Any] = SEGMENTATION


def lr_at(k: int, recipe: dict[str, Any]) -> float:
    """mmcv's poly schedule with linear warmup, for iteration ``k`` (0-based)."""
    return poly_lr(k, recipe["lr"], recipe["iters"], recipe["warmup_iters"], recipe["warmup_ratio"],
                   recipe["min_lr"], recipe["lr_power"])


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel cross entropy averaged over labelled pixels (0, not NaN, when none is labelled)."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return total / labels.ne(ignore_index).sum().clamp_min(1)


@torch.no_grad()
def slide_inference(model: nn.Module, image: torch.Tensor, num_classes: int, crop: int, stride: int,
                    batch_size: int = 1, return_count: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C, H, W) of ``image`` (N, 3, H, W) from overlapping ``crop`` windows.

    Windows as mmseg's ``slide_inference``: ``max(H - crop + stride - 1, 0) // stride + 1``
    rows (columns likewise) at ``i * stride``, the last ones pushed back inside the image, so
    every pixel is covered; each pixel's logits are the mean over the windows covering it.
    A window smaller than ``crop`` (image smaller than the crop) is zero-padded at the
    bottom/right -- zero is the mean colour after normalisation -- and the padding's logits
    are dropped. ``batch_size`` windows go through the model at once. With ``return_count``
    also the (H, W) number of windows covering each pixel.
    """
    if image.dim() == 3:
        image = image[None]
    n, _, h, w = image.shape
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    boxes = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * stride + crop, h), min(j * stride + crop, w)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    preds = image.new_zeros((n, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((h, w), dtype=torch.float32)
    for start in range(0, len(boxes), max(1, batch_size)):
        chunk = boxes[start:start + max(1, batch_size)]
        windows = []
        for y1, y2, x1, x2 in chunk:
            win = image[:, :, y1:y2, x1:x2]
            if win.shape[-2:] != (crop, crop):
                win = F.pad(win, (0, crop - win.shape[-1], 0, crop - win.shape[-2]))
            windows.append(win)
        out = model(torch.cat(windows)).float()
        if isinstance(out, (tuple, list)):
            out = out[0]
        for b, (y1, y2, x1, x2) in enumerate(chunk):
            preds[:, :, y1:y2, x1:x2] += out[b * n:(b + 1) * n, :, : y2 - y1, : x2 - x1]
            count[y1:y2, x1:x2] += 1
    if bool((count == 0).any()):  # cannot happen with the window layout above
        raise AssertionError("sliding windows left pixels uncovered")
    preds /= count
    return (preds, count) if return_count else preds


class ConfusionMatrix:
    """Dataset-wide (num_classes x num_classes) counts, rows = ground truth, columns = prediction."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str = "cpu"):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        keep = target != self.ignore_index
        t, p = target[keep].long(), pred[keep].long().to(target.device)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
            raise ValueError(
                f"label {int(t.max())} outside 0..{self.num_classes - 1} (and not {self.ignore_index}): "
                "is num_classes right, and the labels reduced (reduce_zero_label)?"
            )
        c = self.num_classes
        self.mat += torch.bincount(t * c + p, minlength=c * c).view(c, c).to(self.mat.device)


def miou_from_confusion(conf: torch.Tensor) -> dict[str, Any]:
    """mIoU (nanmean over classes of I/U; classes absent from labels and predictions are NaN
    and skipped), pixel accuracy, and the per-class IoU (NaN where undefined), all in percent."""
    conf = torch.as_tensor(conf).double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    # percent, as the paper and the other tasks report scores
    iou = torch.where(union > 0, 100.0 * tp / union.clamp_min(1), torch.full_like(tp, math.nan))
    total = conf.sum()
    return {
        "miou": float(iou.nanmean()) if bool((union > 0).any()) else math.nan,
        "acc": float(100.0 * tp.sum() / total) if total > 0 else math.nan,
        "per_class_iou": [float(x) for x in iou],
    }


def _json_floats(values: Iterable[float]) -> list[float | None]:
    return [None if math.isnan(v) else round(v, 6) for v in values]


@torch.no_grad()
def evaluate(model: SegmentationModel, root: str | Path, recipe: dict[str, Any], info: DistInfo,
             num_workers: int = 0) -> dict[str, Any]:
    """Sliding-window evaluation over the (rank-sharded) validation split, at original resolution."""
    dataset = ADE20KVal(root, recipe, max_images=recipe["max_val_images"])
    shard = torch.utils.data.Subset(dataset, list(range(info.rank, len(dataset), info.world_size)))
    loader = SigtermSafeDataLoader(shard, batch_size=1, num_workers=num_workers, collate_fn=_first)
    was_training = model.training
    model.eval()
    conf = ConfusionMatrix(recipe["num_classes"], device=info.device)
    for item in loader:
        image = item["image"].to(info.device, non_blocking=True)
        label = item["label"].to(info.device, non_blocking=True)
        with autocast_context(recipe, info.device):
            logits = slide_inference(model, image, recipe["num_classes"], recipe["slide_crop"],
                                     recipe["slide_stride"], batch_size=recipe["micro_batch"])
        conf.update(resize(logits, label.shape).argmax(1)[0], label)
    all_reduce_sum(conf.mat, info)
    model.train(was_training)
    return {**miou_from_confusion(conf.mat), "images": len(dataset)}


def full_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """``recipe`` over :data:`DEFAULT_RECIPE` (the config normally passes a complete one)."""
    return {**DEFAULT_RECIPE, **recipe}


def build_model(job: FinetuneJob) -> tuple[SegmentationModel, dict[str, Any]]:
    r = full_recipe(job.recipe)
    torch.manual_seed(stable_seed(job.seed, "init", job.task, job.model))  # same heads on every rank
    model, info = build_upernet(
        job.model, job.checkpoint, r["num_classes"], img_size=r["img_size"], window_size=r["window_size"],
        drop_path=r["drop_path"], channels=r["channels"],
        aux_channels=r["aux_channels"] if r["aux_weight"] else None, dropout=r["dropout"],
        trust_pickle=job.trust_pickle,
    )
    if r["fused_attention"]:
        use_fused_attention(model)
    return model, info


@dataclass(kw_only=True)
class SegmentationTraining(TrainTask):
    """UPerNet training in the shared loop: pixel CE (+ aux), per-interval log, eval_every."""

    job: FinetuneJob
    state: ResumableState
    logger: JsonlLogger
    root: Path
    interval: IntervalLog

    def lr(self, k: int) -> float:
        return lr_at(k, self.recipe)

    def begin_update(self, k: int) -> None:
        # Drop path and dropout draw from the global RNG: seed it per iteration and rank.
        torch.manual_seed(stable_seed(self.job.seed, "step", k, self.info.rank))

    def forward(self, train_model: nn.Module, batch: dict[str, torch.Tensor], k: int, micro: int):
        images = batch["image"].to(self.info.device, non_blocking=True)
        labels = batch["label"].to(self.info.device, non_blocking=True)
        out = train_model(images)
        logits, aux = (out if isinstance(out, tuple) else (out, None))
        main = seg_loss(logits, labels)
        aux_loss = seg_loss(aux, labels) if aux is not None else torch.zeros((), device=self.info.device)
        loss = main + float(self.recipe["aux_weight"] or 0.0) * aux_loss
        return loss, torch.stack([main.detach().double(), aux_loss.detach().double()])

    def after_update(self, u: Update) -> dict[str, str] | None:
        r, postfix = self.recipe, None
        self.interval.add(loss=u.losses[0], aux_loss=u.losses[1], grad_norm=u.grad_norm)
        if u.done % r["log_every"] == 0 or u.done == r["iters"]:
            means = self.interval.means()
            self.logger.log({"iter": u.done, **means, "lr": u.lr, "images_per_s": self.interval.rate(r["global_batch"])})
            postfix = {"loss": f"{means['loss']:.4f}", "lr": f"{u.lr:.2e}"}
            self.interval.clear()
        if r["eval_every"] and u.done % r["eval_every"] == 0 and u.done < r["iters"]:
            self.evaluate(u.done)
        return postfix

    def evaluate(self, done: int) -> dict[str, Any]:
        result = evaluate(self.model, self.root, self.recipe, self.info, num_workers=min(int(self.recipe["num_workers"]), 2))
        self.logger.log({"iter": done, "val_miou": result["miou"], "val_acc": result["acc"]})
        return result

    def save(self, done: int) -> None:
        self.state.save(done, self.model, self.optimizer, self.interval.state())

    def should_save(self, done: int) -> bool:
        every = self.recipe["checkpoint_every"]
        return bool(every) and done % every == 0 and done < self.recipe["iters"]


def run(job: FinetuneJob, progress: bool = True) -> dict[str, Any]:
    """Fine-tune, evaluate, write ``out_dir/metrics.json`` (and the log); return the record."""
    started = time.time()
    r = check_recipe(job.recipe)
    info = init_distributed(job.device)
    if r["threads"]:
        torch.set_num_threads(int(r["threads"]))
    model, load_info = build_model(job)
    if info.distributed and r["sync_bn"]:
        if info.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif info.is_main:  # PyTorch's SyncBatchNorm refuses CPU tensors (gloo ranks)
            log.warning("sync_bn: SyncBatchNorm needs GPUs; on CPU each rank keeps its own BN statistics")
    model.to(info.device)
    optimizer = build_optimizer(model, r, info.device, ENCODER_PREFIX, job.model)
    state = ResumableState(job, info)
    start, extra = state.load(model, optimizer)
    if FINISHED_KEY in extra:  # finished before; only its outputs are gone
        return state.republish(extra)
    if info.is_main:
        log.info("%s %s: iterations %d -> %d (encoder: %s)", TASK, job.model, start, r["iters"], load_info["format"])
    root = Path(job.data["root"])
    sampler = GlobalBatchSampler(start, r["iters"], r["global_batch"], r["micro_batch"], info.rank, info.world_size)
    loader = SigtermSafeDataLoader(
        ADE20KTrain(root, r, job.seed, max_images=r["max_train_images"]), batch_sampler=sampler,
        num_workers=r["num_workers"], collate_fn=collate_train, pin_memory=info.device.type == "cuda",
        prefetch_factor=4 if r["num_workers"] > 0 else None,
    )
    task = SegmentationTraining(
        name=f"{TASK} {job.model}", model=model, optimizer=optimizer, recipe=r, info=info, batches=iter(loader),
        start=start, total=r["iters"], accum=sampler.accum, resume_dir=job.resume_dir, progress=progress, job=job,
        state=state, logger=job_logger(job, info, start, key="iter"), root=root,
        interval=IntervalLog(extra),  # the open log interval travels in the resume state
    )
    train(task)
    last_eval = task.evaluate(r["iters"])
    record = write_metrics(job, info, {"miou": last_eval["miou"], "acc": last_eval["acc"]}, started,
                           per_class_iou=_json_floats(last_eval["per_class_iou"]), eval_images=last_eval["images"],
                           iterations=r["iters"], encoder=load_info)
    task.logger.close()
    if info.is_main and r["save_weights"]:
        ckpt.save_atomic({"model": model.state_dict(), "model_name": job.model, "task": TASK,
                          "recipe": job.recipe}, Path(job.out_dir) / "last.pt")
    state.set_final(r["iters"], record)
    state.finish()
    barrier(info)
    return record
