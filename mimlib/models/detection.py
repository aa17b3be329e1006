"""Mask R-CNN (torchvision) on a SimMIM-pre-trained SwinV2 encoder (paper Table 13).

Layout of the model's parameters::

    backbone.body.encoder.*   timm SwinTransformerV2 (pre-trained; layer decay finds it here)
    backbone.body.norms.{0-3} a new LayerNorm per level (as the reference Swin detectors do)
    backbone.fpn.*            torchvision FeaturePyramidNetwork + LastLevelMaxPool
    rpn.*, roi_heads.*        torchvision's RPN and box / mask heads

The encoder is built for the *training* crop (1024 at paper scale) with
``strict_img_size=False``: timm fixes each stage's window and shift at construction from
``img_size`` (a stage no larger than the window uses window = resolution, shift 0), and with a
non-strict size it pads every stage to a window multiple and builds the shifted-window mask
from the padded map on each forward. A 1024 crop has stage resolutions 256/128/64/32, all
larger than window 14, so all stages keep window 14 and shift 7, and test images of any size
(800 x 1333 at paper scale) run with the same windows. The encoder's final norm and
classifier are removed (every level gets its own new LayerNorm instead), so every parameter
receives a gradient (DDP without ``find_unused_parameters``).

torchvision's ``GeneralizedRCNNTransform`` normalises and resizes. Training images are the
large-scale-jitter crops of :mod:`mimlib.data.coco`, already padded to the crop size: they pass
through at their size (:class:`DetectionTransform` skips the resize in training). In
evaluation images are resized so the short side is ``min_size`` and the long side at most
``max_size`` (800, 1333 at paper scale), and predictions are mapped back to the original size.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from timm.models.swin_transformer_v2 import SwinTransformerV2

from mimlib.models.pretrained import build_finetune_encoder

__all__ = [
    "ENCODER_PREFIX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DetectionTransform",
    "SwinV2Features",
    "SwinV2FPN",
    "build_mask_rcnn",
    "detection_param_summary",
]

ENCODER_PREFIX = "backbone.body.encoder."
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SwinV2Features(nn.Module):
    """Multi-scale maps of a timm SwinV2, one per stage: {'0': stride 4, '1': stride 8, ...}, NCHW.

    Each stage output goes through its own LayerNorm (channels last) before the transpose.
    """

    def __init__(self, encoder: SwinTransformerV2):
        super().__init__()
        # Unused by detection: the final norm (replaced by per-level norms) and the head.
        encoder.norm = nn.Identity()
        encoder.head = nn.Identity()
        self.encoder = encoder
        self.channels = [int(info["num_chs"]) for info in encoder.feature_info]
        self.strides = [int(info["reduction"]) for info in encoder.feature_info]
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        x = self.encoder.patch_embed(x)  # NHWC
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, (stage, norm) in enumerate(zip(self.encoder.layers, self.norms)):
            x = stage(x)
            out[str(i)] = norm(x).permute(0, 3, 1, 2).contiguous()
        return out


class SwinV2FPN(nn.Module):
    """SwinV2 features + FPN (a key per stage, '0', '1', ..., and 'pool'; ``out_channels`` each)."""

    def __init__(self, encoder: SwinTransformerV2, out_channels: int = 256):
        super().__init__()
        self.body = SwinV2Features(encoder)
        self.fpn = FeaturePyramidNetwork(self.body.channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.body(x))


class DetectionTransform(GeneralizedRCNNTransform):
    """Normalise always; resize only in evaluation (training crops arrive at their size)."""

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None):
        if self.training:
            return image, target
        return super().resize(image, target)


def build_mask_rcnn(
    model_name: str,
    checkpoint: Any,
    num_classes: int,
    img_size: int = 1024,
    window_size: int = 14,
    drop_path: float = 0.1,
    min_size: int = 800,
    max_size: int = 1333,
    *,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    mask_head_channels: int = 256,
    mask_head_convs: int = 4,
    rpn_batch_size_per_image: int = 256,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 1000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    box_batch_size_per_image: int = 512,
    box_detections_per_img: int = 100,
    box_score_thresh: float = 0.05,
    anchor_sizes: Sequence[int] | None = None,
    fused_attention: bool = True,
    grad_checkpointing: bool = False,
    trust_pickle: bool = False,
) -> tuple[MaskRCNN, dict[str, Any]]:
    """Mask R-CNN with a SwinV2 + FPN backbone; returns (model, encoder load info).

    ``checkpoint``: a mimscale / reference pre-training checkpoint (path or loaded dict), or
    None for random initialisation. ``num_classes`` counts the foreground classes (the
    background class 0 is added here). ``img_size`` is the training crop the encoder's windows
    are set up for; ``min_size`` / ``max_size`` the test resize. Defaults follow the reference
    Mask R-CNN (mmdetection's Swin configs): RPN 256 anchors per image, proposals 2000 -> 1000
    (train) and 1000 -> 1000 (test), 512 RoIs per image, 2-fc box head of 1024, 4-conv mask head
    of 256, anchors 32-512 over P2-P6 with ratios 0.5/1/2; the small-model demo shrinks them.
    """
    encoder, info = build_finetune_encoder(
        model_name, checkpoint, img_size=img_size, window_size=window_size,
        drop_path_rate=drop_path, trust_pickle=trust_pickle, strict_img_size=False,
    )
    if fused_attention:
        from mimlib.models.attention import use_fused_attention

        use_fused_attention(encoder)
    if grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    backbone = SwinV2FPN(encoder, fpn_channels)
    # One FPN level per encoder stage plus the max-pooled one (P2-P6 for the usual 4 stages).
    stage_names = [str(i) for i in range(len(encoder.layers))]
    levels = len(stage_names) + 1
    kw: dict[str, Any] = {}
    if anchor_sizes is not None:
        if len(anchor_sizes) != levels:
            raise ValueError(f"anchor_sizes needs one size per FPN level ({levels}), got {anchor_sizes}")
        kw["rpn_anchor_generator"] = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * levels)
    elif levels != 5:
        raise ValueError(f"{model_name} has {levels} FPN levels: give anchor_sizes, one per level")
    # torchvision's default poolers, on the levels this encoder has (its defaults read '0'-'3').
    kw["box_roi_pool"] = MultiScaleRoIAlign(stage_names, output_size=7, sampling_ratio=2)
    kw["mask_roi_pool"] = MultiScaleRoIAlign(stage_names, output_size=14, sampling_ratio=2)
    box_head = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
    mask_head = MaskRCNNHeads(fpn_channels, [mask_head_channels] * mask_head_convs, 1)
    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        box_batch_size_per_image=box_batch_size_per_image,
        box_detections_per_img=box_detections_per_img,
        box_score_thresh=box_score_thresh,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
        mask_head=mask_head,
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1),
        **kw,
    )
    t = model.transform
    model.transform = DetectionTransform(t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible)
    info = {**info, "img_size": img_size, "window_size": window_size,
            "stage_windows": [tuple(b.window_size) for b in _first_blocks(encoder)],
            "stage_shifts": [tuple(b.shift_size) for b in _first_blocks(encoder)]}
    return model, info


def _first_blocks(encoder: SwinTransformerV2) -> list[nn.Module]:
    return [stage.blocks[min(1, len(stage.blocks) - 1)] for stage in encoder.layers]


def detection_param_summary(model: nn.Module) -> Mapping[str, int]:
    """Parameter counts by part (encoder / per-level norms / FPN / RPN / RoI heads)."""
    parts = {"encoder": ENCODER_PREFIX, "norms": "backbone.body.norms.", "fpn": "backbone.fpn.",
             "rpn": "rpn.", "roi_heads": "roi_heads."}
    return {k: sum(p.numel() for n, p in model.named_parameters() if n.startswith(v)) for k, v in parts.items()}
