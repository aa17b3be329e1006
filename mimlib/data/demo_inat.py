"""Embedded iNaturalist-2018-format demo set: long-tailed, procedural, no downloads.

Layout (that of the real iNat 2018 release)::

    <out>/train_val2018/<supercategory>/<category_id>/<image_id>.jpg
    <out>/train2018.json, <out>/val2018.json   # COCO-style: images, annotations, categories

Images come from the same renderer as the ImageNet demo (:func:`mimlib.data.demo.render_scene`)
but with other class styles (class ids offset by :data:`STYLE_OFFSET`), so it is a different
task. Train counts per class follow a Zipf law (class of rank ``r`` gets
``max_train_per_class / (r + 1)`` images, at least ``min_train_per_class``; ranks are a
seeded permutation of the classes), val has ``val_per_class`` images of every class, as the
real val set is (nearly) balanced. Everything depends only on the spec; the set is written
into ``<out>.tmp`` and renamed into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mimlib.data.demo import _rng, class_style, publish_dataset, render_scene, staging_dir

__all__ = ["InatDemoSpec", "STYLE_OFFSET", "SUPERCATEGORIES", "train_counts", "write_inat_demo"]

GENERATOR_VERSION = 1
#: Class ``c`` of this set is rendered with ``class_style(STYLE_OFFSET + c)``.
STYLE_OFFSET = 1000
SUPERCATEGORIES = ("Plantae", "Insecta", "Aves", "Fungi", "Reptilia", "Mammalia")


@dataclass(frozen=True)
class InatDemoSpec:
    num_classes: int = 12
    max_train_per_class: int = 60
    min_train_per_class: int = 4
    val_per_class: int = 5
    min_size: int = 112
    max_size: int = 160
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.val_per_class < 0:
            raise ValueError(f"inat demo spec needs num_classes >= 1, val_per_class >= 0: {self}")
        if not 2 <= self.min_train_per_class <= self.max_train_per_class:
            raise ValueError(f"inat demo spec needs 2 <= min_train_per_class <= max_train_per_class: {self}")
        if not 8 <= self.min_size <= self.max_size:
            raise ValueError(f"inat demo spec needs 8 <= min_size <= max_size: {self}")


def train_counts(spec: InatDemoSpec) -> list[int]:
    """Train images of each category id (Zipf over a seeded ranking of the classes)."""
    ranks = _rng(spec.seed, "inat-ranks").permutation(spec.num_classes)
    return [max(spec.min_train_per_class, round(spec.max_train_per_class / (int(r) + 1))) for r in ranks]


def _supercategory(c: int) -> str:
    return SUPERCATEGORIES[c % len(SUPERCATEGORIES)]


def _render(spec: InatDemoSpec, styles: dict, split: str, c: int, k: int) -> Image.Image:
    rng = _rng(spec.seed, "inat", split, c, k)
    h, w = (int(v) for v in rng.integers(spec.min_size, spec.max_size + 1, size=2))
    sid = STYLE_OFFSET + c
    scene = render_scene(rng, h, w, styles, sid, objects=[sid] * int(rng.integers(0, 3)),
                         clutter=int(rng.integers(1, 5)), hue_jitter=0.1)
    return Image.fromarray(scene.image, "RGB")


def write_inat_demo(out: str | os.PathLike[str], spec: InatDemoSpec = InatDemoSpec(), *,
                    overwrite: bool = False) -> dict[str, Any]:
    """Write the set (see the module doc); return ``{"num_classes", "train", "val"}``.

    An existing ``out`` raises ``FileExistsError`` unless ``overwrite``.
    """
    out, tmp = staging_dir(out, overwrite)
    styles = {STYLE_OFFSET + c: class_style(STYLE_OFFSET + c, spec.seed) for c in range(spec.num_classes)}
    categories = [{"id": c, "name": f"species_{c:04d}", "supercategory": _supercategory(c)}
                  for c in range(spec.num_classes)]
    per_class = {"train": train_counts(spec), "val": [spec.val_per_class] * spec.num_classes}
    image_id, ann_id = 0, 1  # ids unique across both files, as in the real release
    counts: dict[str, Any] = {"num_classes": spec.num_classes}
    for split, json_name in (("train", "train2018.json"), ("val", "val2018.json")):
        images, annotations = [], []
        for c in range(spec.num_classes):
            rel_dir = Path("train_val2018") / _supercategory(c) / str(c)
            (tmp / rel_dir).mkdir(parents=True, exist_ok=True)
            for k in range(per_class[split][c]):
                img = _render(spec, styles, split, c, k)
                rel = (rel_dir / f"{image_id}.jpg").as_posix()
                img.save(tmp / rel, "JPEG", quality=90, subsampling="4:2:0", optimize=False)
                images.append({"id": image_id, "file_name": rel, "width": img.width, "height": img.height})
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": c})
                image_id += 1
                ann_id += 1
        doc = {
            "info": {"description": "mimscale iNaturalist-2018-format demo set",
                     "generator": "mimlib.data.demo_inat.write_inat_demo",
                     "generator_version": GENERATOR_VERSION, "spec": asdict(spec)},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (tmp / json_name).write_text(json.dumps(doc) + "\n")
        counts[split] = len(images)
    publish_dataset(tmp, out)
    return counts
