"""COCO detection + instance segmentation fine-tuning: Mask R-CNN on SwinV2 (paper Table 13).

Task ``coco``. ``job.data`` = ``{"train_images", "train_json", "val_images", "val_json"}``
(:func:`mimlib.data.coco.coco_paths` builds it from a COCO 2017 folder).

Recipe (:data:`DEFAULT_RECIPE`, Table 13 at paper scale):

* crop 1024 (large-scale jitter [0.1, 2.0], flip 0.5), window 14, test resize (800, 1333);
* AdamW (0.9, 0.999), eps 1e-8, wd 0.05 (none on 1-D params, biases and position-bias
  tables); ``lr`` 8e-5 is the *absolute* peak lr at the recipe's ``global_batch`` 32 -- it is
  not rescaled when ``global_batch`` changes (the reference, mmdetection, does not scale
  either); set both together;
* 36 epochs, linear warmup over 500 iterations from ``lr * warmup_ratio`` (mmdetection's
  0.001), then x0.1 at epochs 27 and 33 -- all per iteration, an epoch being
  ``len(train) // global_batch`` iterations;
* drop path 0.1 (S/B; L uses 0.2 through the config's per-model override);
* ``layer_decay`` 1.0: Table 13 lists no layer decay for COCO (Table 14 does for ADE20K), so
  every parameter gets the same lr; the groups still carry the reference layer ids;
* no gradient clipping (Table 13 lists none).

The detector's own sizes (FPN 256 channels, 2-fc box head 1024, 4-conv mask head 256, RPN
2000 -> 1000 proposals, 512 RoIs per image, ...) are recipe keys so the CPU demo can shrink
them.

The loop is iteration-based: iteration k of epoch e = k // epoch_iters draws the global batch
slots ``[(k % epoch_iters) * B, ...)`` of a permutation of the training images seeded by
(seed, e); the augmentation of slot s is seeded by (seed, k, s), and the global RNG (drop
path, RPN / RoI sampling) is re-seeded per iteration and rank. Micro-batches of
``micro_batch`` images accumulate to ``global_batch`` over all ranks. A job resumes from its
newest rolling checkpoint (every ``checkpoint_every`` iterations and after the last one, so a
job that fails in evaluation does not train again). At the end the model is
evaluated on the validation set (sharded over ranks, gathered on rank 0): COCO box and mask
AP by :func:`coco_evaluate`; predictions go to ``out_dir/predictions.json.gz``.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mimlib.data.coco import CocoInstances, collate
from mimlib.data.sampling import EpochOrder, GlobalBatchSampler, stable_seed
from mimlib.finetune.common import (
    FINISHED_KEY,
    FinetuneJob,
    ResumableState,
    build_optimizer,
    job_logger,
    write_metrics,
)
from mimlib.finetune.recipes import DETECTION
from mimlib.finetune.recipes import check_detection as check_recipe
from mimlib.models.detection import ENCODER_PREFIX, build_mask_rcnn
from mimlib.train import checkpoint as ckpt
from mimlib.train.distributed import DistInfo, barrier, init_distributed
from mimlib.train.loop import IntervalLog, TrainTask, Update, train
from mimlib.train.metrics import JsonlLogger
from mimlib.train.precision import autocast_context
from mimlib.train.preemption import SigtermSafeDataLoader
from mimlib.train.schedule import multistep_lr

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RECIPE",
    "METRIC_NAMES",
    "batch_sampler",
    "build_model",
    "check_recipe",
    "coco_evaluate",
    "detection_lr",
    "outputs_to_coco",
    "predict",
    "run",
]

DEFAULT_RECIPE: dict[str, Any] = DETECTION

METRIC_NAMES = ("ap", "ap50", "ap75", "aps", "apm", "apl")


def detection_lr(iteration: int, recipe: Mapping[str, Any], epoch_iters: int) -> float:
    """lr of the optimiser step of ``iteration`` (0-based): linear warmup, then steps."""
    return multistep_lr(iteration, recipe["lr"], recipe["warmup_iters"], recipe["warmup_ratio"],
                        [e * epoch_iters for e in recipe["step_epochs"]], recipe["step_ratio"])


def batch_sampler(num_images: int, start: int, end: int, global_batch: int, micro_batch: int, seed: int,
                  rank: int = 0, world_size: int = 1) -> GlobalBatchSampler:
    """This rank's micro-batches of (dataset index, augmentation seed) for iterations [start, end):
    global slot s of iteration k is image ``perm_e[(k % epoch_iters) * B + s]`` (perm_e a
    permutation seeded by (seed, epoch e)), augmented with a seed of (seed, k, s)."""
    order = EpochOrder(num_images, global_batch, seed, "coco-order", what="COCO training set")
    return GlobalBatchSampler(start, end, global_batch, micro_batch, rank, world_size,
                              key=lambda k, s: (order(k, s), stable_seed(seed, "coco-aug", k, s)))


def build_model(job: FinetuneJob, num_classes: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The job's Mask R-CNN (recipe defaults filled in), seeded by (seed, model)."""
    r = {**DEFAULT_RECIPE, **job.recipe}
    torch.manual_seed(stable_seed(job.seed, "init", job.model, "coco"))
    return build_mask_rcnn(
        job.model, job.checkpoint, num_classes,
        img_size=r["img_size"], window_size=r["window_size"], drop_path=r["drop_path"],
        min_size=r["test_size"][0], max_size=r["test_size"][1],
        fpn_channels=r["fpn_channels"], representation_size=r["representation_size"],
        mask_head_channels=r["mask_head_channels"], mask_head_convs=r["mask_head_convs"],
        rpn_batch_size_per_image=r["rpn_batch_size_per_image"],
        rpn_pre_nms_top_n_train=r["rpn_pre_nms_top_n_train"], rpn_post_nms_top_n_train=r["rpn_post_nms_top_n_train"],
        rpn_pre_nms_top_n_test=r["rpn_pre_nms_top_n_test"], rpn_post_nms_top_n_test=r["rpn_post_nms_top_n_test"],
        box_batch_size_per_image=r["box_batch_size_per_image"], box_detections_per_img=r["box_detections_per_img"],
        box_score_thresh=r["box_score_thresh"], anchor_sizes=r["anchor_sizes"],
        fused_attention=r["fused_attention"], grad_checkpointing=r["grad_checkpointing"],
        trust_pickle=job.trust_pickle,
    )


