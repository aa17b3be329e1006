"""The paper's Figures 1-4 and 6-8 (PNG + PDF), drawn with matplotlib's object API (no pyplot
state, so Snakemake may run several in threads). Figure 5 is in ``reconstruction.py``.

Colour = dataset (config order), marker size = model size (backbone parameters, log scale).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from mimlib.train.schedule import decay_at

from .common import available_scores, display_dataset, display_length, display_model, study_name
from .stats import linear_fit, pearson

LOSS_PANELS = (("train_loss", "pre-training train loss"), ("val_loss", "pre-training val loss"))


# ------------------------------------------------------------------ plumbing
def new_figure(nrows: int, ncols: int, width: float = 4.2, height: float = 3.3):
    """A Figure and a 2-D array of axes (no pyplot)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))
    return fig, axes


def save_figure(fig, png: str | Path, pdf: str | Path | None = None) -> None:
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=130)
    if pdf is not None:
        fig.savefig(pdf)


def placeholder(png: str | Path, pdf: str | Path | None, title: str, message: str) -> None:
    """A figure that only says why there is nothing to draw (keeps the target and report whole)."""
    fig, axes = new_figure(1, 1, 6.0, 2.2)
    ax = axes[0, 0]
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes)
    save_figure(fig, png, pdf)


def dataset_colors(cfg: Mapping[str, Any]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {ds: cmap(i % 10) for i, ds in enumerate(cfg["datasets"])}


def marker_sizes(stats: pd.DataFrame, small: float = 25.0, large: float = 220.0) -> dict[str, float]:
    """Marker area per model, growing with log(parameters)."""
    logp = np.log(stats["params"].astype(float).to_numpy())
    span = float(logp.max() - logp.min())
    return {m: small + (large - small) * ((lp - logp.min()) / span if span > 0 else 0.5)
            for m, lp in zip(stats["model"], logp)}


def _legend(fig, cfg: Mapping[str, Any], colors: Mapping[str, Any], sizes: Mapping[str, float] | None) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[ds], marker="o", linestyle="-", label=display_dataset(cfg, ds))
               for ds in cfg["datasets"]]
    if sizes:
        handles += [Line2D([], [], color="grey", marker="o", linestyle="", markersize=math.sqrt(s),
                           label=display_model(m)) for m, s in sizes.items()]
    fig.legend(handles=handles, loc="outside right center", frameon=False)


def _no_data(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="grey")


# ------------------------------------------------------------------ Figures 1-3
def _cost_panel(ax, cfg, cells: pd.DataFrame, column: str, colors, sizes) -> None:
    """One y-column against relative cost: a point per cell, a line per model x dataset."""
    drawn = False
    for (model, ds), g in cells.groupby(["model", "dataset"], sort=False):
        g = g.sort_values("relative_cost")
        g = g[g[column].notna()]
        if g.empty:
            continue
        drawn = True
        ax.plot(g["relative_cost"], g[column], color=colors[ds], linewidth=0.8, alpha=0.6)
        ax.scatter(g["relative_cost"], g[column], s=sizes.get(model, 40), color=colors[ds],
                   edgecolors="black", linewidths=0.4, alpha=0.85, zorder=3)
    _log_axis(ax, cells["relative_cost"])
    ax.set_xlabel("relative pre-training cost")
    if not drawn:
        _no_data(ax, "no results")


