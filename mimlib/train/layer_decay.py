"""Layer-wise lr decay for fine-tuning SwinV2, with the reference's layer ids.

For depths (2, 2, 18, 2) there are 26 ids: patch embedding (and mask token) 0; block j of
stage i -> sum(depths[:i]) + j + 1; the patch merging that ends stage i (timm keeps it at the
start of stage i+1 as ``layers.{i+1}.downsample``) goes with stage i's last block; the final
norm, the head and anything outside the encoder (task heads, FPN, decoders) get the last id,
sum(depths) + 1 = 25. lr scale = decay ** (25 - id). timm's ``create_optimizer_v2(layer_decay=)``
groups differently (merging with the next stage, final norm at decay^1); mimscale follows the
reference because the paper's Tables 11-14 were tuned with it.
"""

from __future__ import annotations

import re
from typing import Sequence

from torch import nn

from mimlib.train.optim import is_no_decay

_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")
_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.")


def num_layer_ids(depths: Sequence[int]) -> int:
    return sum(depths) + 2


def layer_id(name: str, depths: Sequence[int], encoder_prefix: str = "") -> int:
    """Reference layer id of a parameter (``name`` relative to the model; encoder under prefix)."""
    last = sum(depths) + 1
    if not name.startswith(encoder_prefix):
        return last
    name = name[len(encoder_prefix):]
    if name.startswith(("patch_embed", "mask_token", "absolute_pos_embed")):
        return 0
    m = _BLOCK.match(name)
    if m:
        stage, block = int(m.group(1)), int(m.group(2))
        return sum(depths[:stage]) + block + 1
    m = _DOWNSAMPLE.match(name)
    if m:  # timm's stage i+1 downsample == the reference's end of stage i
        return sum(depths[: int(m.group(1))])
    return last


def layer_decay_param_groups(
    model: nn.Module,
    depths: Sequence[int],
    weight_decay: float,
    layer_decay: float,
    encoder_prefix: str = "",
) -> list[dict]:
    """AdamW groups keyed by (layer id, decay or not); each carries ``lr_scale``.

    Engines multiply the scheduled lr by ``group['lr_scale']`` every step.
    """
    last = sum(depths) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid = layer_id(name, depths, encoder_prefix)
        no_decay = is_no_decay(name, param)
        group = groups.setdefault(
            (lid, no_decay),
            {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (last - lid),
                "layer_id": lid,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]