# ----------------------------------------------------------------------------- evaluation


def outputs_to_coco(outputs: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int],
                    label_to_cat: Mapping[int, int], mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """torchvision detector outputs (original image size) -> COCO result dicts.

    ``bbox`` is [x, y, w, h]; ``segmentation`` a compressed RLE with ``counts`` as str.
    """
    from pycocotools import mask as mask_utils

    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
        scores = out["scores"].float().cpu().tolist()
        labels = out["labels"].cpu().tolist()
        rles = None
        if "masks" in out:
            binary = (out["masks"][:, 0] > mask_threshold).to(torch.uint8).cpu().numpy()
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            det = {"image_id": int(image_id), "category_id": int(label_to_cat[int(label)]),
                   "bbox": [round(float(v), 3) for v in box], "score": round(float(score), 5)}
            if rles is not None:
                rle = rles[i]
                det["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
            results.append(det)
    return results


def _coco_api(backend: str):
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def coco_evaluate(gt_json: str | Path | Mapping[str, Any], predictions: Sequence[Mapping[str, Any]],
                  backend: str = "pycocotools", iou_types: Sequence[str] = ("bbox", "segm"),
                  image_ids: Sequence[int] | None = None) -> dict[str, float | None]:
    """COCO AP of ``predictions`` (COCO result dicts) against the ground-truth json.

    Returns ``box_ap, box_ap50, box_ap75, box_aps, box_apm, box_apl`` and the same with
    ``mask_`` in percent (COCOeval's stats x 100); None where the ground truth has no object
    of that size range (COCOeval's -1). Mask AP uses the mask area for the size ranges (the
    box is dropped from the segm results, as detectron2 does). Images without predictions
    count as misses; no predictions at all gives 0. ``image_ids`` restricts the evaluation to
    those images (e.g. a ``max_val_images`` subset); default all images of the json.
    """
    COCO, COCOeval = _coco_api(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(gt_json, Mapping):
            gt = COCO()
            gt.dataset = json.loads(json.dumps(gt_json))
            gt.createIndex()
        else:
            gt = COCO(str(gt_json))
    metrics: dict[str, float | None] = {}
    for iou_type in iou_types:
        prefix = "box" if iou_type == "bbox" else "mask"
        if iou_type == "bbox":
            dets = [{k: v for k, v in p.items() if k != "segmentation"} for p in predictions]
        else:
            dets = [{k: v for k, v in p.items() if k != "bbox"} for p in predictions if "segmentation" in p]
        if not dets:
            metrics.update({f"{prefix}_{n}": v for n, v in _empty_stats(gt, image_ids).items()})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes([dict(d) for d in dets])
            ev = COCOeval(gt, dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = sorted(int(i) for i in image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = [float(s) for s in ev.stats[:6]]
        for name, value in zip(METRIC_NAMES, stats):
            metrics[f"{prefix}_{name}"] = None if value < 0 else 100.0 * value
    return metrics


def _empty_stats(gt: Any, image_ids: Sequence[int] | None = None) -> dict[str, float | None]:
    """What COCOeval reports for no detections: 0, or None for a size range without objects."""
    keep = None if image_ids is None else {int(i) for i in image_ids}
    areas = [a["area"] for a in gt.dataset.get("annotations", [])
             if not a.get("iscrowd", 0) and (keep is None or a["image_id"] in keep)]
    present = {"aps": any(a < 32**2 for a in areas), "apm": any(32**2 <= a < 96**2 for a in areas),
               "apl": any(a >= 96**2 for a in areas)}
    return {n: (0.0 if present.get(n, bool(areas)) else None) for n in METRIC_NAMES}


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: CocoInstances, recipe: Mapping[str, Any], info: DistInfo,
            num_workers: int = 0) -> list[dict[str, Any]]:
    """COCO results of this rank's shard of ``dataset`` (every ``world_size``-th image)."""
    was_training = model.training
    model.eval()
    shard = list(range(info.rank, len(dataset), info.world_size))
    loader = SigtermSafeDataLoader(torch.utils.data.Subset(dataset, shard), batch_size=recipe["eval_batch"],
                                   num_workers=num_workers, collate_fn=collate)
    results: list[dict[str, Any]] = []
    for images, targets in loader:
        images = [im.to(info.device, non_blocking=True).float().div_(255) for im in images]
        with autocast_context(recipe, info.device):
            outputs = model(images)
        ids = [int(t["image_id"]) for t in targets]
        results += outputs_to_coco(outputs, ids, dataset.label_to_cat)
    model.train(was_training)
    return results


def _gather(results: list[dict[str, Any]], info: DistInfo) -> list[dict[str, Any]]:
    if not info.distributed:
        return results
    import torch.distributed as dist

    parts: list[Any] = [None] * info.world_size
    dist.all_gather_object(parts, results)
    return [r for part in parts for r in part] if info.is_main else []


def _broadcast(obj: Any, info: DistInfo) -> Any:
    if not info.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_predictions(results: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with gzip.open(tmp, "wt") as f:
        json.dump(results, f)
    tmp.replace(path)


# ----------------------------------------------------------------------------- training


def _to_device(images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], device: torch.device):
    images = [im.to(device, non_blocking=True).float().div_(255) for im in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


@dataclass(kw_only=True)
class DetectionTraining(TrainTask):
    """Mask R-CNN training in the shared loop: torchvision's losses, a per-interval log."""

    job: FinetuneJob
    state: ResumableState
    logger: JsonlLogger
    epoch_iters: int
    interval: IntervalLog

    def lr(self, k: int) -> float:
        return detection_lr(k, self.recipe, self.epoch_iters)

    def begin_update(self, k: int) -> None:
        # drop path and the RPN / RoI sampling draw from the global RNG: seed it per iteration and rank
        torch.manual_seed(stable_seed(self.job.seed, "coco-step", k, self.info.rank))

    def forward(self, train_model: torch.nn.Module, batch: Any, k: int, micro: int):
        losses = train_model(*_to_device(*batch, self.info.device))
        loss = sum(losses.values())
        return loss, torch.stack([loss.detach().double(), *(losses[n].detach().double() for n in _LOSS_NAMES)])

    def after_update(self, u: Update) -> dict[str, str] | None:
        self.interval.add(**dict(zip(("loss",) + _LOSS_NAMES, u.losses.tolist())), grad_norm=u.grad_norm)
        if u.done % self.recipe["log_every"] and u.done != self.total:
            return None
        record = {"iter": u.done, "epoch": u.done / self.epoch_iters, "lr": u.lr, **self.interval.means(),
                  "images_per_s": self.interval.rate(self.recipe["global_batch"])}
        self.logger.log(record)
        self.interval.clear()
        return {"loss": f"{record['loss']:.3f}", "lr": f"{u.lr:.2e}"}

    def save(self, done: int) -> None:
        self.state.save(done, self.model, self.optimizer, self.interval.state())

    def should_save(self, done: int) -> bool:
        # also at the end: a job that fails in evaluation resumes straight to it
        return done % self.recipe["checkpoint_every"] == 0 or done == self.total


def run(job: FinetuneJob, progress: bool = True) -> dict[str, Any]:
    """Fine-tune Mask R-CNN on COCO (or its demo) and evaluate; returns the metrics record."""
    started = time.time()
    r = check_recipe(job.recipe)
    info = init_distributed(job.device)
    if r["threads"]:
        torch.set_num_threads(int(r["threads"]))
    data = job.data
    train_set = CocoInstances(data["train_images"], data["train_json"], train=True, crop_size=r["img_size"],
                              scale_range=r["scale_jitter"], hflip=r["hflip"], max_images=r["max_train_images"])
    val_set = CocoInstances(data["val_images"], data["val_json"], train=False, with_masks=False,
                            max_images=r["max_val_images"])
    if val_set.cat_ids != train_set.cat_ids:
        raise ValueError(f"train and val categories differ: {train_set.cat_ids} vs {val_set.cat_ids}")
    model, load_info = build_model(job, train_set.num_classes)
    model.to(info.device)
    optimizer = build_optimizer(model, r, info.device, ENCODER_PREFIX, job.model)
    state = ResumableState(job, info)
    start, extra = state.load(model, optimizer)
    if FINISHED_KEY in extra:  # finished before; only its outputs are gone
        return state.republish(extra)
    epoch_iters = len(train_set) // r["global_batch"]
    total = r["epochs"] * epoch_iters
    sampler = batch_sampler(len(train_set), start, max(total, start), r["global_batch"], r["micro_batch"],
                            job.seed, info.rank, info.world_size)
    loader = SigtermSafeDataLoader(train_set, batch_sampler=sampler, num_workers=r["num_workers"], collate_fn=collate,
                                   pin_memory=info.device.type == "cuda", persistent_workers=False,
                                   prefetch_factor=2 if r["num_workers"] > 0 else None)
    logger = job_logger(job, info, start, key="iter")
    if info.is_main:
        log.info("coco %s: iterations %d -> %d (%d per epoch), encoder %s", job.model, start, total, epoch_iters,
                 load_info.get("format"))
    train(DetectionTraining(
        name=f"coco {job.model}", model=model, optimizer=optimizer, recipe=r, info=info, batches=iter(loader),
        start=start, total=total, accum=sampler.accum, resume_dir=job.resume_dir, progress=progress, job=job,
        state=state, logger=logger, epoch_iters=epoch_iters,
        interval=IntervalLog(extra),  # the open log interval travels in the resume state
    ))
    del loader
    t_eval = time.perf_counter()
    results = _gather(predict(model, val_set, r, info, num_workers=min(r["num_workers"], 2)), info)
    metrics: dict[str, Any] | None = None
    if info.is_main:
        _write_predictions(results, Path(job.out_dir) / "predictions.json.gz")
        metrics = coco_evaluate(data["val_json"], results, backend=r["eval_backend"],
                                image_ids=val_set.ids if r["max_val_images"] is not None else None)
        if r["save_weights"]:
            ckpt.save_atomic({"model": model.state_dict(), "model_name": job.model, "task": job.task,
                              "label_to_cat": val_set.label_to_cat}, Path(job.out_dir) / "last.pt")
    metrics = _broadcast(metrics, info)
    eval_s = time.perf_counter() - t_eval
    logger.log({"iter": total, "eval_s": eval_s, **metrics})
    logger.close()
    record = write_metrics(
        job, info, metrics, started,
        iterations=total, epoch_iters=epoch_iters, train_images=len(train_set), val_images=len(val_set),
        num_predictions=len(results) if info.is_main else None, eval_s=eval_s, encoder=load_info,
    )
    state.set_final(total, record)
    state.finish()
    barrier(info)
    return record


_LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
