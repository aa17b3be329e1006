"""Load a pre-trained SimMIM encoder for fine-tuning, at the task's image and window size.

Accepts mimscale's cell checkpoints (``results/pretrain/.../checkpoint.pt``) and checkpoints
written by the reference implementation (microsoft/Swin-Transformer SimMIM). The decoder and
the mask token are dropped. timm keeps the position tables and attention masks as
non-persistent buffers, so a 192/w12 state loads strictly into a 224/w14 or w20 model; the
continuous position bias must still be told the pre-training windows
(``pretrained_window_sizes``) so its coordinates are normalised as during pre-training.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2

from mimlib.models.checkpoint_io import CheckpointError, describe_keys, read_checkpoint
from mimlib.models.reference import CheckpointMismatchError, load_reference_checkpoint, reference_state_dict
from mimlib.models.simmim import build_simmim, encoder_state_dict
from mimlib.models.swinv2 import build_encoder, get_spec


def stage_windows(img_size: int, window_size: int, depths_len: int = 4, patch_size: int = 4) -> tuple[int, ...]:
    """The window each stage really uses: clipped to the stage's resolution (timm, reference)."""
    res = img_size // patch_size
    return tuple(min(window_size, res // 2**i) for i in range(depths_len))


def read_encoder_state(
    checkpoint: str | os.PathLike | Mapping[str, Any], model_name: str, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(encoder state dict with timm keys, info) from a mimscale or reference checkpoint.

    A file that is missing, empty, not a PyTorch checkpoint, not a dict, or a dict in none of
    the :data:`~mimlib.models.checkpoint_io.LAYOUTS` raises a CheckpointError naming it.
    """
    if isinstance(checkpoint, Mapping):
        state, name = checkpoint, "the checkpoint dict"
    else:
        state, name = read_checkpoint(checkpoint, trust_pickle=trust_pickle), os.fspath(checkpoint)
    if "model_name" in state and "recipe" in state:  # a mimscale checkpoint
        if state["model_name"] != model_name:
            raise ValueError(f"{name} holds a {state['model_name']}, not a {model_name}")
        if not isinstance(state.get("model"), Mapping):
            raise CheckpointError(f"{name} is a mimscale checkpoint without its 'model' state dict "
                                  f"(keys {describe_keys(state)})")
        prefix = "encoder."
        enc = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
        recipe = state["recipe"]
        info = {
            "format": "mimscale",
            "iteration": state.get("iteration"),
            "pretrain_img_size": recipe["img_size"],
            "pretrain_window_size": recipe["window_size"],
        }
        return enc, info
    # The reference layout: load into a SimMIM of that size through the key converter.
    reference_state_dict(state, name)  # another layout fails here, before a model is built
    img_size, window_size = _reference_sizes(state)
    simmim = build_simmim(model_name, img_size=img_size, window_size=window_size, drop_path_rate=0.0)
    try:
        load_reference_checkpoint(state, simmim, strict=True)
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(f"{name}: {exc}") from None
    info = {"format": "reference", "iteration": None, "pretrain_img_size": img_size,
            "pretrain_window_size": window_size}
    return encoder_state_dict(simmim), info


def _reference_sizes(state: Mapping[str, Any]) -> tuple[int, int]:
    """Pre-training image and window size of a reference checkpoint: its config's
    DATA.IMG_SIZE / MODEL.SWINV2.WINDOW_SIZE (the reference's yacs config, or the plain dict
    ``mimscale export`` writes), else the paper's 192 / 12."""
    cfg = state.get("config")
    if not isinstance(cfg, Mapping):
        return 192, 12
    img = (cfg.get("DATA") or {}).get("IMG_SIZE", 192)
    win = ((cfg.get("MODEL") or {}).get("SWINV2") or {}).get("WINDOW_SIZE", 12)
    return int(img), int(win)


def build_finetune_encoder(
    model_name: str,
    checkpoint: str | os.PathLike | Mapping[str, Any] | None,
    img_size: int,
    window_size: int,
    drop_path_rate: float,
    trust_pickle: bool = False,
    **kw: Any,
) -> tuple[SwinTransformerV2, dict[str, Any]]:
    """A headless SwinV2 at the task's size, initialised from ``checkpoint`` (None = scratch).

    Extra keywords go to timm (e.g. ``strict_img_size=False`` for detection). Loading is
    strict: every encoder weight must be present and of the right shape.
    """
    depth = len(get_spec(model_name).depths)
    if checkpoint is None:
        encoder = build_encoder(model_name, img_size=img_size, window_size=window_size,
                                drop_path_rate=drop_path_rate, **kw)
        return encoder, {"format": "scratch"}
    state, info = read_encoder_state(checkpoint, model_name, trust_pickle)
    pretrained = stage_windows(info["pretrain_img_size"], info["pretrain_window_size"], depth)
    encoder = build_encoder(model_name, img_size=img_size, window_size=window_size,
                            drop_path_rate=drop_path_rate, pretrained_window_sizes=pretrained, **kw)
    result = encoder.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"encoder weights of {checkpoint} do not fit {model_name}: missing {missing[:10]}, "
            f"unexpected {result.unexpected_keys[:10]}"
        )
    info["pretrained_window_sizes"] = pretrained
    return encoder, info
