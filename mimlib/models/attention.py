"""SwinV2 window attention through ``scaled_dot_product_attention``.

timm's ``WindowAttention`` materialises the (windows, heads, N, N) attention matrix by hand.
The same maths -- cosine attention with a learned clamped logit scale, plus the
16*sigmoid(continuous position bias) and the shifted-window mask as an additive bias -- runs
through PyTorch's fused SDPA kernels on GPU (memory-efficient attention takes the bias).
Windows are folded into the head dimension so the per-window mask broadcasts over the batch
without being copied per image.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import WindowAttention
from torch import nn


class FusedWindowAttention(WindowAttention):
    """Drop-in replacement: same parameters and buffers, same outputs (to float rounding)."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b_, n, c = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = F.linear(x, weight=self.qkv.weight, bias=bias)
        q, k, v = qkv.reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        # Under autocast, normalize() and the fp32 logit scale promote q and k to float32;
        # bring them back to v's dtype or SDPA falls back to its (fp32) math kernel.
        q = (F.normalize(q, dim=-1) * scale).to(v.dtype)
        k = F.normalize(k, dim=-1).to(v.dtype)
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        # contiguous: GPU kernels need the bias's last dimension at stride 1; the permuted view
        # has stride num_heads, which sent every unshifted block to the (fp32) math kernel.
        rpb = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        rpb = 16 * torch.sigmoid(rpb)  # (heads, N, N)
        if mask is None:
            attn_bias = rpb.unsqueeze(0).to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=1.0)
        else:
            nw = mask.shape[0]
            heads = self.num_heads
            # (B*nW, h, N, d) -> (B, nW*h, N, d): the (nW*h, N, N) bias broadcasts over B.
            q, k, v = (t.reshape(b_ // nw, nw * heads, n, -1) for t in (q, k, v))
            attn_bias = (mask.unsqueeze(1) + rpb.unsqueeze(0)).reshape(1, nw * heads, n, n).to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=1.0)
            out = out.reshape(b_, heads, n, -1)
        if self.training and self.attn_drop.p > 0:
            raise NotImplementedError("attention dropout is not used by SimMIM/SwinV2 recipes")
        x = out.transpose(1, 2).reshape(b_, n, c)
        return self.proj_drop(self.proj(x))


def use_fused_attention(model: nn.Module) -> int:
    """Switch every timm SwinV2 ``WindowAttention`` in ``model`` to SDPA; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is WindowAttention:
            module.__class__ = FusedWindowAttention
            count += 1
    return count
