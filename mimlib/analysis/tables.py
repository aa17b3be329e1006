"""The paper's Tables 1-9 as DataFrames (written by ``common.save_table`` as CSV / Markdown / HTML).

Each builder lists exactly the cells the config asks for; a result that is missing stays an
empty cell. CSV columns use config keys (``in1k_10``, ``in1k_10/box_ap``); the Markdown and
HTML renderings use display names (``datasets.<name>.label``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from mimlib import paths
from mimlib.config import pretrain_recipe
from mimlib.finetune import main_metrics

from .common import available_scores, finetune_lengths, read_task_scores
from .stats import pearson

MIN_CELLS_FOR_CORRELATION = 3


# ------------------------------------------------------------------ Table 1: models
def table1(cfg: Mapping[str, Any]) -> pd.DataFrame:
    """Architecture, backbone parameters and GFLOPs at pre-training and fine-tuning size."""
    from .cost import model_stats

    return model_stats(cfg)


# ------------------------------------------------------------------ Table 2: datasets
def table2(cfg: Mapping[str, Any], manifest_paths: Mapping[str, str | Path]) -> pd.DataFrame:
    """Per pre-training dataset: source, how it is sampled, classes and images (from its manifest)."""
    from .common import manifest_stats

    stats = manifest_stats(manifest_paths).set_index("dataset")
    rows = []
    for name, ds in cfg["datasets"].items():
        if "fraction" in ds:
            sampling = f"{ds['fraction'] * 100:g}% of every class"
        elif "num_classes" in ds:
            sampling = f"{ds['num_classes']} random classes"
        else:
            sampling = "whole source"
        have = name in stats.index
        rows.append({"dataset": name, "source": ds["source"], "sampling": sampling,
                     "classes": int(stats.at[name, "classes"]) if have else None,
                     "images": int(stats.at[name, "images"]) if have else None})
    return pd.DataFrame(rows, columns=["dataset", "source", "sampling", "classes", "images"])


# ------------------------------------------------------------------ Tables 3-6: scores
def _scratch_on(cfg: Mapping[str, Any]) -> bool:
    return bool(cfg["finetune"].get("scratch_baseline"))


def table3(cfg: Mapping[str, Any], results: str | Path) -> pd.DataFrame:
    """Best IN-1K top-1 per model x dataset, the maximum over the fine-tuned lengths.

    A model x dataset with no top-1 at any length is empty; ``scratch`` (if baselines are on)
    is the from-scratch baseline.
    """
    scores = read_task_scores(cfg, results, "in1k")
    columns = list(cfg["datasets"]) + ([paths.SCRATCH] if _scratch_on(cfg) else [])
    rows = []
    for model in cfg["models"]:
        row: dict[str, Any] = {"model": model}
        for ds in columns:
            values = scores.loc[(scores["model"] == model) & (scores["dataset"] == ds), "top1"]
            row[ds] = float(values.max()) if values.notna().any() else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", *columns])


def table_by_length(cfg: Mapping[str, Any], results: str | Path, task: str,
                    metrics: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Rows model x fine-tuned length, a column per dataset (``<dataset>/<metric>`` when several
    metrics); with scratch baselines, a length-0 row per model carrying only the ``scratch`` column(s).
    """
    metrics = metrics or (main_metrics(task)[0],)
    scores = read_task_scores(cfg, results, task).set_index(["model", "dataset", "length"])

    def col(ds: str, m: str) -> str:
        return ds if len(metrics) == 1 else f"{ds}/{m}"

    datasets = list(cfg["datasets"])
    columns = [col(ds, m) for ds in datasets for m in metrics]
    scratch_cols = [col(paths.SCRATCH, m) for m in metrics] if _scratch_on(cfg) else []

    def value(model: str, ds: str, length: int, m: str) -> float:
        key = (model, ds, length)
        return float(scores.at[key, m]) if key in scores.index else math.nan

    rows = []
    for model in cfg["models"]:
        if scratch_cols:
            row = {"model": model, "length": 0, **{c: math.nan for c in columns}}
            row.update({col(paths.SCRATCH, m): value(model, paths.SCRATCH, 0, m) for m in metrics})
            rows.append(row)
        for length in finetune_lengths(cfg):
            row = {"model": model, "length": length}
            row.update({col(ds, m): value(model, ds, length, m) for ds in datasets for m in metrics})
            row.update({c: math.nan for c in scratch_cols})
            rows.append(row)
    return pd.DataFrame(rows, columns=["model", "length", *columns, *scratch_cols])


