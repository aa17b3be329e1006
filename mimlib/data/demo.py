"""Embedded demo data: procedural images in real dataset layouts, no downloads.

One renderer, several layouts. :func:`render_scene` paints a *background* class texture,
optional flat "clutter" shapes and a list of *objects* (shapes filled with their class's
texture) and returns the image with per-object visible masks, so that

* classification (ImageNet layout, this module's :func:`write_classification_demo`) uses a
  scene whose background and objects are all one class (the scene's dominant class);
* detection / instance segmentation (COCO json) can take boxes and masks from
  :attr:`Scene.masks`;
* semantic segmentation (ADE20K png maps) can take :meth:`Scene.semantic_map`.

Each class is a texture family (stripes, checkerboard, rings, wavy stripes) with a
class-specific frequency, orientation and three-colour palette; each image draws its own
phase, scale, rotation jitter and colour jitter. Textures are smooth (sinusoids plus mild
noise), so local context predicts masked pixels and SimMIM has something to learn.

With ``hue_jitter`` (the ImageNet and iNat layouts) every textured region draws its own
palette around its class's hue, so colour is only a weak cue and a class is mostly its
*structure* (family and orientation; the period is drawn per image), as in natural images: a
classifier has to see stripes, not only hues. Flat "clutter"
shapes of random colour and place are each image's own content: where a mask hides one
whole, nothing visible implies it, so only a model that has seen (memorised) that image can
restore it — the paper's "remembering" as opposed to "reasoning".

Everything is drawn from numpy Generators seeded by SHA-256 of ``(seed, role, ids...)``:
a file's content depends only on the seed and its own position, and the same seed gives
byte-identical files (for a given Pillow/libjpeg build).
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "ClassStyle",
    "ClassificationDemoSpec",
    "FAMILIES",
    "Scene",
    "class_name",
    "class_style",
    "render_scene",
    "write_classification_demo",
]

FAMILIES = ("stripes", "waves", "checker", "rings", "spiral", "dots", "dashes")
#: A class's structure: (family, orientation). Orientations are 0 / 90 degrees (or 0 / 45 for
#: the checker and dot grids) so that a horizontal flip keeps the class, and the period is drawn
#: per image, so that a random resized crop (which rescales it) keeps the class too: what tells
#: classes apart survives the augmentations of pre-training and fine-tuning.
VARIANTS = ((0, 0.0), (0, np.pi / 2), (1, 0.0), (1, np.pi / 2), (2, 0.0), (2, np.pi / 4),
            (3, 0.0), (4, 0.0), (5, 0.0), (5, np.pi / 4), (6, 0.0), (6, np.pi / 2))
BASE_FREQ = 1 / 48  # cycles / px; images draw 0.7-1.4x (periods ~34-69 px)
GENERATOR_VERSION = 2  # bump when rendering changes, so cached demo sets can be told apart


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def class_name(i: int) -> str:
    """wnid-like folder name; zero padding makes sorted order equal label order."""
    return f"n{i:08d}"


@dataclass(frozen=True)
class ClassStyle:
    """Fixed look of one class: texture family, orientation (rad), frequency (cycles/px), palette."""

    family: int
    angle: float
    freq: float
    palette: np.ndarray = field(repr=False)  # (3, 3) float32 RGB in [0, 255]
    hue: float = 0.0  # the palette's main hue, in [0, 1)


def class_style(class_id: int, seed: int = 0) -> ClassStyle:
    """The style of ``class_id``; depends only on (seed, class_id) so every split agrees."""
    rng = _rng(seed, "class", class_id)
    # Golden-ratio hue steps keep neighbouring class ids far apart on the colour wheel.
    hue = (class_id * 0.618033988749895 + rng.uniform(0, 0.05)) % 1.0
    palette = []
    for dh, s, v in ((0.0, 0.75, 0.9), (0.08, 0.45, 0.45), (-0.1, 0.3, 0.7)):
        r, g, b = colorsys.hsv_to_rgb(
            (hue + dh) % 1.0, s * rng.uniform(0.8, 1.0), v * rng.uniform(0.85, 1.0)
        )
        palette.append((255 * r, 255 * g, 255 * b))
    family, angle = VARIANTS[class_id % len(VARIANTS)]
    return ClassStyle(
        family=family,
        angle=float(angle + rng.uniform(-0.05, 0.05)),
        freq=BASE_FREQ,  # each image scales it (see _texture): the period is not a class cue
        palette=np.asarray(palette, dtype=np.float32),
        hue=float(hue),
    )


def random_palette(rng: np.random.Generator, hue: float, hue_jitter: float) -> np.ndarray:
    """A three-colour palette around ``hue`` (plus a normal jitter of std ``hue_jitter``, in
    turns of the colour wheel) with the same light / dark / muted structure as the class
    palettes; saturation and value vary too."""
    hue = hue + rng.normal(0.0, hue_jitter)
    palette = []
    for dh, s, v in ((0.0, 0.75, 0.9), (0.08, 0.45, 0.45), (-0.1, 0.3, 0.7)):
        r, g, b = colorsys.hsv_to_rgb((hue + dh) % 1.0, s * rng.uniform(0.6, 1.0), v * rng.uniform(0.8, 1.0))
        palette.append((255 * r, 255 * g, 255 * b))
    return np.asarray(palette, dtype=np.float32)


def _texture(
    style: ClassStyle, rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray,
    palette: np.ndarray | None = None,
) -> np.ndarray:
    """Render ``style`` on the pixel grid ``ys, xs`` (float32, broadcastable) -> (h, w, 3) float32,
    in ``palette`` instead of the class's own when one is given."""
    angle = style.angle + rng.normal(0.0, 0.12)
    freq = style.freq * rng.uniform(0.7, 1.4)
    phase = rng.uniform(0, 2 * np.pi)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = xs * c + ys * s
    v = -xs * s + ys * c
    w = np.float32(2 * np.pi * freq)
    if style.family == 0:  # oriented stripes
        t = 0.5 + 0.5 * np.sin(w * u + phase)
    elif style.family == 1:  # wavy stripes
        t = 0.5 + 0.5 * np.sin(w * u + 2.0 * np.sin(0.4 * w * v) + phase)
    elif style.family == 2:  # soft checkerboard
        t = 0.5 + 0.5 * np.tanh(2.5 * np.sin(w * u + phase) * np.sin(w * v + phase))
    elif style.family in (3, 4):  # concentric rings / a three-armed spiral around a random centre
        cy = rng.uniform(ys.min(), ys.max() + 1)
        cx = rng.uniform(xs.min(), xs.max() + 1)
        r = np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2)
        arms = 3.0 * np.arctan2(ys - cy, xs - cx) if style.family == 4 else 0.0
        t = 0.5 + 0.5 * np.sin(w * r + arms + phase)
    elif style.family == 5:  # a grid of soft dots
        t = ((0.5 + 0.5 * np.sin(w * u + phase)) * (0.5 + 0.5 * np.sin(w * v + phase))) ** 0.7
    else:  # dashed stripes: stripes broken every other half period along their length
        t = 0.5 + 0.5 * np.sin(w * u + phase) * (0.5 + 0.5 * np.tanh(4 * np.sin(0.5 * w * v + phase)))
    t = np.broadcast_to(t, np.broadcast_shapes(ys.shape, xs.shape)).astype(np.float32)
    # A slow gradient towards the third colour adds low-frequency structure.
    g_angle = rng.uniform(0, 2 * np.pi)
    span = max(float(ys.max() - ys.min()), float(xs.max() - xs.min()), 1.0)
    g = (np.cos(g_angle) * xs + np.sin(g_angle) * ys) / span
    g = (g - g.min()) * np.float32(rng.uniform(0.2, 0.5))
    p = (style.palette if palette is None else palette) * rng.uniform(0.9, 1.1, size=(1, 3)).astype(np.float32)  # colour jitter
    img = p[0] * (1 - t)[..., None] + p[1] * t[..., None]
    img += (p[2] - img) * g[..., None]
    return img + np.float32(rng.uniform(-15, 15))  # brightness jitter


