"""Models: SwinV2 size registry, SimMIM masking / model / decoders, reference import, FLOPs.

Names are imported lazily, so ``from mimlib.models.registry import MODELS`` (config
validation) does not pull in torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DECODERS": "decoders", "TransformerDecoder": "decoders", "build_decoder": "decoders",
    "linear_decoder": "decoders", "register_decoder": "decoders",
    "encoder_gflops": "flops",
    "TIMM_NAMES": "export", "export_cell": "export", "export_reference": "export", "export_timm": "export",
    "MaskGenerator": "masking",
    "REFERENCE_BUFFERS": "reference", "CheckpointMismatchError": "reference",
    "load_reference_checkpoint": "reference", "to_reference_state_dict": "reference",
    "SimMIM": "simmim", "build_simmim": "simmim", "encoder_state_dict": "simmim", "normalize_targets": "simmim",
    "MODELS": "registry", "SwinV2Spec": "registry", "get_spec": "registry", "register_model": "registry",
    "backbone_param_count": "swinv2", "build_encoder": "swinv2",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mimlib.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mimlib.models.{_EXPORTS[name]}"), name)
