"""COCO instance data (images folder + ``instances_*.json``) for Mask R-CNN fine-tuning.

Targets follow torchvision's detection API: ``boxes`` (N, 4) float32 xyxy in pixels,
``labels`` (N,) int64 with the contiguous ids 1..K of the sorted COCO category ids
(0 = background), ``masks`` (N, H, W) uint8 decoded with pycocotools from polygons,
compressed or uncompressed RLE, and ``image_id``. Crowd annotations and boxes under 1 px are
left out of training targets (they are *ignore* regions for COCOeval, which reads them from
the json itself); training skips images left with no annotation, as mmdetection and
detectron2 do.

Training augmentation (paper Table 13): large-scale jitter -- resize the image so that its
long side is ``crop_size * r``, r ~ U(scale_range) ([0.1, 2.0]), take a random
``crop_size x crop_size`` window of it (the whole image when it is smaller), pad to
``crop_size x crop_size`` (bottom / right, ImageNet-mean colour, i.e. 0 after
normalisation, like the detector's own batch padding) -- then a horizontal flip with
probability ``hflip``. The crop window is mapped back to the original image first and done
as one ``resized_crop``, so a 2x upscale never materialises the whole upscaled image and its
masks. Boxes and masks go through the same torchvision ``transforms.v2`` kernels
(``tv_tensors.BoundingBoxes`` / ``Mask``; masks resized with centred nearest neighbour);
then, as mmdetection's LSJ pipeline does (``recompute_bbox=True``), each box becomes the
extent of its transformed mask -- a clamped box of an object cut by the crop can be far
larger than the part left inside it. Instances whose mask (or box) vanishes are dropped.

Randomness: a training item is fetched by ``(index, seed)``; all its draws come from a numpy
Generator seeded with ``seed``, so the augmentation of every sample is a pure function of
the sampler's key (not of the worker that loads it, nor of where a job resumed).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mimlib.data.decode import decode_rgb_tensor

__all__ = [
    "MEAN_FILL",
    "CocoInstances",
    "coco_paths",
    "collate",
    "large_scale_jitter",
    "load_coco",
    "masks_to_boxes",
]

# ImageNet mean as uint8: the colour that normalises to ~0 (what the detector pads with).
MEAN_FILL = (124, 116, 104)


def coco_paths(root: str | os.PathLike[str], train: str = "train2017", val: str = "val2017") -> dict[str, str]:
    """The job's ``data`` dict for a COCO 2017 folder (``annotations/instances_<split>.json``)."""
    root = Path(root)
    return {
        "train_images": str(root / train),
        "train_json": str(root / "annotations" / f"instances_{train}.json"),
        "val_images": str(root / val),
        "val_json": str(root / "annotations" / f"instances_{val}.json"),
    }


