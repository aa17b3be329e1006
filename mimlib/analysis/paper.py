"""The paper's Tables 3-6 as reference values (``paper_values.csv`` beside this file) and their
comparison with a study's own: reference columns for Tables 3-6 and the reproduction page.

A study cell is one of the paper's when its model and pre-training length are the paper's
(``swinv2_s`` ... ``swinv2_g``; 125K / 250K / 500K iterations) and its dataset is defined as in
``config/paper.yaml`` (same key, same source name and sampling, a source that is not the demo
folder). Table 3 (the best over the paper's three lengths) is compared only when the study
fine-tunes all three. Every other study gets no reference columns.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from .common import finetune_lengths

PAPER_VALUES = Path(__file__).with_name("paper_values.csv")
VALUE_COLUMNS = ["table", "task", "model", "dataset", "length", "metric", "value", "cite"]
#: the paper's pre-training datasets as config/paper.yaml defines them (tests pin the two equal)
PAPER_DATASETS: dict[str, dict[str, Any]] = {
    "in1k_10": {"source": "in1k", "fraction": 0.1},
    "in1k_20": {"source": "in1k", "fraction": 0.2},
    "in1k_50": {"source": "in1k", "fraction": 0.5},
    "in1k_100": {"source": "in1k", "fraction": 1.0},
    "in22k": {"source": "in22k"},
}
PAPER_LENGTHS = (125000, 250000, 500000)
#: table -> (task, metrics) as the study's tables hold them (mimlib/analysis/tables.py)
TABLE_METRICS = {3: ("in1k", ("top1",)), 4: ("inat18", ("top1",)), 5: ("ade20k", ("miou",)),
                 6: ("coco", ("box_ap", "mask_ap"))}
COMPARISON_COLUMNS = ["table", "task", "model", "dataset", "length", "metric", "paper", "reproduced",
                      "diff", "off", "cite"]


@lru_cache(maxsize=1)
def paper_values() -> pd.DataFrame:
    """The transcribed cells (one row per number printed in the paper's Tables 3-6); ``length``
    is 0 for Table 3 (the best over the lengths)."""
    if not PAPER_VALUES.exists():
        raise FileNotFoundError(f"{PAPER_VALUES}: the paper's reference values are missing from this install")
    df = pd.read_csv(PAPER_VALUES, comment="#", dtype={"length": "Int64"})
    if list(df.columns) != VALUE_COLUMNS:
        raise ValueError(f"{PAPER_VALUES}: columns {list(df.columns)}, expected {VALUE_COLUMNS}")
    df["length"] = df["length"].fillna(0).astype(int)
    return df


def _spec(ds: Mapping[str, Any]) -> dict[str, Any]:
    return {k: ds[k] for k in ("source", "fraction", "num_classes") if k in ds}


def paper_datasets(cfg: Mapping[str, Any]) -> list[str]:
    """The study's datasets that are the paper's (key and definition as in config/paper.yaml)."""
    out = []
    for name, ds in cfg["datasets"].items():
        source = cfg["sources"].get(ds["source"], {})
        if name in PAPER_DATASETS and _spec(ds) == PAPER_DATASETS[name] and not source.get("demo"):
            out.append(name)
    return out


def study_reference(cfg: Mapping[str, Any], table: int) -> pd.DataFrame:
    """The paper's cells of ``table`` that this study has (model, dataset and, for Tables 4-6,
    length); empty when it has none."""
    values = paper_values()
    values = values[(values["table"] == table) & values["model"].isin(list(cfg["models"]))
                    & values["dataset"].isin(paper_datasets(cfg))]
    if table == 3:
        if not set(PAPER_LENGTHS) <= set(finetune_lengths(cfg)):
            return values.iloc[0:0]
    else:
        values = values[values["length"].isin(finetune_lengths(cfg))]
    return values.reset_index(drop=True)


def _column(ds: str, metric: str, metrics: tuple[str, ...]) -> str:
    return ds if len(metrics) == 1 else f"{ds}/{metric}"


def with_reference(cfg: Mapping[str, Any], df: pd.DataFrame, table: int) -> pd.DataFrame:
    """``df`` (Table 3 or 4-6 as ``tables`` builds it) with ``<column>/paper`` (the paper's value)
    and ``<column>/diff`` (study minus paper, percentage points) after each column the paper has
    a value for in this study; ``df`` itself when the study has none of the paper's cells."""
    ref = study_reference(cfg, table)
    if ref.empty:
        return df
    _task, metrics = TABLE_METRICS[table]
    keys = ["model"] if table == 3 else ["model", "length"]
    out = df.copy()
    columns: list[str] = []
    for col in df.columns:
        columns.append(col)
        hits = ref[[_column(d, m, metrics) == col for d, m in zip(ref["dataset"], ref["metric"])]]
        if hits.empty:
            continue
        lookup = {tuple(r[k] for k in keys): float(r["value"]) for r in hits.to_dict("records")}
        paper = [lookup.get(tuple(r[k] for k in keys), math.nan) for r in df[keys].to_dict("records")]
        out[f"{col}/paper"] = paper
        out[f"{col}/diff"] = df[col].astype(float) - out[f"{col}/paper"]
        columns += [f"{col}/paper", f"{col}/diff"]
    return out[columns]


def comparison(cfg: Mapping[str, Any], tables: Mapping[int, pd.DataFrame], margin: float) -> pd.DataFrame:
    """One row per paper cell of this study: the paper's value, the study's (from ``tables``,
    Table 3 / 4-6 as ``tables`` builds them; NaN where not measured yet), their difference and
    ``off`` = |diff| > ``margin`` (False where not measured)."""
    rows = []
    for table, df in tables.items():
        _task, metrics = TABLE_METRICS[table]
        keys = ["model"] if table == 3 else ["model", "length"]
        measured = df.set_index(keys)
        for r in study_reference(cfg, table).to_dict("records"):
            key = r["model"] if table == 3 else (r["model"], r["length"])
            col = _column(r["dataset"], r["metric"], metrics)
            value = float(measured.at[key, col]) if key in measured.index and col in measured.columns else math.nan
            diff = value - float(r["value"])
            rows.append({"table": table, "task": r["task"], "model": r["model"], "dataset": r["dataset"],
                         "length": r["length"], "metric": r["metric"], "paper": float(r["value"]),
                         "reproduced": value, "diff": diff, "off": bool(abs(diff) > margin), "cite": r["cite"]})
    df = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    return df.astype({"table": int, "length": int, "paper": float, "reproduced": float, "diff": float, "off": bool})
