"""SimMIM on a timm SwinV2 encoder: mask token after patch embedding, decoder, masked-pixel loss.

State-dict layout (ours): ``encoder.*`` (timm's native SwinV2 keys), ``mask_token`` (1, 1, C),
``decoder.*``. :mod:`mimlib.models.reference` converts to and from the reference layout
(microsoft/Swin-Transformer), where the token lives at ``encoder.mask_token``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.swin_transformer_v2 import SwinTransformerV2

from .decoders import build_decoder
from .swinv2 import build_encoder, get_spec

__all__ = ["SimMIM", "build_simmim", "normalize_targets", "encoder_state_dict"]

LossName = Literal["l1", "l2"]


def _window_counts(n: int, window: int, device: torch.device) -> torch.Tensor:
    """How many positions of a length-``n`` axis a centred window covers (borders truncated)."""
    r = window // 2
    i = torch.arange(n, device=device)
    return (torch.clamp(i + r, max=n - 1) - torch.clamp(i - r, min=0) + 1).to(torch.float64)


def _box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over the window x window neighbourhood (zero padding), as two 1-D passes.

    Same result as one 2-D ``avg_pool2d(count_include_pad=False)`` times the count (what the
    reference does), but O(2k) instead of O(k^2) per pixel: at k=47 that is ~20x faster,
    which matters on CPU (2.3 s -> 0.1 s for a 16x3x128x128 batch on one core).
    """
    pad = window // 2
    s = F.avg_pool2d(x, (window, 1), stride=1, padding=(pad, 0), count_include_pad=True)
    s = F.avg_pool2d(s, (1, window), stride=1, padding=(0, pad), count_include_pad=True)
    return s * (window * window)