def table4(cfg: Mapping[str, Any], results: str | Path) -> pd.DataFrame:
    """iNaturalist-18 top-1 per model x length x dataset."""
    return table_by_length(cfg, results, "inat18", ("top1",))


def table5(cfg: Mapping[str, Any], results: str | Path) -> pd.DataFrame:
    """ADE20K mIoU per model x length x dataset."""
    return table_by_length(cfg, results, "ade20k", ("miou",))


def table6(cfg: Mapping[str, Any], results: str | Path) -> pd.DataFrame:
    """COCO box AP / mask AP per model x length x dataset."""
    return table_by_length(cfg, results, "coco", ("box_ap", "mask_ap"))


# ------------------------------------------------------------------ Table 7: loss vs score
def table7(cfg: Mapping[str, Any], cells: pd.DataFrame, overfit: pd.DataFrame,
           min_cells: int = MIN_CELLS_FOR_CORRELATION) -> pd.DataFrame:
    """Pearson r between each pre-training loss and each task score, over all pre-trained cells
    and split into overfitting / non-overfitting cells (``overfitting.classify_overfitting``).

    ``cells`` comes from ``common.scored_cells``. ``n`` counts the cells with a score and both
    losses; r is empty when a group has fewer than ``min_cells``.
    """
    merged = cells.merge(overfit[["model", "dataset", "length", "overfit"]], how="left",
                         on=["model", "dataset", "length"])
    merged["overfit"] = merged["overfit"].fillna(False).astype(bool)
    rows = []
    for task, metric, label in available_scores(cfg):
        score = f"{task}/{metric}"
        for group, mask in (("all", np.ones(len(merged), bool)),
                            ("overfit", merged["overfit"].to_numpy()),
                            ("non-overfit", ~merged["overfit"].to_numpy())):
            sub = merged[mask]
            sub = sub[sub[score].notna() & sub["train_loss"].notna() & sub["val_loss"].notna()]
            enough = len(sub) >= min_cells
            rows.append({
                "task": task, "metric": metric, "score": label, "group": group, "n": len(sub),
                "r_train_loss": pearson(sub["train_loss"], sub[score], min_cells) if enough else math.nan,
                "r_val_loss": pearson(sub["val_loss"], sub[score], min_cells) if enough else math.nan,
            })
    return pd.DataFrame(rows, columns=["task", "metric", "score", "group", "n", "r_train_loss", "r_val_loss"])


# ------------------------------------------------------------------ Table 8: decoders
TABLE8_COLUMNS = ["encoder", "decoder", "dataset", "length", "params_m", "train_loss", "val_loss", "top1"]


