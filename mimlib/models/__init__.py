"""Models: SwinV2 size registry, SimMIM masking / model / decoders, reference import, FLOPs."""

from .decoders import DECODERS, TransformerDecoder, build_decoder, linear_decoder, register_decoder
from .flops import encoder_gflops
from .masking import MaskGenerator
from .reference import (
    REFERENCE_BUFFERS,
    CheckpointMismatchError,
    load_reference_checkpoint,
    to_reference_state_dict,
)
from .simmim import SimMIM, build_simmim, encoder_state_dict, normalize_targets
from .swinv2 import (
    MODELS,
    SwinV2Spec,
    backbone_param_count,
    build_encoder,
    get_spec,
    register_model,
)

__all__ = [
    "DECODERS",
    "TransformerDecoder",
    "build_decoder",
    "linear_decoder",
    "register_decoder",
    "encoder_gflops",
    "MaskGenerator",
    "REFERENCE_BUFFERS",
    "CheckpointMismatchError",
    "load_reference_checkpoint",
    "to_reference_state_dict",
    "SimMIM",
    "build_simmim",
    "encoder_state_dict",
    "normalize_targets",
    "MODELS",
    "SwinV2Spec",
    "backbone_param_count",
    "build_encoder",
    "get_spec",
    "register_model",
]
