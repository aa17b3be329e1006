"""Every engine's learning rate, and the study's trunk/decay rule (the one place that
knows "7/8 of a length").

One mechanism, in the manner of MAE's ``util/lr_sched.py``: each schedule is a pure function
of the optimiser-update count ``k`` (0-based), never of how a run was cut into jobs, and
:func:`set_lr` writes it into the optimiser's groups (times a group's ``lr_scale``: layer
decay). So a trunk at the base lr plus a decay branch reproduces an uninterrupted run step
for step, and a resumed job continues its schedule exactly. The shapes are the references':

* :func:`step_lr` -- pre-training (SimMIM): linear warmup, constant, one step down;
* :func:`cosine_lr` -- classification: timm's ``CosineLRScheduler`` stepped per update with
  ``warmup_prefix=True`` (the same floating-point arithmetic, so the same values bit for bit);
* :func:`multistep_lr` -- detection: mmdetection's linear warmup ratio and steps at epochs;
* :func:`poly_lr` -- segmentation: mmcv's ``poly`` with its linear warmup ratio.

Torch-free: the config, the workflow's rules, the plan and the analysis read the decay rule
from here.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

#: The lr steps down (x ``decay_ratio``) after this fraction of a run (paper section 2.4:
#: 7/8 of 125K/250K/500K); the shared trunk is saved at these points.
DECAY_NUMERATOR, DECAY_DENOMINATOR = 7, 8


def decay_at(length: int) -> int:
    """Iteration of the lr step of a run of ``length`` iterations (where its branch starts)."""
    return length * DECAY_NUMERATOR // DECAY_DENOMINATOR


def branch_iters(length: int) -> int:
    """Iterations of the decay branch of a run of ``length`` iterations (after its trunk point)."""
    return length - decay_at(length)


def trunk_points(lengths: list[int]) -> list[int]:
    """Iterations at which the shared trunk is saved: the decay point of every length, ascending."""
    return sorted({decay_at(length) for length in lengths})


def length_problem(length: int) -> str | None:
    """Why ``length`` cannot be a run length (its decay point must be a whole iteration), or None."""
    if length % DECAY_DENOMINATOR:
        return (f"{length} is not divisible by {DECAY_DENOMINATOR} (the lr steps down at "
                f"{DECAY_NUMERATOR}/{DECAY_DENOMINATOR} of each length)")
    return None


def set_lr(optimizer: Any, lr: float) -> None:
    """Set update ``k``'s lr on every group of ``optimizer``, scaled by the group's ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def scaled_lr(lr_per_512: float, global_batch: int) -> float:
    """Linear scaling rule of the reference: lr is given per 512 images of global batch."""
    return lr_per_512 * global_batch / 512


def step_lr(
    iteration: int,
    base_lr: float,
    warmup_iters: int,
    warmup_lr: float,
    decay_at: int | None,
    decay_ratio: float = 0.1,
) -> float:
    """lr used for the optimiser step of ``iteration`` (0-based).

    Warmup rises linearly from ``warmup_lr`` (iteration 0) to ``base_lr`` (iteration
    ``warmup_iters``); from ``decay_at`` on (:func:`decay_at` of the run length; None for a trunk that
    never decays) the lr is ``base_lr * decay_ratio``.
    """
    if decay_at is not None and iteration >= decay_at:
        return base_lr * decay_ratio
    if iteration < warmup_iters:
        return warmup_lr + (base_lr - warmup_lr) * iteration / warmup_iters
    return base_lr


def cosine_lr(k: int, base_lr: float, total: int, warmup: int, warmup_lr: float, min_lr: float) -> float:
    """Classification: linear warmup from ``warmup_lr`` over ``warmup`` updates, then a half
    cosine from ``base_lr`` to ``min_lr`` over the remaining ``total - warmup`` updates.

    timm's ``CosineLRScheduler(t_initial=max(total - warmup, 1), warmup_t=warmup,
    warmup_prefix=True, cycle_limit=1, t_in_epochs=False)`` at ``step_update(k)``, written
    with its operations in its order so the values are identical.
    """
    if k < warmup:
        return warmup_lr + k * ((base_lr - warmup_lr) / warmup)
    t, t_i = k - warmup, max(total - warmup, 1)
    if t >= t_i:  # past the one cycle
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * float(t) / float(t_i)))


def multistep_lr(k: int, base_lr: float, warmup: int, warmup_ratio: float, milestones: Sequence[int],
                 gamma: float) -> float:
    """Detection (mmdetection): ``base_lr`` x ``gamma`` per milestone passed, times a linear
    warmup factor rising from ``warmup_ratio`` over the first ``warmup`` updates."""
    factor = 1.0
    if k < warmup:
        factor = warmup_ratio + (1 - warmup_ratio) * k / warmup
    n_steps = sum(k >= m for m in milestones)
    return base_lr * factor * gamma ** n_steps


def poly_lr(k: int, base_lr: float, total: int, warmup: int, warmup_ratio: float, min_lr: float = 0.0,
            power: float = 1.0) -> float:
    """Segmentation (mmcv's ``poly``): ``(base - min) * (1 - k/total)**power + min``; during
    the first ``warmup`` updates times ``1 - (1 - k/warmup) * (1 - warmup_ratio)``."""
    lr = (base_lr - min_lr) * (1 - k / total) ** power + min_lr
    if k < warmup:
        lr *= 1 - (1 - k / warmup) * (1 - warmup_ratio)
    return lr
