"""Deterministic pre-training data: sample order, augmentation, masks, global-batch slicing.

Every random choice for the sample at (iteration k, slot j of the global batch) is a pure
function of (seed, k, j): which image (an epoch-wise permutation of the manifest), its crop,
its flip and its mask. A run resumed at any iteration, with any number of loader workers or
any split of the global batch over processes and accumulation steps, sees the same batches.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from mimlib.data.decode import CorruptImageError, decode_for_crop, decode_rgb_tensor
from mimlib.data.sampling import stable_seed
from mimlib.models.masking import MaskGenerator

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_DECODE_ATTEMPTS = 16


class SampleOrder:
    """Position p of the endless sample stream -> manifest row, epoch by epoch without repeats."""

    def __init__(self, num_samples: int, seed: int, cache_epochs: int = 2):
        if num_samples <= 0:
            raise ValueError("cannot draw samples from an empty manifest")
        self.n = num_samples
        self.seed = seed
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_epochs = cache_epochs

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._cache.get(epoch)
        if perm is None:
            rng = np.random.Generator(np.random.PCG64(stable_seed(self.seed, "order", epoch)))
            perm = rng.permutation(self.n)
            self._cache[epoch] = perm
            while len(self._cache) > self._cache_epochs:
                self._cache.popitem(last=False)
        return perm

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        return int(self.permutation(epoch)[offset])


def pretrain_transform(recipe: dict[str, Any]) -> v2.Compose:
    """Table 10 / SimMIM augmentation: RandomResizedCrop(scale .67-1, ratio 3/4-4/3), flip 0.5."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(
                recipe["img_size"],
                scale=tuple(recipe["crop_scale"]),
                ratio=tuple(recipe["crop_ratio"]),
                interpolation=v2.InterpolationMode.BILINEAR,
                antialias=True,
            ),
            v2.RandomHorizontalFlip(0.5),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(img_size: int) -> v2.Compose:
    """Fixed resize (shorter side) + centre crop: the validation loss sees the same pixels always."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(img_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def mask_generator(recipe: dict[str, Any]) -> MaskGenerator:
    return MaskGenerator(
        input_size=recipe["img_size"],
        mask_patch_size=recipe["mask_patch_size"],
        model_patch_size=recipe["patch_size"],
        mask_ratio=recipe["mask_ratio"],
    )


class PretrainDataset(Dataset):
    """Indexed by (iteration, slot) keys; returns the augmented image, its mask, decode failures.

    A file that fails to decode is replaced by another draw that is itself a pure function of
    (seed, iteration, slot, attempt), so the global batch keeps its size and its determinism;
    the failure is reported back to the engine, which counts it and enforces the limit.
    """

    def __init__(self, manifest: pd.DataFrame, root: str | Path, recipe: dict[str, Any], seed: int):
        self.paths = [str(Path(root) / p) for p in manifest["path"]]
        self.recipe = recipe
        self.seed = seed
        self.global_batch = recipe["global_batch"]
        self.order = SampleOrder(len(self.paths), seed)
        self.transform = pretrain_transform(recipe)
        self.masks = mask_generator(recipe)

    def __len__(self) -> int:  # one epoch; the stream itself is endless
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        iteration, slot = key
        index = self.order(iteration * self.global_batch + slot)
        failed: list[str] = []
        for attempt in range(MAX_DECODE_ATTEMPTS):
            path = self.paths[index]
            try:
                # uint8 CHW; large JPEGs may be decoded at 1/2-1/8 scale when even the
                # smallest crop stays >= img_size (benchmarks/bench_decode.py: 1.6-1.85x).
                image = decode_for_crop(
                    path, self.recipe["img_size"], self.recipe["crop_scale"][0], self.recipe["crop_ratio"][0]
                )
                break
            except CorruptImageError as exc:
                log.warning("skipping unreadable image: %s", exc)
                failed.append(path)
                rng = np.random.Generator(np.random.PCG64(stable_seed(self.seed, "retry", iteration, slot, attempt)))
                index = int(rng.integers(len(self.paths)))
        else:
            raise RuntimeError(f"{MAX_DECODE_ATTEMPTS} unreadable images in a row, last: {failed[-1]}")
        sample_seed = stable_seed(self.seed, "sample", iteration, slot)
        # torchvision's transforms draw from the global RNG: fork it so this sample's crop and
        # flip depend on its own seed only, and the caller's RNG is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            tensor = self.transform(image)
        mask = self.masks(torch.Generator().manual_seed(stable_seed(self.seed, "mask", iteration, slot)))
        return {"image": tensor, "mask": mask, "failed": failed}


class ValidationDataset(Dataset):
    """Fixed crops and fixed per-image masks (seeded by the image's index) for the val loss."""

    def __init__(self, index: pd.DataFrame, root: str | Path, recipe: dict[str, Any], seed: int,
                 max_images: int | None = None):
        paths = [str(Path(root) / p) for p in index["path"]]
        if max_images is not None and max_images < len(paths):
            # Evenly spaced over the class-sorted index so every class stays represented.
            keep = np.linspace(0, len(paths) - 1, max_images).round().astype(int)
            paths = [paths[i] for i in keep]
        self.paths = paths
        self.seed = seed
        self.transform = eval_transform(recipe["img_size"])
        self.masks = mask_generator(recipe)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        mask = self.masks(torch.Generator().manual_seed(stable_seed(self.seed, "val-mask", i)))
        try:
            image = self.transform(decode_rgb_tensor(self.paths[i]))
        except CorruptImageError as exc:
            log.warning("validation image skipped: %s", exc)
            size = self.masks.input_size
            return {"image": torch.zeros(3, size, size), "mask": mask, "valid": False}
        return {"image": image, "mask": mask, "valid": True}


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
    }
    if "failed" in samples[0]:
        out["failed"] = [p for s in samples for p in s["failed"]]
    if "valid" in samples[0]:
        out["valid"] = torch.tensor([s["valid"] for s in samples])
    return out
