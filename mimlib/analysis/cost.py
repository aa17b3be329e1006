"""Model statistics (Table 1) and the relative pre-training cost of a cell (Figures 1 and 3).

**Relative training cost** of a cell = encoder GFLOPs of one image at the model's pre-training
size (fvcore, ``mimlib.models.flops``) x global batch x iterations, divided by the same product
for the study's smallest model (fewest backbone parameters) at the study's shortest length.
In the paper that reference is SwinV2-S at 125K iterations (= 1). Only the encoder forward is
counted: the backward pass is a roughly constant multiple of it and the linear decoder is
negligible, so the ratio is what matters.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Mapping

import pandas as pd

from mimlib.config import finetune_recipe, pretrain_recipe

STATS_COLUMNS = ["model", "embed_dim", "depths", "heads", "params", "params_m",
                 "pretrain_img_size", "pretrain_window", "pretrain_gflops",
                 "finetune_img_size", "finetune_window", "finetune_gflops", "pretrain_global_batch"]


@lru_cache(maxsize=None)
def encoder_params(model: str) -> int:
    """Backbone parameters of a registered encoder, counted on the meta device (no memory)."""
    from mimlib.models.swinv2 import backbone_param_count, build_encoder

    return int(backbone_param_count(build_encoder(model, device="meta")))


def simmim_params(model: str, decoder: str) -> int:
    """Encoder + mask token + decoder parameters (Table 8's "# Params"), on the meta device."""
    import torch

    from mimlib.models.simmim import build_simmim

    with torch.device("meta"):
        net = build_simmim(model, decoder=decoder)
    return int(sum(p.numel() for p in net.parameters()))


def finetune_size(cfg: Mapping[str, Any], model: str) -> tuple[int, int]:
    """(image size, window) of IN-1K fine-tuning: the config's ``finetune.in1k`` recipe, else the
    classification engine's defaults (224 px, window 14: the paper's)."""
    if "in1k" in cfg.get("finetune", {}):
        r = finetune_recipe(cfg, "in1k", model)
    else:
        from mimlib.finetune import default_recipe

        r = default_recipe("in1k")
    return int(r["img_size"]), int(r["window_size"])


def model_stats(cfg: Mapping[str, Any]) -> pd.DataFrame:
    """One row per model of the study: architecture, parameters, GFLOPs at both sizes."""
    from mimlib.models.flops import encoder_gflops
    from mimlib.models.swinv2 import get_spec

    rows = []
    for model in cfg["models"]:
        spec = get_spec(model)
        pre = pretrain_recipe(cfg, model)
        ft_img, ft_win = finetune_size(cfg, model)
        params = encoder_params(model)
        rows.append({
            "model": model,
            "embed_dim": spec.embed_dim,
            "depths": ",".join(map(str, spec.depths)),
            "heads": ",".join(map(str, spec.num_heads)),
            "params": params,
            "params_m": params / 1e6,
            "pretrain_img_size": int(pre["img_size"]),
            "pretrain_window": int(pre["window_size"]),
            "pretrain_gflops": encoder_gflops(model, int(pre["img_size"]), int(pre["window_size"])),
            "finetune_img_size": ft_img,
            "finetune_window": ft_win,
            "finetune_gflops": encoder_gflops(model, ft_img, ft_win),
            "pretrain_global_batch": int(pre["global_batch"]),
        })
    return pd.DataFrame(rows, columns=STATS_COLUMNS)


def add_relative_cost(cells: pd.DataFrame, stats: pd.DataFrame, lengths: list[int]) -> pd.DataFrame:
    """Add ``cost`` (GFLOPs x batch x iterations) and ``relative_cost`` columns to ``cells``.

    The reference (= 1) is the model with the fewest parameters in ``stats`` at ``min(lengths)``.
    """
    per_image = stats.set_index("model")
    unit = per_image["pretrain_gflops"] * per_image["pretrain_global_batch"]
    ref_model = per_image["params"].idxmin()
    ref = float(unit[ref_model]) * min(lengths)
    out = cells.copy()
    out["cost"] = [float(unit.get(m, math.nan)) * int(n) for m, n in zip(out["model"], out["length"])]
    out["relative_cost"] = out["cost"] / ref
    return out


def reference_cell(stats: pd.DataFrame, lengths: list[int]) -> tuple[str, int]:
    """(model, length) whose cost is 1."""
    return str(stats.loc[stats["params"].idxmin(), "model"]), int(min(lengths))


def read_model_stats(path) -> pd.DataFrame:
    return pd.read_csv(path)