def normalize_targets(x: torch.Tensor, window: int = 47) -> torch.Tensor:
    """Normalise each pixel by the mean / std of its ``window x window`` neighbourhood.

    Per channel, stride 1, padding ``window // 2``; the padding is not counted (the mean and
    the unbiased variance use only the pixels inside the image), the variance is clamped at 0
    and ``(x - mean) / sqrt(var + 1e-6)`` is returned. Half-precision input is computed in
    float32 (the E[x^2] - E[x]^2 form loses too much in 16 bits).
    """
    if window < 3 or window % 2 == 0:
        raise ValueError(f"window must be odd and >= 3, got {window}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    h, w = x.shape[-2:]
    # Exact in-image pixel count of each window: rows covered x columns covered.
    n = _window_counts(h, window, x.device)[:, None] * _window_counts(w, window, x.device)[None, :]
    n = n.to(x.dtype)
    mean = _box_sum(x, window) / n
    sq_mean = _box_sum(x * x, window) / n
    var = ((sq_mean - mean * mean) * (n / (n - 1))).clamp(min=0.0)
    return (x - mean) / torch.sqrt(var + 1e-6)


class SimMIM(nn.Module):
    """SimMIM pre-training model.

    Args:
        encoder: headless timm SwinV2 (``num_classes=0``).
        decoder: a registered decoder name or a module mapping (B, 8C, H/32, W/32) to (B, 3, H, W).
        loss: ``'l1'`` (reference code, default) or ``'l2'`` (the paper's text).
        norm_target_window: window of the per-pixel target normalisation; ``None`` = raw
            (ImageNet-normalised) pixels as targets.
    """

    def __init__(
        self,
        encoder: SwinTransformerV2,
        decoder: str | nn.Module = "linear",
        loss: LossName = "l1",
        norm_target_window: int | None = 47,
    ) -> None:
        super().__init__()
        if loss not in ("l1", "l2"):
            raise ValueError(f"loss must be 'l1' or 'l2', got {loss!r}")
        if norm_target_window is not None and (norm_target_window < 3 or norm_target_window % 2 == 0):
            raise ValueError(f"norm_target_window must be odd and >= 3, got {norm_target_window}")
        self.encoder = encoder
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        self.in_chans = int(encoder.in_chans)
        self.embed_dim = int(encoder.patch_embed.proj.out_channels)
        self.num_features = int(encoder.num_features)
        # Each stage after the first halves the resolution.
        self.encoder_stride = self.patch_size * 2 ** (len(encoder.layers) - 1)
        self.loss_name: LossName = loss
        self.norm_target_window = norm_target_window
        # (1, 1, C) as in the reference; broadcasts over timm's NHWC token map.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02)
        if isinstance(decoder, str):
            decoder = build_decoder(decoder, self.num_features, self.encoder_stride, self.in_chans)
        self.decoder = decoder

    # ----------------------------------------------------------------- network
    def forward_features(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode with masked tokens replaced; returns the NCHW stride-32 map after the final norm."""
        x = self.encoder.patch_embed(images)  # (B, H/4, W/4, C), includes the patch LayerNorm
        if mask.shape != x.shape[:3]:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match the token grid {tuple(x.shape[:3])}"
            )
        w = mask.to(x.dtype).unsqueeze(-1)
        x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        x = self.encoder.layers(x)
        x = self.encoder.norm(x)
        return x.permute(0, 3, 1, 2).contiguous()

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted (normalised-target space) image, (B, 3, H, W)."""
        return self.decoder(self.forward_features(images, mask))

    # ----------------------------------------------------------------- loss
    def pixel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Token mask (B, h, w) -> pixel mask (B, 1, h*p, w*p) in float32."""
        p = self.patch_size
        return mask.float().repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction targets (float32): the input, optionally locally normalised."""
        x = images.float()
        if self.norm_target_window is not None:
            x = normalize_targets(x, self.norm_target_window)
        return x

    def loss_map(
        self, images: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel masked loss (B, 3, H, W) and the pixel mask (B, 1, H, W), both float32."""
        rec = self.reconstruct(images, mask).float()  # loss in fp32 even under autocast
        return self._masked_loss(self.targets(images), rec, mask)

    def _masked_loss(
        self, target: torch.Tensor, rec: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fn = F.l1_loss if self.loss_name == "l1" else F.mse_loss
        m = self.pixel_mask(mask)
        return fn(target, rec, reduction="none") * m, m

    def loss_from_reconstruction(
        self, target: torch.Tensor, rec: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Batch loss for a given target / reconstruction pair (exposed for tests and figures)."""
        lm, m = self._masked_loss(target.float(), rec.float(), mask)
        return lm.sum() / (m.sum() + 1e-5) / self.in_chans

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scalar loss, the reference formula: sum(loss * m) / (sum(m) + 1e-5) / in_chans."""
        lm, m = self.loss_map(images, mask)
        return lm.sum() / (m.sum() + 1e-5) / self.in_chans

    def forward_losses(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) per-image losses, same formula per image (used for the validation loss)."""
        return self._per_image(*self.loss_map(images, mask))

    def _per_image(self, lm: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return lm.sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) + 1e-5) / self.in_chans

    def trivial_losses(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) per-image losses of a predictor that learns nothing: every masked pixel is the
        image's mean visible colour (per channel, in target space). The yardstick for what
        a model's validation loss has learned beyond the image's overall colour."""
        target = self.targets(images)
        visible = 1.0 - self.pixel_mask(mask)
        mean = (target * visible).sum(dim=(2, 3), keepdim=True) / (visible.sum(dim=(2, 3), keepdim=True) + 1e-5)
        return self._per_image(*self._masked_loss(target, mean.expand_as(target), mask))


def build_simmim(
    model_name: str,
    img_size: int = 192,
    window_size: int = 12,
    drop_path_rate: float = 0.1,
    decoder: str = "linear",
    loss: LossName = "l1",
    norm_target_window: int | None = 47,
    **encoder_kw: Any,
) -> SimMIM:
    """Encoder from the registry + SimMIM head. ``img_size`` must be a multiple of the stride."""
    # Check before building: the decoder's PixelShuffle needs an exact stride-32 map.
    stride = encoder_kw.get("patch_size", 4) * 2 ** (len(get_spec(model_name).depths) - 1)
    if img_size % stride:
        raise ValueError(f"img_size {img_size} is not a multiple of the encoder stride {stride}")
    encoder = build_encoder(
        model_name,
        img_size=img_size,
        window_size=window_size,
        drop_path_rate=drop_path_rate,
        **encoder_kw,
    )
    return SimMIM(encoder, decoder=decoder, loss=loss, norm_target_window=norm_target_window)


def encoder_state_dict(model: SimMIM) -> dict[str, torch.Tensor]:
    """Encoder weights only (timm keys, no ``encoder.`` prefix, no mask token / decoder).

    Loads into a timm ``SwinTransformerV2`` of the same size for fine-tuning (strict apart
    from the classifier ``head.fc.*``); timm's position tables are non-persistent buffers,
    so the image and window size may differ.
    """
    return {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
