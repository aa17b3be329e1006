"""Collect every fine-tuning target's metrics.json into one table (one row per target)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from mimlib import paths
from mimlib.config import finetune_cells
from mimlib.finetune import main_metrics


def write_finetune_summary(cfg: Mapping[str, Any], results: Path, out_csv: Path) -> pd.DataFrame:
    rows = []
    for c in finetune_cells(cfg):
        path = paths.at(results, paths.FINETUNE_METRICS, task=c.task, model=c.model, dataset=c.dataset, length=c.length)
        record = json.loads(path.read_text())
        row: dict[str, Any] = {"task": c.task, "model": c.model, "dataset": c.dataset, "length": c.length}
        for name in main_metrics(c.task):
            row[name] = record["metrics"].get(name)
        row["wall_time_s"] = record.get("wall_time_s")
        rows.append(row)
    table = pd.DataFrame(rows)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_csv, index=False, float_format="%.4f")
    return table
