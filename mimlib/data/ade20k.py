"""ADE20K (ADEChallengeData2016) for semantic segmentation: reader and mmseg's pipelines.

Layout: ``<root>/images/{training,validation}/*.jpg`` and
``<root>/annotations/{training,validation}/*.png`` (uint8, 150 classes 1..150, 0 = other),
paired by file stem. Labels are read with ``reduce_zero_label``: 0 -> 255 (ignored),
k -> k - 1, so the model predicts 150 classes 0..149.

Training pipeline (paper Table 14, mmseg's ADE20K config at 640):

1. random rescale: ratio r ~ U[ratio_range] (0.5, 2.0), target scale (2560 r, 640 r); the
   image is resized keeping its aspect ratio so it fits both (long side <= 2560 r, short
   side <= 640 r) -- mmcv's ``rescale_size`` -- bilinear for the image, nearest for labels;
2. random crop ``img_size`` (640) with mmseg's ``cat_max_ratio`` 0.75: up to 10 re-draws
   until the crop holds >= 2 labelled classes and no class covers >= 75% of its labelled
   pixels (the last draw is kept otherwise);
3. horizontal flip with p = 0.5;
4. PhotoMetricDistortion (mmseg): brightness +-32 (p .5); contrast x[0.5, 1.5] (p .5) either
   first or last (coin flip); saturation x[0.5, 1.5] (p .5); hue +-18 OpenCV units (= +-36
   degrees, p .5). Here the image stays float between steps (clipped to [0, 255] after each)
   rather than being rounded to uint8 after each as mmcv does;
5. normalise with the ImageNet mean/std (mmseg's 123.675/116.28/103.53, 58.395/57.12/57.375);
6. pad bottom/right to ``img_size``: image 0 (after normalising), label 255.

Evaluation: resize keeping the aspect ratio into (2560, 640) -- short side 640 unless the
long side would pass 2560 -- and predict with sliding windows (engine); the metric compares
against the *original* annotation (logits resized back), as mmseg does.

Every random choice for the sample at (iteration k, slot j of the global batch) is a pure
function of (seed, k, j) (see :mod:`mimlib.data.pretrain_data`), so resumed and re-split
runs see the same batches.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from mimlib.data.decode import load_rgb
from mimlib.data.pretrain_data import IMAGENET_MEAN, IMAGENET_STD, SampleOrder
from mimlib.data.sampling import stable_seed

log = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "NUM_CLASSES",
    "SPLITS",
    "ADE20KTrain",
    "ADE20KVal",
    "list_pairs",
    "load_label",
    "reduce_zero_label",
    "rescale_size",
    "random_crop",
    "photometric_distortion",
    "normalize",
    "train_sample",
    "eval_size",
    "collate_train",
]

NUM_CLASSES = 150
IGNORE_INDEX = 255
SPLITS = {"train": "training", "val": "validation"}
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255


def list_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """Sorted (image, annotation) pairs of ``split`` ('train'/'training' or 'val'/'validation')."""
    sub = SPLITS.get(split, split)
    img_dir, ann_dir = Path(root) / "images" / sub, Path(root) / "annotations" / sub
    if not img_dir.is_dir() or not ann_dir.is_dir():
        raise FileNotFoundError(f"ADE20K split {sub!r} not found under {root} (need images/{sub} and annotations/{sub})")
    anns = {p.stem: p for p in ann_dir.iterdir() if p.suffix.lower() == ".png"}
    pairs, missing = [], []
    for p in sorted(img_dir.iterdir()):
        if p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        if p.stem in anns:
            pairs.append((p, anns[p.stem]))
        else:
            missing.append(p.name)
    if missing:
        raise FileNotFoundError(f"{len(missing)} images in {img_dir} have no annotation, e.g. {missing[:5]}")
    if not pairs:
        raise FileNotFoundError(f"no images in {img_dir}")
    return pairs


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 ('other') -> 255 (ignored), k -> k - 1 (so 1..150 -> 0..149); 255 stays 255."""
    label = np.asarray(label).astype(np.uint8, copy=True)
    label[label == 0] = 255
    label = label - 1
    label[label == 254] = 255
    return label


def load_label(path: str | Path, reduce_zero: bool = True) -> np.ndarray:
    """(H, W) uint8 label map of an annotation PNG."""
    with Image.open(path) as img:
        if img.mode not in ("L", "P"):
            img = img.convert("L")
        label = np.array(img, dtype=np.uint8)
    return reduce_zero_label(label) if reduce_zero else label