def _log_axis(ax, values: pd.Series) -> None:
    """Log x axis with plain-number ticks (base 2 over small ranges, where base 10 has none)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    finite = values[np.isfinite(values) & (values > 0)]
    if len(finite) and finite.max() / finite.min() < 100:
        ax.xaxis.set_major_locator(LogLocator(base=2))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _cost_note(cfg, stats: pd.DataFrame) -> str:
    from .cost import reference_cell

    model, length = reference_cell(stats, cfg["lengths"])
    return (f"{study_name(cfg)}: cost = encoder GFLOPs x batch x iterations, "
            f"1 = {display_model(model)} at {display_length(length)} iterations")


def figure1(cfg: Mapping[str, Any], cells: pd.DataFrame, stats: pd.DataFrame,
            png: str | Path, pdf: str | Path | None = None) -> None:
    """Train loss, val loss and IN-1K top-1 against the relative pre-training cost.

    ``cells``: ``scored_cells`` with ``add_relative_cost`` applied.
    """
    colors, sizes = dataset_colors(cfg), marker_sizes(stats)
    fig, axes = new_figure(1, 3)
    panels = [*LOSS_PANELS, ("in1k/top1", "IN-1K top-1 (%)")]
    in1k = "in1k" in cfg["finetune"].get("tasks", [])
    for ax, (column, label) in zip(axes[0], panels):
        if column in cells.columns and (in1k or not column.startswith("in1k/")):
            _cost_panel(ax, cfg, cells, column, colors, sizes)
        else:
            _log_axis(ax, cells["relative_cost"])
            _no_data(ax, "IN-1K is not fine-tuned in this study")
        ax.set_ylabel(label)
    fig.suptitle(_cost_note(cfg, stats), fontsize=9)
    _legend(fig, cfg, colors, sizes)
    save_figure(fig, png, pdf)


def figure2(cfg: Mapping[str, Any], cells: pd.DataFrame, png: str | Path, pdf: str | Path | None = None) -> None:
    """Rows: train loss, val loss, IN-1K top-1; columns: models; x: training length; a line per dataset."""
    colors = dataset_colors(cfg)
    rows = [*LOSS_PANELS, ("in1k/top1", "IN-1K top-1 (%)")]
    models = list(cfg["models"])
    fig, axes = new_figure(len(rows), len(models), 3.4, 2.8)
    lengths = sorted(cfg["lengths"])
    for j, model in enumerate(models):
        for i, (column, label) in enumerate(rows):
            ax = axes[i, j]
            drawn = False
            if column in cells.columns and (column != "in1k/top1" or "in1k" in cfg["finetune"].get("tasks", [])):
                for ds in cfg["datasets"]:
                    g = cells[(cells["model"] == model) & (cells["dataset"] == ds) & cells[column].notna()]
                    g = g.sort_values("length")
                    if len(g):
                        drawn = True
                        ax.plot(g["length"], g[column], marker="o", color=colors[ds])
            if not drawn:
                _no_data(ax, "no results")
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [display_length(n) for n in lengths])
            ax.minorticks_off()
            if i == 0:
                ax.set_title(display_model(model))
            if j == 0:
                ax.set_ylabel(label)
            if i == len(rows) - 1:
                ax.set_xlabel("pre-training iterations")
    fig.suptitle(f"{study_name(cfg)}: losses and IN-1K top-1 against training length", fontsize=9)
    _legend(fig, cfg, colors, None)
    save_figure(fig, png, pdf)


def figure3(cfg: Mapping[str, Any], cells: pd.DataFrame, stats: pd.DataFrame,
            png: str | Path, pdf: str | Path | None = None) -> None:
    """COCO AP box / AP mask, iNat-18 top-1, ADE20K mIoU (those the study runs) against cost."""
    scores = [s for s in available_scores(cfg) if s[0] != "in1k"]
    order = {"coco/box_ap": 0, "coco/mask_ap": 1, "inat18/top1": 2, "ade20k/miou": 3}
    scores.sort(key=lambda s: order[f"{s[0]}/{s[1]}"])
    if not scores:
        placeholder(png, pdf, "Figure 3", f"{study_name(cfg)}: no COCO / iNat-18 / ADE20K fine-tuning in this study")
        return
    colors, sizes = dataset_colors(cfg), marker_sizes(stats)
    fig, axes = new_figure(1, len(scores))
    for ax, (task, metric, label) in zip(axes[0], scores):
        _cost_panel(ax, cfg, cells, f"{task}/{metric}", colors, sizes)
        ax.set_ylabel(label)
    fig.suptitle(_cost_note(cfg, stats), fontsize=9)
    _legend(fig, cfg, colors, sizes)
    save_figure(fig, png, pdf)


# ------------------------------------------------------------------ Figure 4
def figure4(cfg: Mapping[str, Any], cells: pd.DataFrame, overfit: pd.DataFrame,
            png: str | Path, pdf: str | Path | None = None) -> None:
    """Each task score against train and val loss; red = overfitting cells, green = the others,
    with a least-squares line per group (and its Pearson r in the legend)."""
    from matplotlib.lines import Line2D

    scores = available_scores(cfg)
    if not scores:
        placeholder(png, pdf, "Figure 4", f"{study_name(cfg)}: no fine-tuning tasks in this study")
        return
    merged = cells.merge(overfit[["model", "dataset", "length", "overfit"]], how="left",
                         on=["model", "dataset", "length"])
    merged["overfit"] = merged["overfit"].fillna(False).astype(bool)
    groups = (("overfit", True, "tab:red"), ("non-overfit", False, "tab:green"))
    fig, axes = new_figure(len(scores), 2, 4.0, 3.0)
    for i, (task, metric, label) in enumerate(scores):
        score = f"{task}/{metric}"
        for j, (loss, loss_label) in enumerate(LOSS_PANELS):
            ax = axes[i, j]
            handles = []
            for name, flag, color in groups:
                g = merged[(merged["overfit"] == flag) & merged[score].notna() & merged[loss].notna()]
                if g.empty:
                    continue
                ax.scatter(g[loss], g[score], color=color, edgecolors="black", linewidths=0.4, s=30, zorder=3)
                slope, intercept = linear_fit(g[loss], g[score])
                r = pearson(g[loss], g[score])
                if not math.isnan(slope):
                    xs = np.linspace(g[loss].min(), g[loss].max(), 2)
                    ax.plot(xs, slope * xs + intercept, color=color, linewidth=1.2)
                text = f"{name} (n={len(g)}" + (f", r={r:+.2f})" if not math.isnan(r) else ")")
                handles.append(Line2D([], [], color=color, marker="o", label=text))
            if handles:
                ax.legend(handles=handles, fontsize=7, loc="best")
            else:
                _no_data(ax, "no results")
            ax.set_xlabel(loss_label)
            if j == 0:
                ax.set_ylabel(label)
    fig.suptitle(f"{study_name(cfg)}: fine-tuning scores against pre-training losses", fontsize=9)
    save_figure(fig, png, pdf)


# ------------------------------------------------------------------ curves (Figures 6-8)
def _plot_cell_curves(ax_train, ax_val, curves: pd.DataFrame, model: str, dataset: str,
                      lengths: Sequence[int], color, label: str | None = None) -> bool:
    """The longest cell's whole curve; each shorter cell's decay branch dashed on top of it."""
    sub = curves[(curves["model"] == model) & (curves["dataset"] == dataset)]
    if sub.empty:
        return False
    longest = max(n for n in lengths if (sub["length"] == n).any()) if (sub["length"].isin(lengths)).any() else None
    if longest is None:
        return False
    for n in sorted(lengths):
        cell = sub[sub["length"] == n].sort_values("iter")
        if cell.empty:
            continue
        part = cell if n == longest else cell[cell["iter"] >= decay_at(n)]
        style = dict(color=color, linewidth=1.1 if n == longest else 0.9,
                     linestyle="-" if n == longest else "--", label=label if n == longest else None)
        tr = part[part["loss"].notna()]
        va = part[part["val_loss"].notna()]
        ax_train.plot(tr["iter"], tr["loss"], **style)
        ax_val.plot(va["iter"], va["val_loss"], marker="." if len(va) < 40 else None, **style)
    return True


def _curve_grid(cfg, curves: pd.DataFrame, rows: list[str], lines: list[str], row_is_model: bool,
                png, pdf, title: str) -> None:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    colors = {k: cmap(i % 10) for i, k in enumerate(lines)}
    fig, axes = new_figure(len(rows), 2, 4.2, 2.9)
    for i, row in enumerate(rows):
        ax_t, ax_v = axes[i, 0], axes[i, 1]
        drawn = False
        for line in lines:
            model, ds = (row, line) if row_is_model else (line, row)
            label = display_dataset(cfg, line) if row_is_model else display_model(line)
            drawn |= _plot_cell_curves(ax_t, ax_v, curves, model, ds, cfg["lengths"], colors[line], label)
        name = display_model(row) if row_is_model else display_dataset(cfg, row)
        ax_t.set_ylabel(f"{name}\ntrain loss")
        ax_v.set_ylabel("val loss")
        if drawn:
            ax_v.legend(fontsize=7, loc="upper right")
        else:
            _no_data(ax_t, "no curves")
            _no_data(ax_v, "no curves")
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, png, pdf)


def figure7(cfg: Mapping[str, Any], curves: pd.DataFrame, png, pdf=None) -> None:
    """A row per model: train and val loss curves, a line per dataset."""
    _curve_grid(cfg, curves, list(cfg["models"]), list(cfg["datasets"]), True, png, pdf,
                f"{study_name(cfg)}: curves per model (solid: longest length; dashed: decay branches of shorter lengths)")


def figure8(cfg: Mapping[str, Any], curves: pd.DataFrame, png, pdf=None) -> None:
    """A row per dataset: train and val loss curves, a line per model."""
    _curve_grid(cfg, curves, list(cfg["datasets"]), list(cfg["models"]), False, png, pdf,
                f"{study_name(cfg)}: curves per dataset (solid: longest length; dashed: decay branches of shorter lengths)")


def figure6(cfg: Mapping[str, Any], curves: pd.DataFrame, pairs: list[tuple[str, str]],
            png, pdf=None) -> None:
    """Fraction dataset vs class-subset dataset (IN-1K 10% vs IN-100): train and val curves,
    a row per model (longest length), a line per dataset of each pair."""
    if not pairs:
        placeholder(png, pdf, "Figure 6",
                    f"{study_name(cfg)}: no class-subset dataset (datasets.<name>.num_classes), "
                    "so there is no sampling strategy to compare")
        return
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    names = list(dict.fromkeys(ds for pair in pairs for ds in pair))
    colors = {ds: cmap(i % 10) for i, ds in enumerate(names)}
    models = list(cfg["models"])
    fig, axes = new_figure(len(models), 2, 4.2, 2.9)
    longest = [max(cfg["lengths"])]
    for i, model in enumerate(models):
        ax_t, ax_v = axes[i, 0], axes[i, 1]
        drawn = False
        for ds in names:
            drawn |= _plot_cell_curves(ax_t, ax_v, curves, model, ds, longest, colors[ds], display_dataset(cfg, ds))
        ax_t.set_ylabel(f"{display_model(model)}\ntrain loss")
        ax_v.set_ylabel("val loss")
        if drawn:
            ax_v.legend(fontsize=7)
        else:
            _no_data(ax_t, "no curves")
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    fig.suptitle(f"{study_name(cfg)}: sampling strategies at {display_length(longest[0])} iterations", fontsize=9)
    save_figure(fig, png, pdf)