def _shape_mask(rng: np.random.Generator, h: int, w: int, frac: tuple[float, float]) -> np.ndarray:
    """A random ellipse, rectangle or triangle covering roughly ``frac`` of the short side."""
    size = rng.uniform(*frac) * min(h, w)
    ry, rx = size / 2 * rng.uniform(0.7, 1.3), size / 2 * rng.uniform(0.7, 1.3)
    cy, cx = rng.uniform(ry * 0.5, h - ry * 0.5), rng.uniform(rx * 0.5, w - rx * 0.5)
    yy, xx = np.ogrid[:h, :w]
    kind = rng.integers(3)
    if kind == 0:
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    if kind == 1:
        return (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
    # Triangle: intersection of three half-planes through points on the ellipse.
    a0 = rng.uniform(0, 2 * np.pi)
    pts = [(cy + ry * np.sin(a0 + k * 2.094), cx + rx * np.cos(a0 + k * 2.094)) for k in range(3)]
    mask = np.ones((h, w), dtype=bool)
    for (y0, x0), (y1, x1), (y2, x2) in zip(pts, pts[1:] + pts[:1], pts[2:] + pts[:2]):
        side = (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)
        ref = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
        mask &= side * np.sign(ref) >= 0
    return mask


@dataclass
class Scene:
    """A rendered image with what is in it.

    ``masks[i]`` is the *visible* part of object ``i`` (occlusion by later objects removed),
    ``classes[i]`` its class id; pixels in no mask belong to ``background_class``.
    """

    image: np.ndarray  # (h, w, 3) uint8
    background_class: int
    classes: list[int]
    masks: list[np.ndarray]

    def semantic_map(self) -> np.ndarray:
        """(h, w) int32 class ids: background plus objects."""
        sem = np.full(self.image.shape[:2], self.background_class, dtype=np.int32)
        for c, m in zip(self.classes, self.masks):
            sem[m] = c
        return sem

    def dominant_class(self) -> int:
        """The class covering the most pixels."""
        counts = np.bincount(self.semantic_map().ravel())
        return int(np.argmax(counts))


def render_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    styles: dict[int, ClassStyle],
    background_class: int,
    objects: list[int] | tuple[int, ...] = (),
    clutter: int = 0,
    noise: float = 2.0,
    hue_jitter: float | None = None,
    clutter_size: tuple[float, float] = (0.1, 0.25),
) -> Scene:
    """Render one scene of ``height x width``.

    ``objects`` are class ids painted in order (later ones occlude earlier ones) as shapes
    filled with their class texture; ``clutter`` flat-colour shapes (``clutter_size`` of the
    short side) are painted on the background first and count as background. ``hue_jitter``
    (turns of the colour wheel) gives every textured region its own palette around its class's
    hue (see the module doc); None keeps the class palettes.
    """
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]

    def palette(c: int) -> np.ndarray | None:
        return None if hue_jitter is None else random_palette(rng, styles[c].hue, hue_jitter)

    img = _texture(styles[background_class], rng, ys, xs, palette(background_class))
    for _ in range(clutter):
        m = _shape_mask(rng, height, width, clutter_size)
        img[m] = rng.uniform(40, 215, size=3).astype(np.float32)
    full_masks: list[np.ndarray] = []
    for c in objects:
        m = _shape_mask(rng, height, width, (0.3, 0.6))
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        if rows.size == 0:
            full_masks.append(m)
            continue
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        # Texture only inside the box: cheaper, and coordinates stay global so it lines up.
        patch = _texture(styles[c], rng, ys[y0:y1], xs[:, x0:x1], palette(c))
        sub = m[y0:y1, x0:x1]
        img[y0:y1, x0:x1][sub] = patch[sub]
        full_masks.append(m)
    visible: list[np.ndarray] = []
    covered = np.zeros((height, width), dtype=bool)
    for m in reversed(full_masks):
        visible.append(m & ~covered)
        covered |= m
    visible.reverse()
    # Uniform noise with std ``noise``: 5x cheaper to draw than Gaussian, looks the same.
    a = np.float32(noise * np.sqrt(3.0))
    img += (rng.random(size=img.shape, dtype=np.float32) * 2 - 1) * a
    # +0.5 then truncating cast == rounding for the clipped range, cheaper than np.rint.
    np.clip(img + np.float32(0.5), 0, 255, out=img)
    out = img.astype(np.uint8)
    return Scene(out, background_class, list(objects), visible)


