"""Pre-training learning-rate schedule: per-iteration linear warmup, constant, step decay,
and the study's trunk/decay rule (the one place that knows "7/8 of a length").

A pure function of the iteration (never of how a run was cut into jobs), so a trunk at the
base lr plus a decay branch reproduces an uninterrupted run step for step. Torch-free: the
config, the workflow's rules, the plan and the analysis read the rule from here.
"""

from __future__ import annotations

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
