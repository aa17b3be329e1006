"""Encoder FLOPs with fvcore (one multiply-add = 1 FLOP, the convention of the paper's "~9G to ~190G").

fvcore traces timm's SwinV2 cleanly: the cosine-attention matmuls (``q @ k^T``, ``attn @ v``)
are counted as ``matmul``, the linears (incl. the continuous-position-bias MLP, which runs once
per block) as ``linear``, plus patch-embed conv and LayerNorms. Element-wise ops (normalize,
softmax, GELU, sigmoid, adds) are not counted, as in fvcore's default handle set; nothing is
patched. Measured: S 6.83 G @192/w12, 9.54 G @224/w14; B 11.88 G @192/w12.
"""

from __future__ import annotations

import logging
import warnings
from functools import lru_cache

import torch

from .swinv2 import build_encoder

__all__ = ["encoder_gflops"]


@lru_cache(maxsize=None)
def encoder_gflops(name: str, img_size: int = 192, window_size: int = 12) -> float:
    """GFLOPs of one forward pass of the bare encoder on a single image (fvcore count / 1e9)."""
    with warnings.catch_warnings():
        # fvcore's import touches the deprecated torch.jit.script; not our concern here.
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    # Build without initialising 1e9 weights (SwinV2-g): allocate on meta, then empty CPU
    # storage, then recompute only the buffers the forward indexes with. Values do not
    # matter for counting, shapes do. (Tracing directly on meta fails inside conv2d's meta
    # kernel under the JIT tracer.)
    with torch.device("meta"):
        model = build_encoder(name, img_size=img_size, window_size=window_size, drop_path_rate=0.0)
    model = model.to_empty(device="cpu").eval()
    for m in model.modules():
        init = getattr(m, "init_non_persistent_buffers", None)
        if init is not None:
            init()
    x = torch.zeros(1, model.in_chans, img_size, img_size)
    # fvcore logs a warning per unsupported (element-wise) op; they are 0 FLOPs by convention.
    logger = logging.getLogger("fvcore.nn.jit_analysis")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python-int shapes
            fca = FlopCountAnalysis(model, x)
            fca.unsupported_ops_warnings(False)
            fca.uncalled_modules_warnings(False)
            fca.tracer_warnings("none")
            total = fca.total()
    finally:
        logger.setLevel(level)
    return total / 1e9
