"""Which sample fills which slot of which global batch: the one batch sampler of every engine.

An engine's update ``k`` takes a global batch of ``B`` slots. Micro-step ``a`` of rank ``r``
(``W`` ranks, ``m`` images per micro-batch) takes slots ``[a*W*m + r*m, a*W*m + (r+1)*m)``, so
the union over ranks and micro-steps is always the whole global batch and the batches do not
depend on the number of GPUs. What a slot holds is the engine's ``key(k, slot)``: pre-training
and segmentation key their samples by ``(k, slot)`` and draw everything from it;
classification and detection go through the dataset in epochs (:class:`EpochOrder`).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterator

import numpy as np
from torch.utils.data import Sampler


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (never Python's salted ``hash``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-steps per update so that the global batch does not depend on the GPU count (every
    engine's batches: pre-training, classification, detection, segmentation)."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ValueError(
            f"global_batch {global_batch} is not a multiple of micro_batch {micro_batch} x world_size {world_size}"
            f" = {per_step}"
        )
    return global_batch // per_step


def slot_key(k: int, slot: int) -> tuple[int, int]:
    return k, slot


class GlobalBatchSampler(Sampler[list[Any]]):
    """This rank's micro-batches of ``key(k, slot)`` for updates ``[start, end)``."""

    def __init__(self, start: int, end: int, global_batch: int, micro_batch: int, rank: int = 0,
                 world_size: int = 1, key: Callable[[int, int], Any] = slot_key):
        self.start, self.end = start, end
        self.micro = micro_batch
        self.rank, self.world = rank, world_size
        self.accum = accumulation_steps(global_batch, micro_batch, world_size)
        self.key = key

    def __len__(self) -> int:
        return max(self.end - self.start, 0) * self.accum

    def __iter__(self) -> Iterator[list[Any]]:
        w, m = self.world, self.micro
        for k in range(self.start, self.end):
            for a in range(self.accum):
                base = a * w * m + self.rank * m
                yield [self.key(k, base + i) for i in range(m)]


class EpochOrder:
    """Slot ``s`` of update ``k`` -> an image index, epoch by epoch: epoch ``e = k // updates_per_epoch``
    is a permutation of the images seeded by ``(seed, tag, e)``; its last incomplete global batch
    is dropped (so every update has ``global_batch`` distinct images)."""

    def __init__(self, num_images: int, global_batch: int, seed: int, tag: str, what: str = "training set"):
        if num_images < global_batch:
            raise ValueError(f"{what} of {num_images} images cannot fill a global batch of {global_batch}")
        self.n, self.global_batch, self.seed, self.tag = num_images, global_batch, seed, tag
        self.updates_per_epoch = num_images // global_batch
        self._perm: tuple[int, np.ndarray] | None = None

    def epoch(self, k: int) -> int:
        return k // self.updates_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng(stable_seed(self.seed, self.tag, epoch))
            self._perm = (epoch, rng.permutation(self.n))
        return self._perm[1]

    def __call__(self, k: int, slot: int) -> int:
        epoch, u = divmod(k, self.updates_per_epoch)
        return int(self.permutation(epoch)[u * self.global_batch + slot])
