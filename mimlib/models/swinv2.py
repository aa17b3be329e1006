"""SwinV2 encoders of the registered sizes (:mod:`mimlib.models.registry`), built on timm.

Every encoder is timm's :class:`~timm.models.swin_transformer_v2.SwinTransformerV2` with
``num_classes=0``; this module only decides widths, depths and heads, so checkpoints stay in
timm's native key layout (downsampling at the *start* of stage ``i+1``).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from timm.models.swin_transformer_v2 import SwinTransformerV2

from mimlib.models.registry import MODELS, SwinV2Spec, get_spec, register_model, window_problems

__all__ = [
    "SwinV2Spec",
    "MODELS",
    "register_model",
    "get_spec",
    "window_problems",
    "build_encoder",
    "backbone_param_count",
]


def build_encoder(
    name: str,
    img_size: int = 192,
    window_size: int = 12,
    drop_path_rate: float = 0.1,
    pretrained_window_sizes: tuple[int, ...] | None = None,
    patch_size: int = 4,
    **kw: Any,
) -> SwinTransformerV2:
    """Build a headless timm SwinV2 encoder of the named size.

    ``drop_path_rate`` rises linearly over all blocks (timm does this per block, as the
    reference does). Extra keyword arguments go to timm (e.g. ``device='meta'``,
    ``strict_img_size=False``, ``always_partition=True``).

    A window that does not tile every stage's feature map at ``img_size`` (which timm would
    pad) raises ``ValueError`` naming the model, sizes and stage (:func:`window_problems`).
    With ``strict_img_size=False`` (detection: inputs of any size) padding is expected and
    not checked.
    """
    spec = get_spec(name)
    if kw.get("strict_img_size", True):
        problems = window_problems(name, img_size, window_size, patch_size, bool(kw.get("always_partition")))
        if problems:
            raise ValueError(problems[0])
    if pretrained_window_sizes is None:  # no pre-training windows: one 0 per stage
        pretrained_window_sizes = (0,) * len(spec.depths)
    if len(pretrained_window_sizes) != len(spec.depths):
        raise ValueError(
            f"pretrained_window_sizes {pretrained_window_sizes} needs {len(spec.depths)} entries"
        )
    kw.setdefault("num_classes", 0)
    return SwinTransformerV2(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=spec.embed_dim,
        depths=spec.depths,
        num_heads=spec.num_heads,
        window_size=window_size,
        drop_path_rate=drop_path_rate,
        pretrained_window_sizes=tuple(pretrained_window_sizes),
        **kw,
    )


def backbone_param_count(model: nn.Module) -> int:
    """Parameters of the bare backbone: no classifier head, decoder or mask token.

    Accepts a timm encoder or anything holding one as ``.encoder`` (e.g. SimMIM).
    """
    enc = getattr(model, "encoder", model)
    return sum(p.numel() for n, p in enc.named_parameters() if not n.startswith("head."))
