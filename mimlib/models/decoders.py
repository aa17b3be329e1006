"""Pluggable SimMIM decoders: stride-32 feature map (B, C, H/32, W/32) -> pixels (B, 3, H, W).

``linear`` is the SimMIM/paper default (1x1 conv to stride**2 * 3 channels + PixelShuffle); it
is an ``nn.Sequential`` so its keys are ``0.weight`` / ``0.bias``, the reference layout
(``decoder.0.*``).

``blocks4`` / ``blocks8`` are the heavier decoders of the paper's Table 8: k pre-norm ViT
blocks at the encoder's output width (8C, head dim 64, MLP ratio 4, qkv bias) over the
H/32 x W/32 tokens, a LayerNorm, then the same linear prediction. A fixed 2-D sin-cos position
embedding (no parameters) gives the attention positions. Parameter counts with SwinV2-B
(encoder + mask token + decoder) are 90.0M / 140.4M / 190.8M, as Table 8 prints, which is what
pins "block" to a plain ViT block (a SwinV2 block or a learned position table would not round
to those numbers).

Add another decoder with ``register_decoder("name", factory)`` (or as a decorator); the
factory is called as ``factory(in_chans, encoder_stride, out_chans, **kw)``.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block

__all__ = [
    "DECODERS",
    "DecoderFactory",
    "register_decoder",
    "build_decoder",
    "linear_decoder",
    "TransformerDecoder",
]


class DecoderFactory(Protocol):
    def __call__(
        self, in_chans: int, encoder_stride: int, out_chans: int = 3, **kw: Any
    ) -> nn.Module: ...


DECODERS: dict[str, DecoderFactory] = {}


def register_decoder(
    name: str, factory: DecoderFactory | None = None, overwrite: bool = False
) -> Callable[[DecoderFactory], DecoderFactory] | DecoderFactory:
    """Register ``factory`` under ``name``; without ``factory`` returns a decorator."""

    def _add(f: DecoderFactory) -> DecoderFactory:
        if name in DECODERS and not overwrite and DECODERS[name] is not f:
            raise ValueError(f"decoder {name!r} already registered")
        DECODERS[name] = f
        return f

    return _add(factory) if factory is not None else _add


def build_decoder(
    name: str, in_chans: int, encoder_stride: int, out_chans: int = 3, **kw: Any
) -> nn.Module:
    """Build the named decoder; unknown names raise KeyError listing the known ones."""
    try:
        factory = DECODERS[name]
    except KeyError:
        raise KeyError(f"unknown decoder {name!r}; known: {', '.join(sorted(DECODERS))}") from None
    return factory(in_chans, encoder_stride, out_chans, **kw)


def linear_decoder(in_chans: int, encoder_stride: int, out_chans: int = 3) -> nn.Sequential:
    """1x1 conv to stride**2 * out_chans channels, then PixelShuffle(stride)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, encoder_stride**2 * out_chans, kernel_size=1),
        nn.PixelShuffle(encoder_stride),
    )


register_decoder("linear", linear_decoder)


class TransformerDecoder(nn.Module):
    """``depth`` ViT blocks on the stride-32 tokens, then the linear prediction (Table 8)."""

    def __init__(
        self,
        in_chans: int,
        encoder_stride: int,
        out_chans: int = 3,
        depth: int = 4,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if in_chans % 4:
            raise ValueError(f"in_chans {in_chans} must be divisible by 4 for the sin-cos embedding")
        # Head dim 64 where the width allows it (1024 -> 16 heads for SwinV2-B).
        num_heads = num_heads or max(1, in_chans // 64)
        if in_chans % num_heads:
            raise ValueError(f"in_chans {in_chans} not divisible by num_heads {num_heads}")
        self.blocks = nn.ModuleList(
            [Block(in_chans, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(in_chans, eps=1e-6)
        self.pred = linear_decoder(in_chans, encoder_stride, out_chans)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # Same init as the SwinV2 encoder's linears (trunc-normal 0.02, zero bias).
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        pos = build_sincos2d_pos_embed([h, w], dim=c, device=x.device, dtype=x.dtype)
        t = x.flatten(2).transpose(1, 2) + pos.unsqueeze(0)
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        return self.pred(t.transpose(1, 2).reshape(b, c, h, w))


def _blocks(depth: int) -> DecoderFactory:
    def factory(in_chans: int, encoder_stride: int, out_chans: int = 3, **kw: Any) -> nn.Module:
        return TransformerDecoder(in_chans, encoder_stride, out_chans, depth=depth, **kw)

    return factory


register_decoder("blocks4", _blocks(4))
register_decoder("blocks8", _blocks(8))
