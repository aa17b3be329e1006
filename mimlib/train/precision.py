"""The engines' one precision switch: the recipe's ``precision`` as an autocast context."""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch


def autocast_context(recipe: Mapping[str, Any], device: torch.device) -> contextlib.AbstractContextManager:
    """'auto' = bf16 autocast on CUDA, fp32 on CPU; 'bf16' / 'fp32' force one."""
    precision = recipe["precision"]
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
