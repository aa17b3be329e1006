"""Pre-training learning-rate schedule: per-iteration linear warmup, constant, step decay.

A pure function of the iteration (never of how a run was cut into jobs), so a trunk at the
base lr plus a decay branch reproduces an uninterrupted run step for step.
"""

from __future__ import annotations


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
    ``warmup_iters``); from ``decay_at`` on (7/8 of the run length; None for a trunk that
    never decays) the lr is ``base_lr * decay_ratio``.
    """
    if decay_at is not None and iteration >= decay_at:
        return base_lr * decay_ratio
    if iteration < warmup_iters:
        return warmup_lr + (base_lr - warmup_lr) * iteration / warmup_iters
    return base_lr
