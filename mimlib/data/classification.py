"""Classification fine-tuning data: ImageNet-layout folders (through the Parquet indexes) and
iNaturalist-2018 COCO-style json, one ``Dataset`` over (path, label) lists, timm transforms.

Fine-tuning data must be clean: an image that does not decode raises
:class:`~mimlib.data.decode.CorruptImageError` naming the file (no skipping, no grey images),
and a json image without exactly one category raises ``ValueError``.

One label map per dataset, the train split's: an ImageNet-layout dataset's is the train
index's sorted class folders (:func:`mimlib.data.index.read_label_map`), and val images are
labelled by class *name* through it (the val index's own label column, the positions of its
folders, is not used), so a class folder only one split has cannot shift the other's labels.
A val class the train split lacks is an error naming it; a train class without val images
is a warning, logged and kept in :attr:`ClassificationSplits.classes_without_val_images`
(the engine writes it into ``metrics.json``). iNaturalist's map is train_json's category list,
with the same two checks for val_json.

Augmentation randomness is made a pure function of ``(seed, epoch, sample index)``: the
sampler hands the dataset ``(index, epoch)`` keys and the dataset seeds Python's, NumPy's and
torch's global generators (timm's crop / RandAugment / random erasing draw from all three)
before transforming that sample. The same sample gets the same augmentation whatever the
number of loader workers, the world size, or where a run was interrupted and resumed.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mimlib.data.decode import load_rgb
from mimlib.data.index import read_label_map
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

log = logging.getLogger(__name__)


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
    #: classes of the label map with train images but none in val: top-1 is still right (over
    #: the classes val has), but they are not evaluated
    classes_without_val_images: list[str] = field(default_factory=list)


def _shown(names: Sequence[Any], limit: int = 10) -> str:
    head = ", ".join(repr(n) for n in names[:limit])
    return f"{head}{f' (and {len(names) - limit} more)' if len(names) > limit else ''}"


def read_imagenet_split(
    index_path: str | os.PathLike[str], classes: Sequence[str] | None = None
) -> tuple[Split, list[str]]:
    """(split, class names by label) from a mimscale Parquet index (``read_index``).

    Without ``classes`` the labels are the index's own label map (its sorted class folders).
    With ``classes`` (the train split's label map; pass it when reading val) every image is
    labelled by its class name's position in it, and a class not in it raises ``ValueError``
    naming the classes, the index and its folder.
    """
    df, root, own = read_label_map(index_path)
    label_map = list(own if classes is None else classes)
    label_of = {name: i for i, name in enumerate(label_map) if name}
    names = df["class_name"].to_numpy()
    unknown = sorted(set(names.tolist()) - set(label_of))
    if unknown:
        raise ValueError(
            f"{str(index_path)!r} (folder {str(root)!r}) has images of {len(unknown)} class(es) that are not class "
            f"folders of the train split: {_shown(unknown)}; train and val must have the same class folders "
            f"(remove them from val, or add them to train and re-index)"
        )
    labels = np.fromiter((label_of[n] for n in names.tolist()), dtype=np.int64, count=len(names))
    paths = [str(root / p) for p in df["path"].tolist()]
    return Split(paths, labels), label_map


def _without_val_images(label_map: Sequence[Any], train: Split, val: Split, where: str) -> list[Any]:
    """Classes with train images but no val image; each one is logged as a warning."""
    missing = sorted(set(train.labels.tolist()) - set(val.labels.tolist()))
    names = [label_map[i] for i in missing]
    if names:
        log.warning("%s: %d of %d classes have train images but no val images, so top-1/top-5 do not evaluate "
                    "them: %s", where, len(names), len(label_map), _shown(names))
    return names


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
    known = "its own 'categories' list" if category_ids is None else "the train split's categories"
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
    unknown: dict[int, int] = {}  # category id -> images
    for img in sorted(doc.get("images", []), key=lambda im: int(im["id"])):
        img_id = int(img["id"])
        if img_id not in category_of:
            raise ValueError(f"{json_path}: image {img_id} ({img.get('file_name')}) has no annotation")
        cid = category_of[img_id]
        if cid not in label_of:
            unknown[cid] = unknown.get(cid, 0) + 1
            continue
        paths.append(str(root / img["file_name"]))
        labels.append(label_of[cid])
    if unknown:
        ids = sorted(unknown)
        raise ValueError(
            f"{json_path}: {sum(unknown.values())} images have {len(ids)} category id(s) that are not in {known}: "
            f"{_shown(ids)}"
        )
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
        val, _ = read_imagenet_split(data["val_index"], classes=names)  # one label map: train's
        num_classes = int(data.get("num_classes") or len(names))
        if len(names) > num_classes:
            raise ValueError(f"{data['train_index']} has {len(names)} classes but num_classes={num_classes}")
        missing = _without_val_images(names, train, val, f"{data['val_index']}")
        names += [""] * (num_classes - len(names))
        return ClassificationSplits(train, val, num_classes, names, missing)
    if "train_json" in data:
        train, cat_ids, names = read_inat_split(data["root"], data["train_json"])
        val, _, _ = read_inat_split(data["root"], data["val_json"], category_ids=cat_ids)
        if data.get("num_classes") not in (None, len(cat_ids)):
            raise ValueError(f"num_classes={data['num_classes']} but {data['train_json']} has "
                             f"{len(cat_ids)} categories")
        missing = _without_val_images(names, train, val, f"{data['val_json']}")
        return ClassificationSplits(train, val, len(cat_ids), names, missing)
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
