"""Optimiser parameter groups.

No weight decay for 1-D parameters (norms), biases, and the SwinV2 / SimMIM parameters that
the reference lists by name. The reference pre-training code matches those names by prefix
and so decays ``cpb_mlp.*`` and ``logit_scale`` by mistake; here they are matched anywhere in
the parameter name, which is what the reference intended.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

NO_DECAY_KEYWORDS: tuple[str, ...] = (
    "mask_token",
    "absolute_pos_embed",
    "cpb_mlp",
    "logit_scale",
    "relative_position_bias_table",
)


def is_no_decay(name: str, param: torch.Tensor, keywords: Iterable[str] = NO_DECAY_KEYWORDS) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in keywords)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights and the no-decay set (see module doc)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if is_no_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def no_decay_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and is_no_decay(n, p)]
