"""Embedded ADE20K-layout demo set from the shared scene renderer (:mod:`mimlib.data.demo`).

``<out>/ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_%08d.jpg`` and
``annotations/{training,validation}/*.png``: uint8 label maps with classes 1..K and
0 = "other", as real ADE20K (which the engine reads with reduce_zero_label).

Label k (1..K) is the renderer's class k-1, drawn with ``class_style(k-1, seed)``: the same
textures as the classification demo used for pre-training, so a pre-trained encoder has
seen these classes' looks (without their labels or layouts). "Other" is one more texture
(renderer class K) that appears as the background of some images and as an extra object in
others; its pixels get label 0 (ignored in training and evaluation). Each image has a
labelled background class and 1-3 labelled objects (shapes that may occlude each other).

Deterministic: each file depends only on (seed, split, index); the set is written to
``<out>.tmp`` and renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from mimlib.data.demo import GENERATOR_VERSION, _rng, class_style, publish_dataset, render_scene, staging_dir  # noqa: E501

__all__ = ["Ade20kDemoSpec", "write_ade20k_demo", "render_ade20k_sample"]

SPLIT_DIRS = {"train": ("training", "ADE_train_%08d"), "val": ("validation", "ADE_val_%08d")}


@dataclass(frozen=True)
class Ade20kDemoSpec:
    """Size and seed of an ADE20K-layout demo set (image sides drawn in [min_size, max_size])."""

    num_classes: int = 8
    train_images: int = 200
    val_images: int = 24
    min_size: int = 96
    max_size: int = 160
    seed: int = 0
    quality: int = 90
    other_prob: float = 0.25  # chance of an "other" (label 0) background, and of an "other" object

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= 254:
            raise ValueError(f"ADE20K demo needs 1 <= num_classes <= 254: {self}")
        if self.train_images < 1 or self.val_images < 1:
            raise ValueError(f"ADE20K demo needs train_images, val_images >= 1: {self}")
        if not 8 <= self.min_size <= self.max_size:
            raise ValueError(f"ADE20K demo needs 8 <= min_size <= max_size: {self}")
        if not 0.0 <= self.other_prob <= 1.0:
            raise ValueError(f"other_prob must be in [0, 1]: {self}")


def render_ade20k_sample(spec: Ade20kDemoSpec, styles: dict, split: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(image (h, w, 3) uint8, label map (h, w) uint8 with 0 = other) of image ``k`` of ``split``."""
    rng = _rng(spec.seed, "ade20k", split, k)
    K = spec.num_classes
    h, w = (int(v) for v in rng.integers(spec.min_size, spec.max_size + 1, size=2))
    background = K if rng.random() < spec.other_prob else int(rng.integers(K))
    objects = [int(c) for c in rng.integers(K, size=int(rng.integers(1, 4)))]
    if rng.random() < spec.other_prob:
        objects.insert(int(rng.integers(len(objects) + 1)), K)
    scene = render_scene(rng, h, w, styles, background, objects=objects, clutter=int(rng.integers(0, 2)))
    sem = scene.semantic_map()
    label = np.where(sem == K, 0, sem + 1).astype(np.uint8)
    return scene.image, label


def write_ade20k_demo(out: str | os.PathLike[str], spec: Ade20kDemoSpec = Ade20kDemoSpec(), *,
                      overwrite: bool = False) -> dict[str, Any]:
    """Write the demo set under ``<out>/ADEChallengeData2016`` plus ``<out>/demo.json``; return counts.

    Built in ``<out>.tmp`` and renamed into place, so an interrupted run never leaves a half
    dataset at ``out``. An existing ``out`` raises ``FileExistsError`` unless ``overwrite``.
    """
    out, tmp = staging_dir(out, overwrite)
    K = spec.num_classes
    styles = {c: class_style(c, spec.seed) for c in range(K + 1)}  # K = "other"
    root = tmp / "ADEChallengeData2016"
    counts: dict[str, Any] = {"num_classes": K}
    pixels = np.zeros(K + 1, dtype=np.int64)
    for split, n in (("train", spec.train_images), ("val", spec.val_images)):
        sub, pattern = SPLIT_DIRS[split]
        img_dir, ann_dir = root / "images" / sub, root / "annotations" / sub
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        for k in range(n):
            image, label = render_ade20k_sample(spec, styles, split, k)
            name = pattern % (k + 1)
            Image.fromarray(image, "RGB").save(img_dir / f"{name}.jpg", "JPEG", quality=spec.quality,
                                               subsampling="4:2:0", optimize=False)
            Image.fromarray(label, "L").save(ann_dir / f"{name}.png", "PNG")
            if split == "train":
                pixels += np.bincount(label.ravel(), minlength=K + 1)
        counts[split] = n
    counts["train_pixel_fraction"] = [round(float(x), 4) for x in pixels / pixels.sum()]  # label 0..K
    info = {
        "generator": "mimlib.data.demo_ade20k.write_ade20k_demo",
        "generator_version": GENERATOR_VERSION,
        "spec": asdict(spec),
        "counts": counts,
        "labels": {"0": "other (ignored)", **{str(c + 1): f"class {c}" for c in range(K)}},
    }
    publish_dataset(tmp, out, info)
    return counts
