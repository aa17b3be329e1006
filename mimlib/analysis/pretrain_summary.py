"""Collect every pre-training cell's metrics and loss curves into one table each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from mimlib import paths
from mimlib.config import pretrain_cells
from mimlib.train.schedule import decay_at, trunk_points
from mimlib.train.metrics import read_jsonl


def cell_curve(results: Path, model: str, dataset: str, length: int, lengths: list[int]) -> pd.DataFrame:
    """Train/val loss against iteration for one cell: its trunk segments, then its branch."""
    decay_point = decay_at(length)
    records: list[dict[str, Any]] = []
    for point in trunk_points(lengths):
        if point > decay_point:
            break
        log = paths.at(results, paths.TRUNK_LOG, model=model, dataset=dataset, iter=point)
        records += [r for r in read_jsonl(log) if r["iter"] <= decay_point]
    branch = paths.at(results, paths.CELL_LOG, model=model, dataset=dataset, length=length)
    records += [r for r in read_jsonl(branch) if r["iter"] > decay_point]
    df = pd.DataFrame.from_records(records)
    # A trunk segment and the branch both validate at the cut point: keep one row per iter.
    df = df.groupby("iter", as_index=False).first().sort_values("iter")
    df.insert(0, "length", length)
    df.insert(0, "dataset", dataset)
    df.insert(0, "model", model)
    return df


def write_pretrain_summary(cfg: Mapping[str, Any], results: Path, out_csv: Path, out_curves: Path) -> pd.DataFrame:
    rows, curves = [], []
    for cell in pretrain_cells(cfg):
        metrics_path = paths.at(results, paths.CELL_METRICS, model=cell.model, dataset=cell.dataset, length=cell.length)
        m = json.loads(metrics_path.read_text())
        trivial = m.get("val_trivial_loss")
        rows.append(
            {
                "model": cell.model,
                "dataset": cell.dataset,
                "length": cell.length,
                "train_loss": m["train_loss"],
                "val_loss": m["val_loss"],
                # The mean-visible-colour predictor's loss on the same crops and masks, and the
                # model's share of it: how much the pre-training learned beyond colour.
                "trivial_val_loss": trivial,
                "val_loss_ratio": m["val_loss"] / trivial if trivial and m["val_loss"] is not None else None,
                "corrupt_images": m["corrupt_images"],
                "branch_wall_time_s": m["wall_time_s"],
            }
        )
        curves.append(cell_curve(results, cell.model, cell.dataset, cell.length, cfg["lengths"]))
    table = pd.DataFrame(rows)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_csv, index=False, float_format="%.6f")
    pd.concat(curves, ignore_index=True).to_parquet(out_curves, index=False)
    return table
