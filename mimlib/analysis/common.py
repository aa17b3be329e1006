"""Shared pieces of the aggregation stage: output paths, settings, display names, loaders, writers.

Every table, figure and analysis reads the study's results through these loaders, which only
look at the cells the config asks for: a result that is missing (a metrics file not written
yet, a NaN in a summary) stays missing (NaN / an empty table cell), it is never filled in.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from mimlib import paths
from mimlib.config import finetune_cells, load_schema, pretrain_cells
from mimlib.finetune import TASK_SCORES, main_metrics  # noqa: F401 (TASK_SCORES: the analyses' score list)

# ------------------------------------------------------------------ output paths (results/...)
TABLE = "tables/{name}.{ext}"  # ext: csv, md, html
FIGURE = "figures/{name}.{ext}"  # ext: png, pdf
OVERFITTING = "analysis/overfitting.csv"
PROXY_CELLS = "analysis/proxy_cells.csv"
PROXY_SUMMARY = "analysis/proxy_summary.csv"
PROXY_REPORT = "analysis/proxy.{ext}"  # md, html
SCALING_JSON = "analysis/scaling.json"
SCALING_FIT = "analysis/scaling_fit.csv"
SCALING_PREDICTIONS = "analysis/scaling_predictions.csv"
SCALING_REPORT = "analysis/scaling.{ext}"  # md, html
FINDINGS = "analysis/findings.{ext}"  # json, md, html
REPRODUCTION = "analysis/reproduction.{ext}"  # csv (every paper cell), md, html (the cells off)
# optional: written by the seed-spread measurement, read by the findings if it is there
SEED_SPREAD = "analysis/seed_spread.csv"

# ------------------------------------------------------------------ settings (config `analysis`)
#: Defaults of the config's ``analysis`` section (read with ``analysis_settings``): the
#: schema's, their one home (``overfit_tolerance``, ``reconstruction_images``).
ANALYSIS_DEFAULTS: dict[str, Any] = {
    key: spec["default"] for key, spec in load_schema()["properties"]["analysis"]["properties"].items()
}



def analysis_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config's ``analysis`` section over :data:`ANALYSIS_DEFAULTS` (the section is optional)."""
    return {**ANALYSIS_DEFAULTS, **(cfg.get("analysis") or {})}


def study_name(cfg: Mapping[str, Any]) -> str:
    return str(cfg.get("name") or "study")


# ------------------------------------------------------------------ display names
def display_model(name: str) -> str:
    """``swinv2_b`` -> ``SwinV2-B`` (the paper's spelling, ``SwinV2-g`` stays lower case)."""
    if name.startswith("swinv2_"):
        suffix = name[len("swinv2_"):]
        return "SwinV2-" + (suffix.upper() if len(suffix) == 1 and suffix != "g" else suffix)
    return name


def display_dataset(cfg: Mapping[str, Any], name: str) -> str:
    """The config's ``datasets.<name>.label`` if given, else the key; ``scratch`` for baselines."""
    if name == paths.SCRATCH:
        return "from scratch"
    return str(cfg["datasets"].get(name, {}).get("label") or name)


def display_length(length: int) -> str:
    """125000 -> ``125K``; small demo lengths stay as they are."""
    if length >= 1000 and length % 1000 == 0:
        return f"{length // 1000}K"
    return str(length)


# ------------------------------------------------------------------ cells and inputs
def finetune_lengths(cfg: Mapping[str, Any]) -> list[int]:
    return sorted(cfg["finetune"].get("lengths") or cfg["lengths"])


def task_metric_paths(
    cfg: Mapping[str, Any], task: str, results: str | Path = "", scratch: bool = True,
    datasets: Iterable[str] | None = None,
) -> list[str]:
    """The fine-tuning ``metrics.json`` files of one task the config asks for (rule inputs)."""
    if task not in cfg["finetune"].get("tasks", []):
        return []
    keep = set(datasets) if datasets is not None else None
    out = []
    for c in finetune_cells(cfg):
        if c.task != task or (c.dataset == paths.SCRATCH and not scratch):
            continue
        if keep is not None and c.dataset not in keep:
            continue
        out.append(str(paths.at(results, paths.FINETUNE_METRICS, task=c.task, model=c.model,
                                dataset=c.dataset, length=c.length)))
    return out


def read_task_scores(cfg: Mapping[str, Any], results: str | Path, task: str) -> pd.DataFrame:
    """One row per fine-tuning cell of ``task`` in the config (scratch included).

    Columns: model, dataset, length, then the task's main metrics (its registry ``metrics``), NaN where
    the metrics file or the value is missing. Empty (with those columns) if the task is not run.
    """
    cols = ["model", "dataset", "length", *main_metrics(task)]
    rows = []
    if task in cfg["finetune"].get("tasks", []):
        for c in finetune_cells(cfg):
            if c.task != task:
                continue
            row: dict[str, Any] = {"model": c.model, "dataset": c.dataset, "length": c.length}
            path = paths.at(results, paths.FINETUNE_METRICS, task=task, model=c.model,
                            dataset=c.dataset, length=c.length)
            metrics = json.loads(path.read_text()).get("metrics", {}) if path.exists() else {}
            for name in main_metrics(task):
                value = metrics.get(name)
                row[name] = float(value) if value is not None else math.nan
            rows.append(row)
    df = pd.DataFrame(rows, columns=cols)
    df["length"] = df["length"].astype(int)
    for name in main_metrics(task):
        df[name] = df[name].astype(float)
    return df