@dataclass(frozen=True)
class ClassificationDemoSpec:
    """Size and seed of an ImageNet-layout demo set (image sides drawn in [min_size, max_size]).

    ``odd_files`` saves a few train images the way real ImageNet has them (a CMYK JPEG, a PNG
    named ``.JPEG``, a greyscale JPEG) to exercise the decoders end to end.
    """

    num_classes: int = 10
    train_per_class: int = 100
    val_per_class: int = 20
    min_size: int = 144
    max_size: int = 224
    seed: int = 0
    quality: int = 90
    odd_files: bool = False
    max_clutter: int = 4  # flat random shapes per image: 1..max_clutter (0 = none)
    hue_jitter: float = 0.1  # std of each region's hue around its class's (turns of the wheel)

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.train_per_class < 1 or self.val_per_class < 0:
            raise ValueError(f"demo spec needs num_classes, train_per_class >= 1: {self}")
        if not 8 <= self.min_size <= self.max_size:
            raise ValueError(f"demo spec needs 8 <= min_size <= max_size: {self}")


def _render_classification_image(spec: ClassificationDemoSpec, styles: dict[int, ClassStyle],
                                 split: str, c: int, k: int) -> Image.Image:
    rng = _rng(spec.seed, "classification", split, c, k)
    h, w = (int(v) for v in rng.integers(spec.min_size, spec.max_size + 1, size=2))
    n_obj = int(rng.integers(0, 3))
    clutter = int(rng.integers(1, spec.max_clutter + 1)) if spec.max_clutter else 0
    scene = render_scene(rng, h, w, styles, c, objects=[c] * n_obj, clutter=clutter,
                         hue_jitter=spec.hue_jitter)
    return Image.fromarray(scene.image, "RGB")


