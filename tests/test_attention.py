"""SDPA window attention (mimlib.models.attention) against timm's: same maths, and a bias that
GPU fused kernels accept (last dimension at stride 1; a permuted view sent 22 of SwinV2-B's 24
attention calls to the fp32 math kernel on an H100, docs/measurements.md)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from mimlib.models.attention import FusedWindowAttention, use_fused_attention
from mimlib.models.masking import MaskGenerator
from mimlib.models.simmim import build_simmim


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    # swinv2_nano (depths 1, 1, 3, 1) at 128 px / window 4: stage 3 (8 x 8 tokens, 8 heads) has
    # a shifted block, whose bias carries the shift mask; every other block has the bias alone
    timm_style = build_simmim("swinv2_nano", img_size=128, window_size=4, drop_path_rate=0.0)
    fused = copy.deepcopy(timm_style)
    assert use_fused_attention(fused) == 6
    return timm_style, fused


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 128, 128, generator=g)
    gen = MaskGenerator(128, 32, 4, 0.6)
    return images, torch.stack([gen(g) for _ in range(2)])


def test_fused_attention_matches_timm_in_loss_and_gradients() -> None:
    timm_style, fused = _models()
    assert any(isinstance(m, FusedWindowAttention) for m in fused.modules())
    assert not any(isinstance(m, FusedWindowAttention) for m in timm_style.modules())
    images, masks = _batch()
    losses = []
    for model in (timm_style, fused):
        loss = model(images, masks)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    ga = dict(timm_style.named_parameters())
    for name, p in fused.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ga[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_every_bias_reaching_sdpa_has_unit_last_stride(monkeypatch) -> None:
    _, fused = _models()
    original = F.scaled_dot_product_attention
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((tuple(attn_mask.shape), attn_mask.stride()))
        return original(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    fused(*_batch())
    assert len(seen) == 6
    assert sum(shape[1] == 4 * 8 for shape, _ in seen) == 1, seen  # the shifted block: 4 windows x 8 heads
    for shape, stride in seen:
        assert stride[-1] == 1, (shape, stride)
        assert stride[-2] == shape[-1], (shape, stride)  # rows packed too: a plain (.., N, N) layout
