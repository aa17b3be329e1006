"""SimMIM random block masking: a coarse grid of mask cells upsampled to the token grid."""

from __future__ import annotations

import math

import torch

__all__ = ["MaskGenerator"]


class MaskGenerator:
    """Draw a SimMIM token mask.

    The image is cut into ``(input_size / mask_patch_size)**2`` cells; exactly
    ``ceil(mask_ratio * n_cells)`` of them are masked (a random permutation, so the count never
    varies), then each cell is repeated to cover ``mask_patch_size / model_patch_size`` tokens
    per side. At 192/32/4/0.6: 22 of 36 cells, a 48x48 token mask (61.1% masked).

    Randomness comes only from the ``torch.Generator`` passed in, so a mask is a pure function
    of the generator state (needed for fixed validation masks and resumable data order).
    """

    def __init__(
        self,
        input_size: int = 192,
        mask_patch_size: int = 32,
        model_patch_size: int = 4,
        mask_ratio: float = 0.6,
    ) -> None:
        if input_size % mask_patch_size:
            raise ValueError(
                f"input_size {input_size} is not divisible by mask_patch_size {mask_patch_size}"
            )
        if mask_patch_size % model_patch_size:
            raise ValueError(
                f"mask_patch_size {mask_patch_size} is not divisible by "
                f"model_patch_size {model_patch_size}"
            )
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio {mask_ratio} is outside [0, 1]")
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.rand_size = input_size // mask_patch_size  # cells per side
        self.scale = mask_patch_size // model_patch_size  # tokens per cell side
        self.token_size = input_size // model_patch_size  # tokens per side
        self.n_cells = self.rand_size**2
        # round() first so e.g. 0.7*10 = 7.000000000000001 does not become 8 cells.
        self.mask_count = int(math.ceil(round(self.n_cells * mask_ratio, 9)))

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return a (token_size, token_size) uint8 mask, 1 = masked."""
        idx = torch.randperm(self.n_cells, generator=generator)[: self.mask_count]
        cells = torch.zeros(self.n_cells, dtype=torch.uint8)
        cells[idx] = 1
        cells = cells.view(self.rand_size, self.rand_size)
        return cells.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)

    def __repr__(self) -> str:
        return (
            f"MaskGenerator(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio})"
        )