def _save(img: Image.Image, path: Path, quality: int, odd: str | None) -> None:
    if odd == "cmyk":
        img.convert("CMYK").save(path, "JPEG", quality=quality)
    elif odd == "png":
        img.save(path, "PNG")  # content PNG, name .JPEG, as in ImageNet's train set
    elif odd == "gray":
        img.convert("L").save(path, "JPEG", quality=quality)
    else:
        img.save(path, "JPEG", quality=quality, subsampling="4:2:0", optimize=False)


def write_classification_demo(
    out: str | os.PathLike[str],
    spec: ClassificationDemoSpec = ClassificationDemoSpec(),
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``<out>/{train,val}/<wnid>/*.JPEG`` plus ``<out>/demo.json``; return the counts.

    The set is built in ``<out>.tmp`` and renamed into place, so an interrupted run never
    leaves a half dataset at ``out``. An existing ``out`` raises ``FileExistsError`` unless
    ``overwrite``.
    """
    out, tmp = staging_dir(out, overwrite)
    styles = {c: class_style(c, spec.seed) for c in range(spec.num_classes)}
    odd_kinds = ("cmyk", "png", "gray")
    counts: dict[str, Any] = {"num_classes": spec.num_classes}
    for split, per_class in (("train", spec.train_per_class), ("val", spec.val_per_class)):
        n = 0
        for c in range(spec.num_classes):
            d = tmp / split / class_name(c)
            d.mkdir(parents=True)
            for k in range(per_class):
                img = _render_classification_image(spec, styles, split, c, k)
                odd = odd_kinds[c % 3] if spec.odd_files and split == "train" and k == 0 else None
                _save(img, d / f"{class_name(c)}_{split}_{k:05d}.JPEG", spec.quality, odd)
                n += 1
        counts[split] = n
    info = {
        "generator": "mimlib.data.demo.write_classification_demo",
        "generator_version": GENERATOR_VERSION,
        "spec": asdict(spec),
        "counts": counts,
        "classes": [class_name(c) for c in range(spec.num_classes)],
    }
    publish_dataset(tmp, out, info)
    return counts


def staging_dir(out: str | os.PathLike[str], overwrite: bool) -> tuple[Path, Path]:
    """(out, an empty ``<out>.tmp`` to build the set in); refuses an existing ``out`` unless
    ``overwrite``. A ``.tmp`` left by an interrupted run is cleared."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"demo dataset {str(out)!r} exists (pass overwrite=True)")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    return out, tmp


def publish_dataset(tmp: Path, out: Path, info: dict[str, Any] | None = None) -> None:
    """Move the finished ``tmp`` folder to ``out`` atomically, replacing an old set only once
    the new one is complete; ``info`` (if any) is written to ``demo.json`` first."""
    if info is not None:
        (tmp / "demo.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
