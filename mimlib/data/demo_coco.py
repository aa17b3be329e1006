"""Embedded COCO-format demo set for the detection / instance-segmentation task.

``<out>/train2017/*.jpg``, ``<out>/val2017/*.jpg``, ``<out>/annotations/instances_train2017.json``
and ``instances_val2017.json`` (plus ``<out>/demo.json``), rendered with the shared procedural
renderer (:func:`mimlib.data.demo.render_scene`): each image is a background texture with a
few flat clutter shapes and 1..``max_objects`` textured objects of ``num_classes`` categories
(category k wears the texture of class k of the classification demo, so a SimMIM encoder
pre-trained on that demo has seen it). Every object's *visible* mask becomes one annotation.

Made to catch the usual COCO pitfalls:

* category ids are not contiguous (k*k + k + 1: 1, 3, 7, 13, ...);
* image and annotation ids start at 1;
* segmentations come in all three COCO encodings: a polygon when the visible part is
  "row-convex" (one run of pixels per row, consecutive runs overlapping: the polygon follows
  the pixel edges and pycocotools rasterises it back to exactly the mask), otherwise RLE,
  alternately compressed (``counts`` a string) and uncompressed (``counts`` a list);
* image sizes vary (sides in [0.75, 1] x ``image_size``) and are not multiples of 32;
* ``bbox`` is [x, y, w, h] of the mask's extent, ``area`` its pixel count, ``iscrowd`` 0.

Deterministic: every image draws from a Generator seeded by (seed, split, index); the set is
built in ``<out>.tmp`` and renamed into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from mimlib.data.demo import (
    FAMILIES,
    GENERATOR_VERSION,
    _rng,
    class_style,
    publish_dataset,
    render_scene,
    staging_dir,
)

__all__ = ["CocoDemoSpec", "category_id", "mask_to_segmentation", "write_coco_demo"]

SPLITS = (("train", "train2017"), ("val", "val2017"))


@dataclass(frozen=True)
class CocoDemoSpec:
    """Size and seed of a COCO-layout demo set.

    ``image_size``: the largest side; each side is drawn in [0.75 * image_size, image_size].
    Objects whose visible part is smaller than ``min_area`` pixels are not annotated (they
    are hidden behind later objects).
    """

    num_classes: int = 4
    train_images: int = 200
    val_images: int = 50
    image_size: int = 160
    max_objects: int = 4
    clutter: int = 2
    backgrounds: int = 2
    min_area: int = 24
    seed: int = 0
    quality: int = 90

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.train_images < 1 or self.val_images < 1:
            raise ValueError(f"COCO demo needs num_classes, train_images, val_images >= 1: {self}")
        if self.image_size < 32 or self.max_objects < 1 or self.backgrounds < 1:
            raise ValueError(f"COCO demo needs image_size >= 32, max_objects >= 1, backgrounds >= 1: {self}")


def category_id(k: int) -> int:
    """COCO category id of class index k (0-based): 1, 3, 7, 13, 21, ... (not contiguous)."""
    return k * k + k + 1


def _row_convex_polygon(mask: np.ndarray) -> list[float] | None:
    """The pixel-edge outline of ``mask`` if it is one run per row over consecutive rows with
    overlapping runs (then pycocotools rasterises it back exactly); else None."""
    rows = np.flatnonzero(mask.any(1))
    if rows.size == 0 or rows[-1] - rows[0] + 1 != rows.size:
        return None
    left: list[float] = []
    right: list[float] = []
    prev: tuple[int, int] | None = None
    for y in rows:
        xs = np.flatnonzero(mask[y])
        x0, x1 = int(xs[0]), int(xs[-1]) + 1
        if x1 - x0 != xs.size:  # a gap: more than one run
            return None
        if prev is not None and (x0 >= prev[1] or prev[0] >= x1):
            return None
        prev = (x0, x1)
        left += [x0, y, x0, y + 1]
        right = [x1, y + 1, x1, y] + right
    return [float(v) for v in left + right]


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with 0s."""
    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def mask_to_segmentation(mask: np.ndarray, rle_kind: str = "compressed") -> tuple[Any, str]:
    """(COCO segmentation, kind): a polygon list when possible, else RLE of ``rle_kind``."""
    from pycocotools import mask as mask_utils

    poly = _row_convex_polygon(mask)
    if poly is not None:
        return [poly], "polygon"
    if rle_kind == "uncompressed":
        return _uncompressed_rle(mask), "uncompressed"
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}, "compressed"


def _render(spec: CocoDemoSpec, styles: dict, split: str, index: int):
    rng = _rng(spec.seed, "coco", split, index)
    lo = max(32, round(0.75 * spec.image_size))
    h, w = (int(v) for v in rng.integers(lo, spec.image_size + 1, size=2))
    background = spec.num_classes + int(rng.integers(spec.backgrounds))
    n_obj = int(rng.integers(1, spec.max_objects + 1))
    objects = [int(c) for c in rng.integers(0, spec.num_classes, size=n_obj)]
    clutter = int(rng.integers(0, spec.clutter + 1))
    return render_scene(rng, h, w, styles, background, objects=objects, clutter=clutter)


def write_coco_demo(
    out: str | os.PathLike[str],
    spec: CocoDemoSpec = CocoDemoSpec(),
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the COCO-layout demo set to ``out``; return its counts.

    An existing ``out`` raises ``FileExistsError`` unless ``overwrite``.
    """
    from pycocotools import mask as mask_utils

    out, tmp = staging_dir(out, overwrite)
    styles = {c: class_style(c, spec.seed) for c in range(spec.num_classes + spec.backgrounds)}
    categories = [
        {"id": category_id(k), "name": f"{FAMILIES[styles[k].family]}_{k}", "supercategory": "texture"}
        for k in range(spec.num_classes)
    ]
    counts: dict[str, Any] = {"num_classes": spec.num_classes}
    (tmp / "annotations").mkdir(parents=True)
    for split, folder in SPLITS:
        n_images = spec.train_images if split == "train" else spec.val_images
        (tmp / folder).mkdir()
        images, annotations = [], []
        kinds = {"polygon": 0, "compressed": 0, "uncompressed": 0}
        n_rle = 0
        for i in range(n_images):
            scene = _render(spec, styles, split, i)
            image_id = i + 1
            name = f"{image_id:012d}.jpg"
            Image.fromarray(scene.image, "RGB").save(tmp / folder / name, "JPEG", quality=spec.quality)
            h, w = scene.image.shape[:2]
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
            for c, m in zip(scene.classes, scene.masks):
                area = int(m.sum())
                if area < spec.min_area:
                    continue
                segm, kind = mask_to_segmentation(m, "compressed" if n_rle % 2 == 0 else "uncompressed")
                n_rle += kind != "polygon"
                kinds[kind] += 1
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id(c),
                    "segmentation": segm,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "area": float(area),
                    "iscrowd": 0,
                })
        doc = {
            "info": {"description": "mimscale COCO-format demo", "version": GENERATOR_VERSION},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        with open(tmp / "annotations" / f"instances_{folder}.json", "w") as f:
            json.dump(doc, f)
        counts[split] = {"images": len(images), "annotations": len(annotations), "segmentations": kinds}
    info = {
        "generator": "mimlib.data.demo_coco.write_coco_demo",
        "generator_version": GENERATOR_VERSION,
        "spec": asdict(spec),
        "counts": counts,
        "categories": categories,
    }
    publish_dataset(tmp, out, info)
    return counts
