"""Registry of SwinV2 encoder sizes (paper Table 1 plus two CPU demo sizes).

Kept free of torch/timm imports so that validating a config (which every Snakemake job
process does) stays fast; :mod:`mimlib.models.swinv2` builds the encoders.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SwinV2Spec", "MODELS", "register_model", "get_spec", "window_problems"]


@dataclass(frozen=True)
class SwinV2Spec:
    """Architecture of one SwinV2 size.

    ``paper_params_m`` is the backbone parameter count in millions as printed in Table 1
    (rounded there to whole millions); ``None`` for sizes the paper does not have.
    """

    name: str
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    paper_params_m: float | None = None

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"{self.name}: depths {self.depths} and num_heads {self.num_heads} differ in length"
            )
        for i, h in enumerate(self.num_heads):
            width = self.embed_dim * 2**i
            if width % h:
                raise ValueError(f"{self.name}: stage {i} width {width} not divisible by {h} heads")

    @property
    def num_features(self) -> int:
        """Channels of the last (stride-32 for 4 stages) feature map."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)


def _paper(name: str, embed: int, heads0: int, params_m: float) -> SwinV2Spec:
    # All five paper sizes share depths 2,2,18,2 and double the heads per stage (Table 1).
    return SwinV2Spec(name, embed, (2, 2, 18, 2), tuple(heads0 * 2**i for i in range(4)), params_m)


MODELS: dict[str, SwinV2Spec] = {
    s.name: s
    for s in (
        _paper("swinv2_s", 96, 3, 49.0),
        _paper("swinv2_b", 128, 4, 87.0),
        _paper("swinv2_l", 192, 6, 195.0),
        _paper("swinv2_h", 352, 11, 655.0),
        _paper("swinv2_g", 448, 14, 1061.0),
        # CPU demo sizes: same 4-stage shape (stride 32) so the SimMIM pipeline is unchanged,
        # small enough that a 128px batch of 16 trains in well under a second per step on one core.
        SwinV2Spec("swinv2_pico", 24, (1, 1, 2, 1), (1, 2, 4, 8), None),
        SwinV2Spec("swinv2_nano", 32, (1, 1, 3, 1), (2, 4, 8, 16), None),
        # The embedded demo's sizes: 3 stages (stride 16). SimMIM's linear decoder predicts a
        # 16x16 patch per token instead of 32x32, and at 96 px the last map is 6x6, not 3x3:
        # at the same cost per step the masked-pixel loss leaves the mean-colour plateau
        # 2-3x sooner (docs/measurements.md has the measured ratios).
        SwinV2Spec("swinv2_pico3", 24, (1, 1, 2), (1, 2, 4), None),
        SwinV2Spec("swinv2_nano3", 32, (1, 2, 2), (2, 4, 8), None),
    )
}


def register_model(spec: SwinV2Spec, overwrite: bool = False) -> SwinV2Spec:
    """Add a user-defined size to :data:`MODELS` (refuses to replace one unless ``overwrite``)."""
    if spec.name in MODELS and not overwrite and MODELS[spec.name] != spec:
        raise ValueError(f"model {spec.name!r} already registered as {MODELS[spec.name]}")
    MODELS[spec.name] = spec
    return spec


def get_spec(name: str) -> SwinV2Spec:
    """Look a size up by name; unknown names raise KeyError listing the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def window_problems(
    name: str, img_size: int, window_size: int, patch_size: int = 4, always_partition: bool = False
) -> list[str]:
    """Why the named model at ``img_size`` / ``window_size`` would not tile its feature maps.

    Stage ``i`` sees a map of ``img_size / patch_size / 2**i`` tokens a side. timm's SwinV2
    shrinks the window of a stage whose map is no larger than the window to the map (one
    window, no shift: the stride-32 stage of 192 px / window 12 is 6x6, as in the paper) but
    pads a map the window does not divide, so its attention sees padded tokens, which the
    reference never does. ``always_partition`` (timm) keeps the window even on small maps.
    An empty list means every stage is tiled exactly.
    """
    spec = get_spec(name)
    where = f"{name} at img_size {img_size} / window_size {window_size}"
    stride = patch_size * 2 ** (len(spec.depths) - 1)
    if img_size % stride:
        return [f"{where}: img_size {img_size} is not a multiple of the last stage's stride {stride} "
                f"(patch {patch_size}, {len(spec.depths)} stages)"]
    for i in range(len(spec.depths)):
        res = img_size // (patch_size * 2**i)
        window = window_size if always_partition else min(window_size, res)
        if res % window:
            return [f"{where}: the window does not tile stage {i} ({res}x{res} tokens; timm would pad it to "
                    f"{-(-res // window) * window}); use a window that divides {res}"
                    + ("" if always_partition else f", or one of at least {res}")]
    return []