def load_coco(ann_json: str | os.PathLike[str] | dict[str, Any]):
    """pycocotools ``COCO`` index of a json file (or an already loaded dict), quietly."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(ann_json, dict):
            coco = COCO()
            coco.dataset = ann_json
            coco.createIndex()
        else:
            coco = COCO(str(ann_json))
    return coco


class CocoInstances(Dataset):
    """COCO images with instance targets; ``train=True`` applies large-scale jitter + flip.

    Training items are fetched with ``dataset[(index, seed)]`` (a plain index uses seed
    ``index``); evaluation items are the decoded image at its own size.
    """

    def __init__(
        self,
        images: str | os.PathLike[str],
        ann_json: str | os.PathLike[str] | dict[str, Any],
        train: bool,
        crop_size: int = 1024,
        scale_range: Sequence[float] = (0.1, 2.0),
        hflip: float = 0.5,
        with_masks: bool = True,
        max_images: int | None = None,
    ):
        self.root = Path(images)
        self.coco = load_coco(ann_json)
        self.train = train
        self.crop_size = int(crop_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.hflip = float(hflip)
        self.with_masks = with_masks
        self.cat_ids = sorted(int(c) for c in self.coco.cats)
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = {i + 1: c for i, c in enumerate(self.cat_ids)}
        ids = sorted(int(i) for i in self.coco.imgs)
        if train:
            ids = [i for i in ids if self._annotations(i)]
        if max_images is not None:
            ids = ids[:max_images]
        self.ids = ids

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    @property
    def class_names(self) -> list[str]:
        return [self.coco.cats[c].get("name", str(c)) for c in self.cat_ids]

    def __len__(self) -> int:
        return len(self.ids)

    def _annotations(self, image_id: int) -> list[dict[str, Any]]:
        """Non-crowd annotations with a box of at least 1 px a side, in file order."""
        anns = self.coco.imgToAnns.get(image_id, [])
        return [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]

    def target(self, image_id: int, height: int, width: int) -> dict[str, torch.Tensor]:
        """Target dict of one image at its original size."""
        anns = self._annotations(image_id)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        labels = torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        target = {"boxes": boxes, "labels": labels, "image_id": torch.tensor(image_id)}
        if self.with_masks:
            if anns:
                masks = np.stack([self.coco.annToMask(a) for a in anns])
                if masks.shape[1:] != (height, width):
                    raise ValueError(
                        f"image {image_id}: annotation size {masks.shape[1:]} != decoded image size {(height, width)}"
                    )
            else:
                masks = np.zeros((0, height, width), dtype=np.uint8)
            target["masks"] = torch.from_numpy(masks)
        return target

    def load_image(self, image_id: int) -> torch.Tensor:
        info = self.coco.imgs[image_id]
        return decode_rgb_tensor(self.root / info["file_name"]).contiguous()

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index, seed = (key, key) if isinstance(key, (int, np.integer)) else key
        image_id = self.ids[int(index)]
        image = self.load_image(image_id)
        target = self.target(image_id, image.shape[-2], image.shape[-1])
        if self.train:
            rng = np.random.default_rng(int(seed))
            image, target = large_scale_jitter(image, target, rng, self.crop_size, self.scale_range, self.hflip)
        return image, target


def large_scale_jitter(
    image: torch.Tensor,
    target: dict[str, torch.Tensor],
    rng: np.random.Generator,
    crop_size: int,
    scale_range: tuple[float, float] = (0.1, 2.0),
    hflip: float = 0.5,
    fill: Sequence[int] = MEAN_FILL,
    recompute_boxes: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Resize by ``crop_size * r / max(h, w)``, random crop / pad to ``crop_size``, flip.

    Returns the uint8 ``(3, crop, crop)`` image and the target with boxes, labels and masks
    moved along; vanished instances dropped. With masks and ``recompute_boxes`` the boxes
    are the extents of the transformed masks (the box of a cut object is the box of its
    part inside the crop, not the clamped original box); else the transformed boxes
    clamped to the crop.
    """
    from torchvision import tv_tensors
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    h, w = image.shape[-2:]
    scale = crop_size * rng.uniform(*scale_range) / max(h, w)
    # The part of the original image that lands in the crop window, in original pixels.
    ch = min(h, max(1, round(crop_size / scale)))
    cw = min(w, max(1, round(crop_size / scale)))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    out_h = min(crop_size, max(1, round(ch * scale)))
    out_w = min(crop_size, max(1, round(cw * scale)))
    flip = bool(rng.random() < hflip)

    img = tv_tensors.Image(image)
    boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w))
    items: list[Any] = [img, boxes]
    has_masks = "masks" in target
    if has_masks:
        items.append(tv_tensors.Mask(target["masks"]))
    pad = [0, 0, crop_size - out_w, crop_size - out_h]  # left, top, right, bottom
    out = []
    for x in items:
        if isinstance(x, tv_tensors.Mask):
            # Centred nearest neighbour ('nearest-exact'): torch's plain 'nearest' samples
            # floor(i / s) and shifts masks by up to a pixel against the boxes.
            x = F.resize(F.crop(x, top, left, ch, cw), [out_h, out_w], interpolation=InterpolationMode.NEAREST_EXACT)
        else:
            x = F.resized_crop(x, top, left, ch, cw, [out_h, out_w], antialias=True)
        x = F.pad(x, pad, fill=list(fill) if isinstance(x, tv_tensors.Image) else 0)
        if flip:
            x = F.horizontal_flip(x)
        out.append(x)
    new_boxes = out[1].as_subclass(torch.Tensor)
    result = dict(target)
    if has_masks:
        masks = out[2].as_subclass(torch.Tensor)
        if recompute_boxes:
            new_boxes = masks_to_boxes(masks)
        keep = masks.flatten(1).amax(1) > 0 if masks.shape[0] else torch.zeros(0, dtype=torch.bool)
        keep &= (new_boxes[:, 2] - new_boxes[:, 0] >= 1) & (new_boxes[:, 3] - new_boxes[:, 1] >= 1)
        result["masks"] = masks[keep]
    else:
        keep = (new_boxes[:, 2] - new_boxes[:, 0] >= 1) & (new_boxes[:, 3] - new_boxes[:, 1] >= 1)
    result["boxes"] = new_boxes[keep]
    result["labels"] = target["labels"][keep]
    return out[0].as_subclass(torch.Tensor).contiguous(), result


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) masks -> (N, 4) float xyxy pixel-edge extents (zeros for empty masks)."""
    n = masks.shape[0]
    if n == 0:
        return torch.zeros(0, 4)
    rows = masks.amax(2) > 0  # (N, H)
    cols = masks.amax(1) > 0  # (N, W)
    h, w = masks.shape[1:]
    ar_h = torch.arange(h)
    ar_w = torch.arange(w)
    y0 = torch.where(rows, ar_h, h).amin(1)
    y1 = torch.where(rows, ar_h + 1, 0).amax(1)
    x0 = torch.where(cols, ar_w, w).amin(1)
    x1 = torch.where(cols, ar_w + 1, 0).amax(1)
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    empty = ~rows.any(1)
    boxes[empty] = 0
    return boxes


def collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Detection batches stay lists (images and targets differ in size)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
