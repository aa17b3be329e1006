"""Validation loss as a proxy for fine-tuning (beyond the paper; its section 3.3 asks the question).

From the pre-training validation loss alone:

* **Ranking** — every pre-trained cell is ranked by validation loss (1 = lowest).
* **Prediction** — per task score, the least-squares line ``score = a + b * val_loss`` fitted
  on every cell with a measured score predicts every cell, including cells that were
  pre-trained but never fine-tuned. ``predicted_loo`` is the honest version: each measured
  cell's prediction comes from the line fitted without it.
* **Agreement** — Spearman correlation between the validation-loss ranking and the measured
  scores (sign flipped so +1 means "lower loss, higher score" holds perfectly), Spearman of
  the leave-one-out predictions, and their R^2 / RMSE.
* **Savings** — fine-tuning only the top-k cells by validation loss finds the measured best
  cell when k >= the best cell's validation-loss rank among the measured cells; the runs saved
  are the others. ``regret_top3`` is the best measured score minus the best score among the
  three lowest-loss cells (0 = the shortlist contains the winner).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .common import available_scores
from .stats import linear_fit, loo_linear_predictions, r2, ranks, rmse, spearman

CELL_COLUMNS = ["task", "metric", "model", "dataset", "length", "val_loss", "val_loss_rank",
                "measured", "measured_rank", "predicted", "predicted_loo"]
SUMMARY_COLUMNS = ["task", "metric", "score", "cells", "measured", "slope", "intercept",
                   "spearman_val_loss", "spearman_loo", "r2_loo", "rmse_loo",
                   "best_cell", "best_measured", "runs_needed", "runs_saved",
                   "regret_top1", "regret_top3"]


def proxy_tables(cfg: Mapping[str, Any], cells: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-cell predictions, per-score summary) from ``common.scored_cells``."""
    base = cells[cells["val_loss"].notna()].copy()
    base["val_loss_rank"] = ranks(base["val_loss"].to_numpy()) if len(base) else []
    per_cell, summary = [], []
    for task, metric, label in available_scores(cfg):
        score = f"{task}/{metric}"
        x = base["val_loss"].to_numpy(float)
        y = base[score].to_numpy(float)
        measured = ~np.isnan(y)
        slope, intercept = linear_fit(x[measured], y[measured])
        predicted = slope * x + intercept
        loo = loo_linear_predictions(x, y)
        measured_rank = np.full(len(y), math.nan)
        if measured.any():
            measured_rank[measured] = ranks(-y[measured])  # 1 = best score
        df = pd.DataFrame({
            "task": task, "metric": metric, "model": base["model"].to_numpy(),
            "dataset": base["dataset"].to_numpy(), "length": base["length"].to_numpy(),
            "val_loss": x, "val_loss_rank": base["val_loss_rank"].to_numpy(),
            "measured": y, "measured_rank": measured_rank, "predicted": predicted, "predicted_loo": loo,
        }, columns=CELL_COLUMNS)
        per_cell.append(df.sort_values("val_loss_rank", kind="mergesort"))

        row: dict[str, Any] = {"task": task, "metric": metric, "score": label, "cells": len(base),
                               "measured": int(measured.sum()), "slope": slope, "intercept": intercept}
        sp = spearman(x[measured], y[measured])
        row["spearman_val_loss"] = -sp if not math.isnan(sp) else math.nan
        row["spearman_loo"] = spearman(loo[measured], y[measured])
        row["r2_loo"] = r2(y[measured], loo[measured])
        row["rmse_loo"] = rmse(y[measured], loo[measured])
        if measured.any():
            m = df[~df["measured"].isna()].sort_values("val_loss", kind="mergesort").reset_index(drop=True)
            best_i = int(m["measured"].idxmax())
            best = m.loc[best_i]
            # rank of the best cell in the val-loss order of the measured cells (1-based, ties pessimistic)
            needed = int((m["val_loss"] <= best["val_loss"]).sum())
            row.update({
                "best_cell": f"{best['model']}/{best['dataset']}/{int(best['length'])}",
                "best_measured": float(best["measured"]),
                "runs_needed": needed, "runs_saved": len(m) - needed,
                "regret_top1": float(best["measured"] - m["measured"].iloc[:1].max()),
                "regret_top3": float(best["measured"] - m["measured"].iloc[:3].max()),
            })
        summary.append(row)
    cells_df = pd.concat(per_cell, ignore_index=True) if per_cell else pd.DataFrame(columns=CELL_COLUMNS)
    return cells_df, pd.DataFrame(summary, columns=SUMMARY_COLUMNS)


def proxy_figure(cfg: Mapping[str, Any], cells_df: pd.DataFrame, png, pdf=None) -> None:
    """Leave-one-out predicted vs measured score per task (diagonal = perfect proxy)."""
    from .common import study_name
    from .figures import new_figure, placeholder, save_figure

    scores = available_scores(cfg)
    if cells_df.empty or not scores:
        placeholder(png, pdf, "Validation loss as a proxy", f"{study_name(cfg)}: no fine-tuning results")
        return
    fig, axes = new_figure(1, len(scores), 3.4, 3.2)
    for ax, (task, metric, label) in zip(axes[0], scores):
        d = cells_df[(cells_df["task"] == task) & (cells_df["metric"] == metric)]
        d = d[d["measured"].notna() & d["predicted_loo"].notna()]
        if d.empty:
            ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.scatter(d["measured"], d["predicted_loo"], s=20, edgecolors="black", linewidths=0.4)
            lo = float(min(d["measured"].min(), d["predicted_loo"].min()))
            hi = float(max(d["measured"].max(), d["predicted_loo"].max()))
            ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel("predicted from val loss (leave-one-out)")
    fig.suptitle(f"{study_name(cfg)}: fine-tuning scores predicted from the validation loss", fontsize=9)
    save_figure(fig, png, pdf)
