"""The end of every engine's update: apply it only if the loss and the gradients are finite."""

from __future__ import annotations

from pathlib import Path

import torch


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last good rolling checkpoint is kept."""


def checked_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_norm: torch.Tensor, job: str,
                 where: str, resume_dir: str | Path) -> None:
    """Step and clear the gradients, or -- when the (all-reduced, so rank-agreed) loss or the
    grad norm is NaN/inf -- raise without touching the weights, naming the job, the position
    and where the last good state is."""
    if not bool(torch.isfinite(loss).all()) or not bool(torch.isfinite(grad_norm)):
        shown = float(loss) if loss.numel() == 1 else [round(x, 6) for x in loss.tolist()]
        raise NonFiniteLossError(
            f"{job}: loss {shown} / grad norm {float(grad_norm)} at {where}; "
            f"the last good state is kept in {resume_dir}"
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