def decoder_groups(cfg: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """Cells (model, dataset, length) that take part in a decoder comparison: those whose
    dataset x length is pre-trained with at least two different decoders in the study."""
    decoders = {m: pretrain_recipe(cfg, m)["decoder"] for m in cfg["models"]}
    if len(set(decoders.values())) < 2:
        return []
    return [(m, ds, n) for ds in cfg["datasets"] for n in sorted(cfg["lengths"]) for m in cfg["models"]]


def table8(cfg: Mapping[str, Any], results: str | Path, summary: pd.DataFrame) -> pd.DataFrame:
    """Decoder variants: encoder, decoder, params (encoder + mask token + decoder), losses, top-1.

    Rows only when the study's recipes use at least two decoders (then every cell, grouped by
    dataset x length); otherwise the table is empty with its header.
    """
    cells = decoder_groups(cfg)
    if not cells:
        return pd.DataFrame(columns=TABLE8_COLUMNS)
    from .cost import simmim_params

    scores = read_task_scores(cfg, results, "in1k").set_index(["model", "dataset", "length"])
    losses = summary.set_index(["model", "dataset", "length"])
    params: dict[str, float] = {}
    rows = []
    for model, ds, length in cells:
        decoder = pretrain_recipe(cfg, model)["decoder"]
        if model not in params:
            params[model] = simmim_params(model, decoder) / 1e6
        key = (model, ds, length)
        rows.append({"encoder": model, "decoder": decoder, "dataset": ds, "length": length,
                     "params_m": params[model],
                     "train_loss": float(losses.at[key, "train_loss"]) if key in losses.index else math.nan,
                     "val_loss": float(losses.at[key, "val_loss"]) if key in losses.index else math.nan,
                     "top1": float(scores.at[key, "top1"]) if key in scores.index else math.nan})
    df = pd.DataFrame(rows, columns=TABLE8_COLUMNS)
    return df.sort_values(["dataset", "length", "decoder", "encoder"], kind="mergesort").reset_index(drop=True)


# ------------------------------------------------------------------ Table 9: sampling
TABLE9_COLUMNS = ["pair", "model", "length", "dataset", "sampling", "images", "classes",
                  "train_loss", "val_loss", "top1"]


def sampling_candidates(cfg: Mapping[str, Any]) -> list[str]:
    """Datasets Table 9 may compare: every class-subset dataset and the fraction datasets of its source."""
    subsets = [n for n, d in cfg["datasets"].items() if "num_classes" in d]
    sources = {cfg["datasets"][n]["source"] for n in subsets}
    fractions = [n for n, d in cfg["datasets"].items() if "fraction" in d and d["source"] in sources]
    return [n for n in cfg["datasets"] if n in subsets or n in fractions]


def sampling_pairs(cfg: Mapping[str, Any], images: Mapping[str, int]) -> list[tuple[str, str]]:
    """(fraction dataset, class-subset dataset) pairs: each class subset with the fraction
    dataset of the same source whose image count is closest (ratio nearest 1)."""
    pairs = []
    for name, ds in cfg["datasets"].items():
        if "num_classes" not in ds or name not in images:
            continue
        options = [n for n, d in cfg["datasets"].items()
                   if "fraction" in d and d["source"] == ds["source"] and n in images]
        if options:
            best = min(options, key=lambda n: abs(math.log(max(images[n], 1) / max(images[name], 1))))
            pairs.append((best, name))
    return pairs


def table9(cfg: Mapping[str, Any], results: str | Path, summary: pd.DataFrame,
           datasets: pd.DataFrame) -> pd.DataFrame:
    """Sampling strategies: a fraction dataset vs a class-subset dataset of similar size, per
    model x length (images and classes from the manifests). Empty without a class subset."""
    images = dict(zip(datasets["dataset"], datasets["images"]))
    classes = dict(zip(datasets["dataset"], datasets["classes"]))
    pairs = sampling_pairs(cfg, images)
    if not pairs:
        return pd.DataFrame(columns=TABLE9_COLUMNS)
    scores = read_task_scores(cfg, results, "in1k").set_index(["model", "dataset", "length"])
    losses = summary.set_index(["model", "dataset", "length"])
    rows = []
    for frac, sub in pairs:
        pair = f"{frac} vs {sub}"
        for model in cfg["models"]:
            for length in sorted(cfg["lengths"]):
                for ds in (frac, sub):
                    spec = cfg["datasets"][ds]
                    key = (model, ds, length)
                    sampling = (f"{spec['fraction'] * 100:g}% of every class" if "fraction" in spec
                                else f"{spec['num_classes']} whole classes")
                    rows.append({
                        "pair": pair, "model": model, "length": length, "dataset": ds, "sampling": sampling,
                        "images": int(images[ds]), "classes": int(classes[ds]),
                        "train_loss": float(losses.at[key, "train_loss"]) if key in losses.index else math.nan,
                        "val_loss": float(losses.at[key, "val_loss"]) if key in losses.index else math.nan,
                        "top1": float(scores.at[key, "top1"]) if key in scores.index else math.nan,
                    })
    return pd.DataFrame(rows, columns=TABLE9_COLUMNS)
