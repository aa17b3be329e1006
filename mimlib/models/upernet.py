"""UPerNet on a SwinV2 encoder for ADE20K semantic segmentation (paper Table 14).

The decode head follows mmsegmentation's ``UPerHead`` and the auxiliary head its ``FCNHead``
(as in the Swin Transformer segmentation configs):

* PPM: adaptive average pools of scales (1, 2, 3, 6) on the stride-32 map, each a 1x1
  ConvModule to ``channels``, upsampled (bilinear) and concatenated with the map itself,
  then a 3x3 ConvModule ("bottleneck") to ``channels``;
* FPN: 1x1 lateral ConvModules on strides 4/8/16, top-down addition of the upsampled coarser
  level, 3x3 ConvModules on the three finer levels;
* all four levels upsampled to stride 4, concatenated, a 3x3 ConvModule ("fpn_bottleneck"),
  Dropout2d(0.1), 1x1 classifier (init normal std 0.01, bias 0, as mmseg);
* auxiliary FCN head on stage 3 (index 2, stride 16): one 3x3 ConvModule to 256 channels,
  Dropout2d(0.1), 1x1 classifier; its loss is weighted 0.4 by the engine.

ConvModule = conv (no bias) + BatchNorm + ReLU. mmseg trains with SyncBN across GPUs; here
the head uses plain ``BatchNorm2d`` and the engine converts it to ``SyncBatchNorm`` under
DDP when the recipe asks (``sync_bn``; with a micro-batch of 4 crops of 640 px per GPU the
per-GPU statistics are already over 4 x 160 x 160 positions, so this is optional).

The encoder is timm's SwinV2 at the task's crop size and window (window 20 at 640 px in the
paper; every stage of a 640 crop -- 160/80/40/20 tokens -- is a multiple of 20). Its stages
are run one by one and each output gets a LayerNorm before going to the head, as the
reference Swin segmentation backbone does (``norm0..norm3`` there): levels 0-2 get fresh
LayerNorms (``out_norms``), the last level reuses the encoder's own (pre-trained) final
norm, so no encoder parameter goes unused under DDP. The encoder's parameters live under
``encoder.`` (:data:`ENCODER_PREFIX`) for layer-wise lr decay; the fresh norms and both heads
sit outside it and get the last layer id (lr scale 1).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mimlib.models.pretrained import build_finetune_encoder

__all__ = [
    "ENCODER_PREFIX",
    "ConvModule",
    "PPM",
    "UPerHead",
    "FCNHead",
    "SegmentationModel",
    "build_upernet",
    "resize",
]

ENCODER_PREFIX = "encoder."


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize, align_corners=False (mmseg's ``resize`` as the heads use it)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Sequential):
    """conv (bias-free, as mmseg's bias='auto' with a norm) + BatchNorm + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, padding: int = 0):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")


class PPM(nn.ModuleList):
    """Pyramid pooling: one (adaptive pool -> 1x1 ConvModule) branch per scale."""

    def __init__(self, pool_scales: Sequence[int], in_ch: int, channels: int):
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_ch, channels, 1)) for s in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        return [resize(branch(x), x.shape[-2:]) for branch in self]


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, 0.0, 0.01)
    nn.init.zeros_(conv.bias)
    return conv


class UPerHead(nn.Module):
    """mmseg's UPerHead: PPM on the last level + FPN + fused stride-4 prediction."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        in_channels = list(in_channels)
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = _classifier(channels, num_classes)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(feats[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(feats[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([resize(o, size) for o in outs], dim=1))
        return self.conv_seg(self.dropout(fused))


class FCNHead(nn.Module):
    """mmseg's FCNHead with num_convs=1, concat_input=False: the auxiliary head."""

    def __init__(self, in_ch: int, channels: int, num_classes: int, in_index: int = 2, dropout: float = 0.1):
        super().__init__()
        self.in_index = in_index
        self.convs = ConvModule(in_ch, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = _classifier(channels, num_classes)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(feats[self.in_index])))


class SegmentationModel(nn.Module):
    """SwinV2 encoder + per-level LayerNorms + UPerHead (+ auxiliary FCNHead in training).

    ``forward(images)`` returns logits at the input resolution; in training mode with an
    auxiliary head it returns ``(logits, aux_logits)``, both at the input resolution.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, aux_head: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        dims = self.feature_channels(encoder)
        # Fresh norms for all levels but the last, which reuses the encoder's final norm.
        self.out_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims[:-1])
        self.head = head
        self.aux_head = aux_head

    @staticmethod
    def feature_channels(encoder: nn.Module) -> list[int]:
        return [int(info["num_chs"]) for info in encoder.feature_info]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """NCHW maps at strides 4, 8, 16, 32, each layer-normalised."""
        enc = self.encoder
        x = enc.patch_embed(images)  # NHWC
        feats = []
        last = len(enc.layers) - 1
        for i, stage in enumerate(enc.layers):
            x = stage(x)
            y = enc.norm(x) if i == last else self.out_norms[i](x)
            feats.append(y.permute(0, 3, 1, 2).contiguous())
        return feats

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(images)
        size = images.shape[-2:]
        logits = resize(self.head(feats), size)
        if self.training and self.aux_head is not None:
            return logits, resize(self.aux_head(feats), size)
        return logits


def build_upernet(
    model_name: str,
    checkpoint: str | os.PathLike | Mapping[str, Any] | None,
    num_classes: int,
    img_size: int,
    window_size: int,
    drop_path: float,
    channels: int = 512,
    aux_channels: int | None = 256,
    dropout: float = 0.1,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
    trust_pickle: bool = False,
) -> tuple[SegmentationModel, dict[str, Any]]:
    """UPerNet on a SwinV2 from ``checkpoint`` (a pre-trained cell; None = from scratch).

    ``img_size`` is the crop the model always sees (training crops and sliding windows);
    ``aux_channels=None`` leaves the auxiliary head out. Returns (model, loading info).
    """
    encoder, info = build_finetune_encoder(
        model_name, checkpoint, img_size=img_size, window_size=window_size,
        drop_path_rate=drop_path, trust_pickle=trust_pickle,
    )
    dims = SegmentationModel.feature_channels(encoder)
    head = UPerHead(dims, channels, num_classes, pool_scales=pool_scales, dropout=dropout)
    aux = FCNHead(dims[2], aux_channels, num_classes, in_index=2, dropout=dropout) if aux_channels else None
    return SegmentationModel(encoder, head, aux), info
