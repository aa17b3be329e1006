"""Classification fine-tuning data: ImageNet-layout folders (through the Parquet indexes) and
iNaturalist-2018 COCO-style json, one ``Dataset`` over (path, label) lists, timm transforms.

Fine-tuning data must be clean: an image that does not decode raises
:class:`~mimlib.data.decode.CorruptImageError` naming the file (no skipping, no grey images),
and a json image without exactly one category raises ``ValueError``.

Augmentation randomness is made a pure function of ``(seed, epoch, sample index)``: the
sampler hands the dataset ``(index, epoch)`` keys and the dataset seeds Python's, NumPy's and
torch's global generators (timm's crop / RandAugment / random erasing draw from all three)
before transforming that sample. The same sample gets the same augmentation whatever the
number of loader workers, the world size, or where a run was interrupted and resumed.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mimlib.data.decode import load_rgb
from mimlib.data.index import read_index
from mimlib.data.sampling import stable_seed

__all__ = [
    "ClassificationDataset",
    "ClassificationSplits",
    "Split",
    "build_eval_transform",
    "build_train_transform",
    "load_classification_splits",
    "read_imagenet_split",
    "read_inat_split",
]


@dataclass
class Split:
    """Absolute image paths and their contiguous labels."""

    paths: list[str]
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class ClassificationSplits:
    train: Split
    val: Split
    num_classes: int
    class_names: list[str]


def read_imagenet_split(index_path: str | os.PathLike[str]) -> tuple[Split, list[str]]:
    """(split, class names by label) from a mimscale Parquet index (``read_index``).

    Labels are the index's (position of the class folder in the sorted list of the train
    split's folders; build the val index with the train classes so both agree).
    """
    df, root = read_index(index_path)
    paths = [str(root / p) for p in df["path"].tolist()]
    labels = df["label"].to_numpy(dtype=np.int64)
    names: dict[int, str] = dict(zip(labels.tolist(), df["class_name"].tolist()))
    n = int(labels.max()) + 1 if len(labels) else 0
    return Split(paths, labels), [names.get(i, "") for i in range(n)]


def _inat_categories(doc: dict[str, Any], path: Any) -> list[dict[str, Any]]:
    cats = doc.get("categories")
    if not cats:
        raise ValueError(f"{path}: no 'categories' list")
    ids = [int(c["id"]) for c in cats]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate category ids")
    return sorted(cats, key=lambda c: int(c["id"]))


def read_inat_split(
    root: str | os.PathLike[str],
    json_path: str | os.PathLike[str],
    category_ids: Sequence[int] | None = None,
) -> tuple[Split, list[int], list[str]]:
    """(split, category ids by label, category names by label) from an iNat-2018-style json.

    ``images[i].file_name`` is relative to ``root``; each image must have exactly one
    annotation. Labels are the positions of the category ids sorted ascending (iNat-2018's
    ids are already 0..8141; other years are not contiguous). Pass the train split's
    ``category_ids`` when reading val so both use one mapping.
    """
    root = Path(root)
    with open(json_path) as f:
        doc = json.load(f)
    cats = _inat_categories(doc, json_path)
    if category_ids is None:
        category_ids = [int(c["id"]) for c in cats]
        names = [str(c.get("name", c["id"])) for c in cats]
    else:
        by_id = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
        names = [by_id.get(int(i), str(i)) for i in category_ids]
    label_of = {int(cid): k for k, cid in enumerate(category_ids)}
    category_of: dict[int, int] = {}
    for ann in doc.get("annotations", []):
        img_id, cid = int(ann["image_id"]), int(ann["category_id"])
        if img_id in category_of and category_of[img_id] != cid:
            raise ValueError(f"{json_path}: image {img_id} has annotations of two categories")
        category_of[img_id] = cid
    paths: list[str] = []
    labels: list[int] = []
    for img in sorted(doc.get("images", []), key=lambda im: int(im["id"])):
        img_id = int(img["id"])
        if img_id not in category_of:
            raise ValueError(f"{json_path}: image {img_id} ({img.get('file_name')}) has no annotation")
        cid = category_of[img_id]
        if cid not in label_of:
            raise ValueError(f"{json_path}: image {img_id} has category {cid}, not among the known categories")
        paths.append(str(root / img["file_name"]))
        labels.append(label_of[cid])
    if not paths:
        raise ValueError(f"{json_path}: no images")
    return Split(paths, np.asarray(labels, dtype=np.int64)), list(category_ids), names


def load_classification_splits(data: dict[str, Any]) -> ClassificationSplits:
    """Train and val splits from a job's ``data`` dict.

    * ImageNet layout: ``{"train_index", "val_index", "num_classes"}`` (Parquet indexes;
      ``num_classes`` defaults to the largest label + 1).
    * iNaturalist 2018: ``{"root", "train_json", "val_json"}``; ``num_classes`` is the
      number of categories of train_json (8142 for the real set).
    """
    if "train_index" in data:
        train, names = read_imagenet_split(data["train_index"])
        val, val_names = read_imagenet_split(data["val_index"])
        seen = max(len(names), len(val_names))
        num_classes = int(data.get("num_classes") or seen)
        if seen > num_classes:
            raise ValueError(f"labels up to {seen - 1} in {data['train_index']} / {data['val_index']} "
                             f"but num_classes={num_classes}")
        for i, n in enumerate(val_names):  # fill classes only val has seen
            if i >= len(names):
                names.append(n)
        names += [""] * (num_classes - len(names))
        return ClassificationSplits(train, val, num_classes, names)
    if "train_json" in data:
        train, cat_ids, names = read_inat_split(data["root"], data["train_json"])
        val, _, _ = read_inat_split(data["root"], data["val_json"], category_ids=cat_ids)
        if data.get("num_classes") not in (None, len(cat_ids)):
            raise ValueError(f"num_classes={data['num_classes']} but {data['train_json']} has "
                             f"{len(cat_ids)} categories")
        return ClassificationSplits(train, val, len(cat_ids), names)
    raise ValueError(
        f"classification data needs train_index/val_index (ImageNet folder) or "
        f"root/train_json/val_json (iNaturalist); got keys {sorted(data)}"
    )


def _posterize_any_bits(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize, also for 0 bits (an all-black image, what Pillow < 13 returned).

    timm 1.0.31's 'PosterizeIncreasing' asks for 0 bits when RandAugment's magnitude reaches
    its cap (m9, mstd 0.5: about one posterize in 40) and Pillow 13 rejects 0.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform: Any) -> None:
    """Swap timm's posterize for :func:`_posterize_any_bits` in this transform's RandAugment ops."""
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize_any_bits


def build_train_transform(recipe: dict[str, Any]) -> Callable:
    """timm's ImageNet training pipeline with the recipe's augmentation (Table 11).

    As in the reference, colour jitter is ignored by timm when RandAugment is on.
    """
    from timm.data import create_transform

    transform = create_transform(
        recipe["img_size"],
        is_training=True,
        scale=tuple(recipe["crop_scale"]),
        ratio=tuple(recipe["crop_ratio"]),
        hflip=recipe["hflip"],
        color_jitter=recipe["color_jitter"] if recipe["color_jitter"] else None,
        auto_augment=recipe["auto_augment"] or None,
        interpolation="bicubic",
        re_prob=recipe["reprob"],
        re_mode=recipe["remode"],
        re_count=1,
    )
    _patch_posterize(transform)
    return transform


def build_eval_transform(recipe: dict[str, Any]) -> Callable:
    """Resize the short side to img_size / eval_resize_ratio (256 for 224), bicubic, centre crop."""
    from timm.data import create_transform

    return create_transform(
        recipe["img_size"], is_training=False, crop_pct=recipe["eval_resize_ratio"], interpolation="bicubic"
    )


def seed_sample(*parts: Any) -> None:
    """Seed the three global generators timm's transforms draw from."""
    s = stable_seed(*parts)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


class ClassificationDataset(Dataset):
    """(image tensor, label) for ``split``.

    Indexed by an int (no reseeding: evaluation) or by ``(index, epoch)`` (training: the
    sample's augmentation is seeded by ``(seed, epoch, index)``).
    """

    def __init__(self, split: Split, transform: Callable, seed: int = 0):
        self.split = split
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            index, epoch = key
            seed_sample(self.seed, "ft-sample", epoch, index)
        else:
            index = key
        img = load_rgb(self.split.paths[index])  # CorruptImageError names the file
        return self.transform(img), int(self.split.labels[index])