def read_pretrain_summary(cfg: Mapping[str, Any], summary_csv: str | Path) -> pd.DataFrame:
    """The pre-training summary restricted to (and completed with) the config's cells.

    Columns: model, dataset, length, train_loss, val_loss (NaN for a cell the summary lacks),
    and trivial_val_loss, val_loss_ratio where the summary has them.
    """
    cells = pd.DataFrame([(c.model, c.dataset, c.length) for c in pretrain_cells(cfg)],
                         columns=["model", "dataset", "length"])
    path = Path(summary_csv)
    if path.exists():
        summary = pd.read_csv(path)
        summary["length"] = summary["length"].astype(int)
        keep = [c for c in ("train_loss", "val_loss", "trivial_val_loss", "val_loss_ratio") if c in summary.columns]
        cells = cells.merge(summary[["model", "dataset", "length", *keep]], how="left",
                            on=["model", "dataset", "length"])
    for col in ("train_loss", "val_loss"):
        if col not in cells.columns:
            cells[col] = math.nan
        cells[col] = cells[col].astype(float)
    return cells


def read_curves(curves_parquet: str | Path) -> pd.DataFrame:
    """Pre-training curves (model, dataset, length, iter, loss, val_loss, ...)."""
    df = pd.read_parquet(curves_parquet)
    df["length"] = df["length"].astype(int)
    return df


def manifest_stats(manifest_paths: Mapping[str, str | Path]) -> pd.DataFrame:
    """dataset -> images, classes (from the manifests), kind and fraction / num_classes meta."""
    from mimlib.data.manifests import read_manifest

    rows = []
    for name, path in manifest_paths.items():
        df, _root, meta = read_manifest(path)
        rows.append({"dataset": name, "images": int(len(df)), "classes": int(df["class_name"].nunique()),
                     "kind": meta.get("kind", ""), "fraction": meta.get("fraction"),
                     "num_classes": meta.get("num_classes")})
    return pd.DataFrame(rows, columns=["dataset", "images", "classes", "kind", "fraction", "num_classes"])


def scored_cells(cfg: Mapping[str, Any], results: str | Path, summary: pd.DataFrame) -> pd.DataFrame:
    """Pre-trained cells (no scratch) with their losses and every available task score.

    Score columns are named ``<task>/<metric>`` (see :data:`TASK_SCORES`).
    """
    out = summary.copy()
    for task in dict.fromkeys(t for t, _, _ in TASK_SCORES):
        scores = read_task_scores(cfg, results, task)
        metrics = [m for t, m, _ in TASK_SCORES if t == task]
        scores = scores[scores["dataset"] != paths.SCRATCH]
        scores = scores.rename(columns={m: f"{task}/{m}" for m in metrics})
        out = out.merge(scores[["model", "dataset", "length", *[f"{task}/{m}" for m in metrics]]],
                        how="left", on=["model", "dataset", "length"])
    return out


def available_scores(cfg: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """The :data:`TASK_SCORES` whose task the config fine-tunes."""
    tasks = cfg["finetune"].get("tasks", [])
    return [s for s in TASK_SCORES if s[0] in tasks]


# ------------------------------------------------------------------ writers
def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3g}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}" if abs(int(value)) >= 10000 else str(int(value))
    try:
        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    return str(value)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table; NaN / None render as empty cells."""
    header = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell_text(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell_text(v))}</td>" for v in row) + "</tr>"
        for row in df.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_HTML_STYLE = (
    "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin:0.5em 0}"
    "th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
    "td:first-child,th:first-child{text-align:left}p.note{color:#444;max-width:60em}"
)


def html_page(title: str, sections: Sequence[tuple[str, pd.DataFrame | str]], note: str = "") -> str:
    """A standalone HTML page: a title, a note, then (heading, table or paragraph) sections."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_HTML_STYLE}</style></head><body><h2>{html.escape(title)}</h2>"]
    if note:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    for heading, content in sections:
        if heading:
            parts.append(f"<h3>{html.escape(heading)}</h3>")
        if isinstance(content, pd.DataFrame):
            parts.append(html_table(content) if len(content.columns) else "<p>(empty)</p>")
        else:
            parts.append(f"<p class='note'>{html.escape(content)}</p>")
    parts.append("</body></html>")
    return "".join(parts)


def pretty(df: pd.DataFrame, cfg: Mapping[str, Any] | None) -> pd.DataFrame:
    """Display copy: model / dataset keys -> names, ``<dataset>`` and ``<dataset>/<metric>``
    column headers -> ``<label>`` / ``<label> <metric>``."""
    if cfg is None:
        return df
    out = df.copy()
    for col in ("model", "encoder"):
        if col in out.columns:
            out[col] = [display_model(v) if isinstance(v, str) else v for v in out[col]]
    if "dataset" in out.columns:
        out["dataset"] = [display_dataset(cfg, v) if isinstance(v, str) else v for v in out["dataset"]]
    names = {}
    for col in out.columns:
        head, _, metric = str(col).partition("/")
        if head in cfg["datasets"] or head == paths.SCRATCH:
            names[col] = display_dataset(cfg, head) + (f" {metric}" if metric else "")
    return out.rename(columns=names)


def save_table(df: pd.DataFrame, csv: str | Path, md: str | Path | None = None,
               html_path: str | Path | None = None, title: str = "", note: str = "",
               cfg: Mapping[str, Any] | None = None) -> None:
    """Write ``df`` as CSV (keys, full precision, empty cells for NaN) and, with display names
    when ``cfg`` is given, as Markdown and HTML beside it."""
    csv = Path(csv)
    csv.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(csv, index=False, float_format="%.6g")
    shown = pretty(df, cfg)
    if md is not None:
        text = (f"**{title}**\n\n" if title else "") + markdown_table(shown) + (f"\n{note}\n" if note else "")
        Path(md).write_text(text)
    if html_path is not None:
        Path(html_path).write_text(html_page(title or csv.stem, [("", shown)], note))