def rescale_size(w: int, h: int, scale: Sequence[float]) -> tuple[int, int]:
    """mmcv's keep-ratio ``rescale_size``: the largest (w, h) with long <= max(scale), short <= min(scale)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def _resize_image(img: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) float -> bilinear (align_corners False, no antialias, as cv2's INTER_LINEAR)."""
    if tuple(img.shape[-2:]) == tuple(size_hw):
        return img
    return F.interpolate(img[None], size=size_hw, mode="bilinear", align_corners=False)[0]


def _resize_label(label: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """(H, W) uint8 -> nearest neighbour (floor of the source coordinate, as cv2's INTER_NEAREST)."""
    if tuple(label.shape) == tuple(size_hw):
        return label
    return F.interpolate(label[None, None].float(), size=size_hw, mode="nearest")[0, 0].to(torch.uint8)


def random_crop(img: torch.Tensor, label: torch.Tensor, crop: int, cat_max_ratio: float,
                rng: np.random.Generator, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """mmseg's RandomCrop: offsets U{0..max(H-crop, 0)}, up to 10 re-draws for ``cat_max_ratio``."""
    h, w = label.shape

    def bbox() -> tuple[int, int, int, int]:
        oy = int(rng.integers(0, max(h - crop, 0) + 1))
        ox = int(rng.integers(0, max(w - crop, 0) + 1))
        return oy, min(oy + crop, h), ox, min(ox + crop, w)

    y0, y1, x0, x1 = bbox()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            cnt = torch.bincount(label[y0:y1, x0:x1].reshape(-1).long(), minlength=256)
            cnt[ignore_index] = 0
            cnt = cnt[cnt > 0]
            if cnt.numel() > 1 and float(cnt.max()) / float(cnt.sum()) < cat_max_ratio:
                break
            y0, y1, x0, x1 = bbox()
    return img[:, y0:y1, x0:x1], label[y0:y1, x0:x1]


def _rgb_to_hsv(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(3, H, W) RGB in [0, 255] -> hue in degrees [0, 360), saturation [0, 1], value [0, 255]."""
    r, g, b = img[0], img[1], img[2]
    v, _ = img.max(0)
    mn, _ = img.min(0)
    d = v - mn
    s = torch.where(v > 0, d / v.clamp_min(1e-12), torch.zeros_like(v))
    dd = d.clamp_min(1e-12)
    h = torch.where(v == r, (g - b) / dd, torch.where(v == g, 2.0 + (b - r) / dd, 4.0 + (r - g) / dd))
    h = torch.where(d > 0, (h * 60.0) % 360.0, torch.zeros_like(h))
    return h, s, v


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    h6 = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - (h6 % 2 - 1).abs())
    m = v - c
    z = torch.zeros_like(c)
    sector = h6.floor().long().clamp(0, 5)
    rs = torch.stack([c, x, z, z, x, c])
    gs = torch.stack([x, c, c, x, z, z])
    bs = torch.stack([z, z, x, c, c, x])
    idx = sector[None]
    out = torch.stack([rs.gather(0, idx)[0], gs.gather(0, idx)[0], bs.gather(0, idx)[0]])
    return out + m[None]


def photometric_distortion(img: torch.Tensor, rng: np.random.Generator, brightness_delta: float = 32,
                           contrast_range: Sequence[float] = (0.5, 1.5),
                           saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a float (3, H, W) RGB image in [0, 255]."""
    if rng.integers(2):
        img = (img + float(rng.uniform(-brightness_delta, brightness_delta))).clamp(0, 255)
    mode = int(rng.integers(2))

    def contrast(x: torch.Tensor) -> torch.Tensor:
        if rng.integers(2):
            x = (x * float(rng.uniform(*contrast_range))).clamp(0, 255)
        return x

    if mode == 1:
        img = contrast(img)
    if rng.integers(2):  # saturation
        h, s, v = _rgb_to_hsv(img)
        img = _hsv_to_rgb(h, (s * float(rng.uniform(*saturation_range))).clamp(0, 1), v).clamp(0, 255)
    if rng.integers(2):  # hue, in OpenCV's units of 2 degrees
        h, s, v = _rgb_to_hsv(img)
        img = _hsv_to_rgb(h + 2.0 * int(rng.integers(-hue_delta, hue_delta)), s, v).clamp(0, 255)
    if mode == 0:
        img = contrast(img)
    return img


def normalize(img: torch.Tensor) -> torch.Tensor:
    """float (3, H, W) RGB in [0, 255] -> ImageNet-normalised."""
    return (img - _MEAN) / _STD


def train_sample(image: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor, recipe: dict[str, Any],
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The training pipeline on one (H, W, 3) uint8 image and its reduced (H, W) label.

    Returns a normalised float (3, crop, crop) image and an int64 (crop, crop) label with 255
    where ignored (including padding).
    """
    crop = int(recipe["img_size"])
    img = torch.as_tensor(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()
    lab = torch.as_tensor(np.asarray(label, dtype=np.uint8))
    h, w = lab.shape
    ratio = float(rng.uniform(*recipe["ratio_range"]))
    long_side, short_side = recipe["scale"]
    nw, nh = rescale_size(w, h, (long_side * ratio, short_side * ratio))
    img, lab = _resize_image(img, (nh, nw)), _resize_label(lab, (nh, nw))
    img, lab = random_crop(img, lab, crop, float(recipe["cat_max_ratio"]), rng)
    if rng.random() < recipe["hflip"]:
        img, lab = img.flip(-1), lab.flip(-1)
    if recipe["photometric"]:
        img = photometric_distortion(img, rng)
    img = normalize(img)
    ph, pw = crop - img.shape[1], crop - img.shape[2]
    if ph > 0 or pw > 0:
        img = F.pad(img, (0, pw, 0, ph), value=0.0)
        lab = F.pad(lab, (0, pw, 0, ph), value=IGNORE_INDEX)
    return img.contiguous(), lab.long().contiguous()


def eval_size(w: int, h: int, recipe: dict[str, Any]) -> tuple[int, int]:
    """(w, h) at test scale: keep ratio into (test_long_side, test_short_side)."""
    return rescale_size(w, h, (recipe["test_long_side"], recipe["test_short_side"]))


def _load_rgb_array(path: Path) -> np.ndarray:
    return np.array(load_rgb(path), dtype=np.uint8)  # a writable copy (torch.as_tensor shares it)


class ADE20KTrain(Dataset):
    """Indexed by (iteration, slot) keys from :class:`~mimlib.data.pretrain_data.GlobalBatchSampler`."""

    def __init__(self, root: str | Path, recipe: dict[str, Any], seed: int, split: str = "train",
                 max_images: int | None = None):
        self.pairs = list_pairs(root, split)[: max_images or None]
        self.recipe = recipe
        self.seed = seed
        self.global_batch = recipe["global_batch"]
        self.order = SampleOrder(len(self.pairs), seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        iteration, slot = key
        index = self.order(iteration * self.global_batch + slot)
        img_path, ann_path = self.pairs[index]
        image, label = _load_rgb_array(img_path), load_label(ann_path)
        if image.shape[:2] != label.shape:
            raise ValueError(f"{img_path} is {image.shape[:2]} but {ann_path} is {label.shape}")
        rng = np.random.Generator(np.random.PCG64(stable_seed(self.seed, "ade20k", iteration, slot)))
        img, lab = train_sample(image, label, self.recipe, rng)
        return {"image": img, "label": lab}


def collate_train(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"image": torch.stack([s["image"] for s in samples]), "label": torch.stack([s["label"] for s in samples])}


class ADE20KVal(Dataset):
    """One image per item: normalised at test scale, plus the reduced label at original size."""

    def __init__(self, root: str | Path, recipe: dict[str, Any], split: str = "val", max_images: int | None = None):
        self.pairs = list_pairs(root, split)[: max_images or None]
        self.recipe = recipe

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        img_path, ann_path = self.pairs[index]
        image, label = _load_rgb_array(img_path), load_label(ann_path)
        h, w = label.shape
        if image.shape[:2] != (h, w):
            raise ValueError(f"{img_path} is {image.shape[:2]} but {ann_path} is {label.shape}")
        nw, nh = eval_size(w, h, self.recipe)
        img = _resize_image(torch.as_tensor(image).permute(2, 0, 1).float(), (nh, nw))
        return {"image": normalize(img).contiguous(), "label": torch.as_tensor(label).long(), "name": img_path.name}


def _first(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """collate for batch size 1 over variable-size images."""
    if len(batch) != 1:
        raise ValueError("evaluation loads one image at a time")
    return batch[0]

