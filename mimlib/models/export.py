"""Export a pre-trained cell's encoder for use outside mimscale (``mimscale export``).

Two formats:

* **timm**: ``<out>/model.safetensors`` (the headless encoder's state dict, timm keys) and
  ``<out>/config.json`` (timm's own export format, written by ``timm.models.save_for_hf``).
  For the sizes timm registers (S, B, L: :data:`TIMM_NAMES`) the config's ``architecture``
  is that name and ``model_args`` the size keywords, so
  ``timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=dict(file=...,
  num_classes=0), **model_args)`` (or ``timm.create_model("local-dir:<out>", pretrained=True)``)
  loads it strictly. The other sizes (H, g, the demo sizes) have no timm name:
  ``architecture`` is null and ``model_args`` are the full
  :class:`~timm.models.swin_transformer_v2.SwinTransformerV2` keywords.
* **reference**: one ``.pth`` in the SimMIM checkpoint layout of microsoft/Swin-Transformer
  (``{'model': state_dict, 'config': ...}``, see :mod:`mimlib.models.reference`), with the
  config as a plain dict in the reference's key names so ``torch.load(weights_only=True)``
  reads it.

docs/export.md shows fine-tuning an export with timm.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from timm.models import create_model, save_for_hf
from timm.models._manipulate import reinit_non_persistent_buffers
from timm.models.swin_transformer_v2 import SwinTransformerV2

from mimlib.models.pretrained import stage_windows
from mimlib.models.reference import to_reference_state_dict
from mimlib.models.registry import get_spec
from mimlib.models.simmim import SimMIM, build_simmim, encoder_state_dict

__all__ = [
    "TIMM_NAMES",
    "FORMATS",
    "load_cell",
    "timm_model_args",
    "export_timm",
    "export_reference",
    "export_cell",
]

FORMATS = ("timm", "reference")

#: Our sizes that timm registers, and the timm name whose architecture they are (checked
#: against timm at export time). timm has no Swin-S at 192/w12, so S uses the 256/w8 name
#: with the size keywords; B and L are timm's own 192/w12 SimMIM-size models.
TIMM_NAMES = {
    "swinv2_s": "swinv2_small_window8_256",
    "swinv2_b": "swinv2_base_window12_192",
    "swinv2_l": "swinv2_large_window12_192",
}

# timm's SwinV2 preprocessing defaults (swin_transformer_v2._cfg); mimscale normalises with
# the same ImageNet mean / std.
_PRETRAINED_CFG = {
    "interpolation": "bicubic",
    "crop_pct": 0.9,
    "crop_mode": "center",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "num_classes": 0,
    "first_conv": "patch_embed.proj",
    "classifier": "head.fc",
    "fixed_input_size": True,
}


def load_cell(checkpoint: str | os.PathLike | Mapping[str, Any]) -> tuple[SimMIM, dict[str, Any]]:
    """A cell's SimMIM model (eval mode) rebuilt from the recipe its checkpoint stores, and the
    checkpoint dict. Accepts ``results/pretrain/<model>/<dataset>/<length>/checkpoint.pt``."""
    if isinstance(checkpoint, Mapping):
        state, where = checkpoint, "checkpoint"
    else:
        where = os.fspath(checkpoint)
        if not Path(where).is_file():
            raise FileNotFoundError(f"no checkpoint at {where}")
        try:
            state = torch.load(where, map_location="cpu", weights_only=True)
        except Exception as exc:  # not a torch file, or one that pickles objects
            raise ValueError(f"cannot read {where} as a mimscale pre-training checkpoint: {exc}") from exc
    missing = [k for k in ("model", "model_name", "recipe") if not isinstance(state, Mapping) or k not in state]
    if missing:
        raise ValueError(
            f"{where} is not a mimscale pre-training checkpoint (no {', '.join(missing)}); "
            "export reads results/pretrain/<model>/<dataset>/<length>/checkpoint.pt"
        )
    try:
        get_spec(state["model_name"])
    except KeyError as exc:
        raise ValueError(f"{where}: {exc.args[0]}") from None
    r = state["recipe"]
    # Built without weight init (minutes for SwinV2-g on CPU), every weight comes from the file;
    # timm then recomputes the position tables and attention masks it does not store.
    with torch.device("meta"):
        model = build_simmim(
            state["model_name"], img_size=r["img_size"], window_size=r["window_size"], drop_path_rate=0.0,
            decoder=r["decoder"], loss=r["loss"], norm_target_window=r["norm_target_window"],
        )
    model.to_empty(device="cpu")
    model.load_state_dict(state["model"], strict=True)
    reinit_non_persistent_buffers(model)
    return model.eval(), dict(state)


def swinv2_kwargs(model_name: str, img_size: int, window_size: int, patch_size: int = 4) -> dict[str, Any]:
    """Every SwinTransformerV2 keyword that fixes a pre-trained encoder's weights and maths
    (pre-training encoders have no earlier windows: ``pretrained_window_sizes`` all 0)."""
    spec = get_spec(model_name)
    return {
        "img_size": img_size,
        "patch_size": patch_size,
        "embed_dim": spec.embed_dim,
        "depths": list(spec.depths),
        "num_heads": list(spec.num_heads),
        "window_size": window_size,
        "pretrained_window_sizes": [0] * len(spec.depths),
        "num_classes": 0,
    }


def timm_model_args(
    model_name: str, img_size: int, window_size: int, patch_size: int = 4
) -> tuple[str | None, dict[str, Any]]:
    """(timm name or None, keywords) that rebuild the encoder with timm.

    With a name: ``timm.create_model(name, **keywords)`` (the size keywords only); without:
    ``SwinTransformerV2(**keywords)``.
    """
    kwargs = swinv2_kwargs(model_name, img_size, window_size, patch_size)
    name = TIMM_NAMES.get(model_name)
    if name is None:
        return None, kwargs
    size = {"img_size": img_size, "window_size": window_size, "num_classes": 0}
    if patch_size != 4:
        size["patch_size"] = patch_size
    return name, size


def export_timm(
    state: Mapping[str, torch.Tensor],
    model_name: str,
    img_size: int,
    window_size: int,
    out_dir: str | os.PathLike,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (timm's format) of an encoder state dict
    (timm keys) pre-trained at ``img_size`` / ``window_size`` into ``out_dir``.

    ``info`` goes into the config's ``mimscale`` entry (provenance). The weights are first
    loaded strictly into timm's model (the registered name for S/B/L), so a size whose
    architecture differs from timm's fails here, naming the keys, not at the user's load.
    """
    patch_size = int(state["patch_embed.proj.weight"].shape[-1])
    name, kwargs = timm_model_args(model_name, img_size, window_size, patch_size)
    full = swinv2_kwargs(model_name, img_size, window_size, patch_size)
    with torch.device("meta"):  # no second copy of the weights: assign=True takes ours
        model = create_model(name, pretrained=False, **kwargs) if name else SwinTransformerV2(**kwargs)
    # safetensors needs contiguous tensors that share no memory.
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise RuntimeError(f"{model_name}'s encoder does not fit timm's {name or 'SwinTransformerV2'}: {exc}") from exc
    meta = {
        "model": model_name,
        "timm_class": "timm.models.swin_transformer_v2.SwinTransformerV2",
        "swinv2_kwargs": full,
        # Fine-tuning at another image / window size: pass these as pretrained_window_sizes so
        # the continuous position bias normalises coordinates as in pre-training.
        "finetune_pretrained_window_sizes": list(stage_windows(img_size, window_size, len(full["depths"]), patch_size)),
        **dict(info or {}),
    }
    tag = "_".join(str(meta[k]) for k in ("dataset", "length") if meta.get(k) is not None)
    pretrained_cfg: dict[str, Any] = {"tag": f"mimscale_{tag}" if tag else "mimscale", "input_size": (3, img_size, img_size)}
    if name is None:
        # timm's exporter reads the source config from the model; this size has none.
        model.pretrained_cfg = {"architecture": "SwinTransformerV2", "input_size": (3, img_size, img_size),
                                **_PRETRAINED_CFG}
    out = Path(out_dir)
    save_for_hf(model, str(out), model_config={"pretrained_cfg": pretrained_cfg, "mimscale": meta},
                model_args=kwargs if name is None else None, safe_serialization=True)
    if name is None:  # no timm entry point builds this size: say so instead of naming the class
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["architecture"] = None
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def reference_config(model: SimMIM, model_name: str, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture in the reference's yacs key names (config.py of microsoft/Swin-Transformer)."""
    r = dict(recipe)
    kw = swinv2_kwargs(model_name, r["img_size"], r["window_size"], model.patch_size)
    return {
        "DATA": {"IMG_SIZE": kw["img_size"], "MASK_PATCH_SIZE": r.get("mask_patch_size"),
                 "MASK_RATIO": r.get("mask_ratio")},
        "MODEL": {
            "TYPE": "swinv2",
            "DROP_PATH_RATE": r.get("drop_path"),
            "SWINV2": {
                "PATCH_SIZE": kw["patch_size"], "IN_CHANS": model.in_chans, "EMBED_DIM": kw["embed_dim"],
                "DEPTHS": kw["depths"], "NUM_HEADS": kw["num_heads"], "WINDOW_SIZE": kw["window_size"],
                "MLP_RATIO": 4.0, "QKV_BIAS": True, "APE": False, "PATCH_NORM": True,
                "PRETRAINED_WINDOW_SIZES": kw["pretrained_window_sizes"],
            },
            "SIMMIM": {"NORM_TARGET": {"ENABLE": model.norm_target_window is not None,
                                       "PATCH_SIZE": model.norm_target_window or 47}},
        },
    }


def export_reference(
    model: SimMIM,
    model_name: str,
    out_path: str | os.PathLike,
    recipe: Mapping[str, Any],
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (pre-trained with ``recipe``) as a reference SimMIM checkpoint (``{'model', 'config', 'mimscale'}``).

    The state dict holds the reference's persistent position / mask buffers too, as its own
    ``model.state_dict()`` does. Only the linear decoder exists in the reference.
    """
    dec = recipe.get("decoder", "linear")
    if dec != "linear":
        raise ValueError(f"the reference SimMIM has only the linear decoder; this model's decoder is {dec!r}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "model": to_reference_state_dict(model, include_buffers=True),
        "config": reference_config(model, model_name, recipe),
        "mimscale": {"model": model_name, **dict(info or {})},
    }
    tmp = out.with_name(out.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, out)
    return out


def export_cell(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, formats: tuple[str, ...] = FORMATS
) -> dict[str, Path]:
    """Export a pre-training cell: ``<out>/timm/{model.safetensors,config.json}`` and
    ``<out>/reference/checkpoint.pth``; returns {format: path}."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown export format(s) {', '.join(bad)}; known: {', '.join(FORMATS)}")
    model, state = load_cell(checkpoint)
    info = {k: v for k, v in (("source", os.fspath(checkpoint)), ("iteration", state.get("iteration")),
                              ("recipe_hash", state.get("recipe_hash")), ("seed", state.get("seed")))
            if v is not None}
    info.update(_cell_from_path(Path(checkpoint)))
    info["pretrain_recipe"] = dict(state["recipe"])
    out = Path(out_dir)
    written: dict[str, Path] = {}
    if "timm" in formats:
        r = state["recipe"]
        written["timm"] = export_timm(encoder_state_dict(model), state["model_name"], r["img_size"],
                                      r["window_size"], out / "timm", info)
    if "reference" in formats:
        written["reference"] = export_reference(model, state["model_name"], out / "reference" / "checkpoint.pth",
                                                state["recipe"], info)
    return written


def _cell_from_path(path: Path) -> dict[str, str]:
    # results/pretrain/<model>/<dataset>/<length>/checkpoint.pt -> dataset, length
    parts = path.parts
    if len(parts) >= 5 and parts[-5] == "pretrain" and path.name == "checkpoint.pt":
        return {"dataset": parts[-3], "length": parts[-2]}
    return {}

