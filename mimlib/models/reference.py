"""Convert SimMIM checkpoints between the reference layout and ours.

Reference = microsoft/Swin-Transformer ``models/simmim.py`` + ``models/swin_transformer_v2.py``;
its checkpoints are ``{'model': state_dict, 'optimizer': ..., 'config': ..., ...}`` with keys

* ``encoder.mask_token`` (1, 1, C), ``encoder.patch_embed.{proj,norm}.*``, ``encoder.norm.*``
* ``encoder.layers.{i}.blocks.{j}.{norm1,norm2,mlp.fc1,mlp.fc2,attn.*}`` - the same names as timm
  (``attn.qkv.weight`` without bias, ``attn.q_bias``, ``attn.v_bias``, ``attn.logit_scale``
  (heads, 1, 1), ``attn.cpb_mlp.{0,2}``, ``attn.proj``)
* ``encoder.layers.{i}.downsample.{reduction,norm}`` at the END of stage ``i`` (timm: START of
  stage ``i+1``; the 2x2 concatenation order of PatchMerging is the same in both)
* persistent buffers ``relative_position_index``, ``relative_coords_table``, ``attn_mask``
  (timm recomputes them as non-persistent buffers, so they are dropped)
* ``decoder.0.{weight,bias}``.

The encoder part is translated by timm's own ``checkpoint_filter_fn`` (drops the buffers,
moves the downsample layers); this module only handles the SimMIM parts around it (prefix,
mask token, decoder) and the strict key/shape check.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from timm.models.swin_transformer_v2 import checkpoint_filter_fn

from .checkpoint_io import CheckpointError, read_checkpoint, unknown_layout
from .simmim import SimMIM

__all__ = [
    "CheckpointMismatchError",
    "load_reference_checkpoint",
    "reference_state_dict",
    "to_reference_state_dict",
    "REFERENCE_BUFFERS",
]

# Buffers the reference stores in its state dict; timm rebuilds them from the config.
REFERENCE_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")


class CheckpointMismatchError(CheckpointError):
    """A reference checkpoint cannot be loaded into the model: unreadable, in another layout, or
    with keys that do not fit (named in the message)."""


def _downsample_ours_to_ref(key: str) -> str:
    # timm: layers.{i+1}.downsample  ->  reference: layers.{i}.downsample
    return re.sub(
        r"(^|\.)layers\.(\d+)\.downsample\.",
        lambda m: f"{m.group(1)}layers.{int(m.group(2)) - 1}.downsample.",
        key,
    )


def _ours_to_ref_key(key: str) -> str:
    """Our SimMIM state-dict key -> the reference key holding the same tensor."""
    if key == "mask_token":
        return "encoder.mask_token"
    if key.startswith("encoder."):
        return _downsample_ours_to_ref(key)
    return key


def to_reference_state_dict(model: SimMIM, include_buffers: bool = False) -> dict[str, torch.Tensor]:
    """Our SimMIM -> reference layout (what the reference's ``model.state_dict()`` holds).

    With ``include_buffers`` the reference's persistent position/mask buffers are added too
    (copied from timm's non-persistent ones, which hold the same values).
    """
    out = {_ours_to_ref_key(k): v.detach().clone() for k, v in model.state_dict().items()}
    out["encoder.mask_token"] = out["encoder.mask_token"].reshape(1, 1, -1)
    if include_buffers:
        for name, buf in model.encoder.named_buffers():
            if buf is not None and name.rsplit(".", 1)[-1] in REFERENCE_BUFFERS:
                out[_downsample_ours_to_ref("encoder." + name)] = buf.detach().clone()
    return out


def _read(path_or_dict: str | os.PathLike | Mapping[str, Any], trust_pickle: bool) -> Mapping:
    if isinstance(path_or_dict, Mapping):
        return path_or_dict
    try:  # weights_only unless trusted: the reference pickles its yacs config
        return read_checkpoint(path_or_dict, trust_pickle=trust_pickle)
    except CheckpointError as exc:  # this module's callers catch CheckpointMismatchError
        raise CheckpointMismatchError(str(exc)) from exc


def reference_state_dict(ckpt: Mapping[str, Any], name: str = "the checkpoint dict") -> dict[str, Any]:
    """The model state dict of a full or bare reference checkpoint, ``module.`` prefixes dropped.

    Raises :class:`CheckpointMismatchError` naming ``name``, its keys and the understood
    layouts when ``ckpt`` holds no ``encoder.*`` weights (e.g. a dict keyed ``weights``).
    """
    sd = ckpt.get("model", ckpt)
    if isinstance(sd, Mapping):
        sd = {k[7:] if isinstance(k, str) and k.startswith("module.") else k: v for k, v in sd.items()}
    if not isinstance(sd, Mapping) or not any(isinstance(k, str) and k.startswith("encoder.") for k in sd):
        raise CheckpointMismatchError(unknown_layout(name, ckpt))
    return sd


def _fmt(keys: list[str], limit: int = 20) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_reference_checkpoint(
    path_or_dict: str | os.PathLike | Mapping[str, Any],
    model: SimMIM,
    strict: bool = True,
    trust_pickle: bool = False,
) -> dict[str, list]:
    """Load a reference SimMIM checkpoint (file, full checkpoint dict or bare state dict) into ``model``.

    Returns ``{'missing', 'unexpected', 'mismatched', 'dropped_buffers'}`` with reference key
    names. With ``strict`` (default) any missing, unexpected or wrongly shaped key raises
    :class:`CheckpointMismatchError` naming the keys and nothing is loaded; only the
    recomputable buffers are dropped silently.
    """
    ckpt = _read(path_or_dict, trust_pickle)
    name = "the checkpoint dict" if isinstance(path_or_dict, Mapping) else os.fspath(path_or_dict)
    sd = reference_state_dict(ckpt, name)

    enc: dict[str, torch.Tensor] = {}
    ours: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for k, v in sd.items():
        if k.startswith("encoder."):
            enc[k[len("encoder."):]] = v
        elif k.startswith("decoder."):
            ours[k] = v
        else:
            unexpected.append(k)
    dropped = sorted("encoder." + k for k in enc if k.rsplit(".", 1)[-1] in REFERENCE_BUFFERS)

    if "mask_token" in enc:
        ours["mask_token"] = enc.pop("mask_token")
    pe = enc.get("patch_embed.proj.weight")
    target_pe = model.encoder.patch_embed.proj.weight
    if pe is not None and pe.shape != target_pe.shape:
        # timm's filter would silently resample the kernel; a different patch size changes the
        # token grid the masks are drawn on, so refuse instead.
        raise CheckpointMismatchError(
            f"encoder.patch_embed.proj.weight has shape {tuple(pe.shape)}, model expects "
            f"{tuple(target_pe.shape)}"
        )
    if len(model.encoder.layers) > 1 and "layers.0.downsample.reduction.weight" not in enc and strict:
        # timm's filter uses this key to recognise the reference layout.
        raise CheckpointMismatchError(
            "missing key encoder.layers.0.downsample.reduction.weight (the reference layout "
            "downsamples at the end of stage 0)"
        )
    ours.update({"encoder." + k: v for k, v in checkpoint_filter_fn(enc, model.encoder).items()})

    expected = model.state_dict()
    if "mask_token" in ours and ours["mask_token"].numel() == expected["mask_token"].numel():
        ours["mask_token"] = ours["mask_token"].reshape(expected["mask_token"].shape)
    missing = sorted(_ours_to_ref_key(k) for k in expected.keys() - ours.keys())
    unexpected += sorted(_ours_to_ref_key(k) for k in ours.keys() - expected.keys())
    mismatched = sorted(
        (_ours_to_ref_key(k), tuple(ours[k].shape), tuple(expected[k].shape))
        for k in expected.keys() & ours.keys()
        if ours[k].shape != expected[k].shape
    )
    report = {
        "missing": missing,
        "unexpected": unexpected,
        "mismatched": mismatched,
        "dropped_buffers": dropped,
    }
    if strict and (missing or unexpected or mismatched):
        parts = []
        if missing:
            parts.append(f"missing keys: {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt(unexpected)}")
        if mismatched:
            parts.append(
                "shape mismatch (key, checkpoint, model): "
                + _fmt([f"{k} {a} vs {b}" for k, a, b in mismatched])
            )
        label = "reference checkpoint" + ("" if isinstance(path_or_dict, Mapping) else f" {name}")
        raise CheckpointMismatchError(f"{label} does not fit the model; " + "; ".join(parts))
    bad = {k for k in expected.keys() & ours.keys() if ours[k].shape != expected[k].shape}
    load = {k: v for k, v in ours.items() if k in expected and k not in bad}
    model.load_state_dict(load, strict=strict)
    return report
