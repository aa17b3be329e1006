"""One function per aggregation target: read the inputs, build, write (called by
``workflow/rules/aggregate.smk`` and by the tests).

:func:`target_outputs` is the one declaration of what each target writes (under the results
folder, at the patterns of ``common``: tables/, figures/, analysis/): the workflow's rules are
generated from it, its script hands the rule's ``snakemake.output`` to the writer, and a
writer called without one (tests, the CLI) writes to the same paths."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from mimlib import paths

from . import common as C
from .overfitting import classify_overfitting, read_overfitting

TITLES = {
    "table1": "Table 1: models (backbone parameters; encoder GFLOPs at pre-training and IN-1K fine-tuning size)",
    "table2": "Table 2: pre-training datasets",
    "table3": "Table 3: best IN-1K top-1 of each model x dataset (max over lengths)",
    "table4": "Table 4: iNaturalist-18 top-1",
    "table5": "Table 5: ADE20K mIoU",
    "table6": "Table 6: COCO AP box / AP mask",
    "table7": "Table 7: Pearson r between pre-training losses and fine-tuning scores",
    "table8": "Table 8: decoders",
    "table9": "Table 9: dataset sampling strategies",
}
REFERENCE_NOTE = (" <column>/paper: the paper's value (mimlib/analysis/paper_values.csv); <column>/diff: this "
                  "study minus the paper, percentage points.")


def _out(results: str | Path, pattern: str, **kw: Any) -> Path:
    return Path(results) / pattern.format(**kw)


def table_paths(results: str | Path, name: str) -> dict[str, Path]:
    return {ext: _out(results, C.TABLE, name=name, ext=ext) for ext in ("csv", "md", "html")}


def figure_paths(results: str | Path, name: str) -> dict[str, Path]:
    return {ext: _out(results, C.FIGURE, name=name, ext=ext) for ext in ("png", "pdf")}


def target_outputs(name: str, results: str | Path) -> dict[str, Path]:
    """The files target ``name`` writes, by key (the rule's named outputs)."""
    if name not in TARGETS:
        raise KeyError(f"unknown aggregation target {name!r} (known: {', '.join(TARGETS)})")
    if name.startswith("table"):
        return table_paths(results, name)
    if name.startswith("fig"):
        return figure_paths(results, name)
    if name == "overfitting":
        return {"csv": _out(results, C.OVERFITTING)}
    if name == "proxy":
        return {"cells": _out(results, C.PROXY_CELLS), "summary": _out(results, C.PROXY_SUMMARY),
                "md": _out(results, C.PROXY_REPORT, ext="md"), "html": _out(results, C.PROXY_REPORT, ext="html"),
                **figure_paths(results, "proxy")}
    if name == "reproduction":
        return {ext: _out(results, C.REPRODUCTION, ext=ext) for ext in ("csv", "md", "html")}
    if name == "scaling":
        return {"json": _out(results, C.SCALING_JSON), "fit": _out(results, C.SCALING_FIT),
                "predictions": _out(results, C.SCALING_PREDICTIONS),
                "md": _out(results, C.SCALING_REPORT, ext="md"), "html": _out(results, C.SCALING_REPORT, ext="html"),
                **figure_paths(results, "scaling")}
    return findings_paths(results)


def _outputs(name: str, results: str | Path, out: Mapping[str, Any] | None) -> dict[str, Path]:
    """``out`` (a rule's outputs) as paths, checked against the declaration; else the declaration."""
    declared = target_outputs(name, results)
    if out is None:
        return declared
    given = {k: Path(v) for k, v in dict(out).items()}
    if set(given) != set(declared):
        raise KeyError(f"target {name}: outputs {sorted(given)} given, {sorted(declared)} declared")
    return given


def manifest_paths(cfg: Mapping[str, Any], results: str | Path, datasets=None) -> dict[str, Path]:
    names = list(cfg["datasets"]) if datasets is None else list(datasets)
    return {ds: paths.at(results, paths.MANIFEST, dataset=ds) for ds in names}


def val_index_path(cfg: Mapping[str, Any], results: str | Path) -> Path:
    return paths.at(results, paths.INDEX, source=cfg["validation"]["source"], split="val")


def largest_model(cfg: Mapping[str, Any]) -> str:
    from .cost import encoder_params

    return max(cfg["models"], key=encoder_params)


def _write_table(cfg, results, name: str, df: pd.DataFrame, note: str = "", out=None) -> pd.DataFrame:
    out = _outputs(name, results, out)
    C.save_table(df, out["csv"], out["md"], out["html"], title=f"{TITLES[name]} — study {C.study_name(cfg)}",
                 note=note, cfg=cfg)
    return df


def _summary(cfg, results) -> pd.DataFrame:
    return C.read_pretrain_summary(cfg, paths.at(results, paths.PRETRAIN_SUMMARY))


# ------------------------------------------------------------------ tables
def write_table1(cfg, results, out=None) -> pd.DataFrame:
    from .tables import table1

    return _write_table(cfg, results, "table1", table1(cfg),
                        "params: backbone parameters (no decoder, mask token or head); GFLOPs: fvcore count of "
                        "one encoder forward on one image (a multiply-add = 1 FLOP).", out)


def write_table2(cfg, results, out=None) -> pd.DataFrame:
    from .tables import table2

    return _write_table(cfg, results, "table2", table2(cfg, manifest_paths(cfg, results)), out=out)


def _reference(cfg, df: pd.DataFrame, table: int) -> tuple[pd.DataFrame, str]:
    """``df`` with the paper's values beside the study's (``paper.with_reference``) and the note for them."""
    from .paper import with_reference

    shown = with_reference(cfg, df, table)
    return shown, (REFERENCE_NOTE if shown is not df else "")


def write_table3(cfg, results, out=None) -> pd.DataFrame:
    from .tables import table3

    df, ref = _reference(cfg, table3(cfg, results), 3)
    return _write_table(cfg, results, "table3", df,
                        "Empty: no IN-1K result for that model x dataset. scratch: from-scratch baseline." + ref, out)


def write_table_by_length(cfg, results, name: str, out=None) -> pd.DataFrame:
    from . import tables

    df, ref = _reference(cfg, getattr(tables, name)(cfg, results), int(name.removeprefix("table")))
    return _write_table(cfg, results, name, df,
                        "Rows: model x pre-training length; length 0 = from-scratch baseline. Empty: no result."
                        + ref, out)


def write_overfitting(cfg, results, out=None, tolerance: float | None = None) -> pd.DataFrame:
    tol = C.analysis_settings(cfg)["overfit_tolerance"] if tolerance is None else tolerance
    summary = _summary(cfg, results)
    curves = C.read_curves(paths.at(results, paths.PRETRAIN_CURVES))
    df = classify_overfitting(summary, curves, tol)
    path = _outputs("overfitting", results, out)["csv"]
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, float_format="%.6g")
    return df


def _overfit(results) -> pd.DataFrame:
    return read_overfitting(_out(results, C.OVERFITTING))


def write_table7(cfg, results, out=None) -> pd.DataFrame:
    from .tables import table7

    cells = C.scored_cells(cfg, results, _summary(cfg, results))
    tol = C.analysis_settings(cfg)["overfit_tolerance"]
    return _write_table(cfg, results, "table7", table7(cfg, cells, _overfit(results)),
                        f"Over the pre-trained cells with a score; overfitting per mimlib/analysis/overfitting.py "
                        f"(tolerance {tol}). Empty r: fewer than 3 cells in the group.", out)


def write_table8(cfg, results, out=None) -> pd.DataFrame:
    from .tables import table8

    df = table8(cfg, results, _summary(cfg, results))
    note = ("params_m: encoder + mask token + decoder (millions)." if len(df) else
            "Empty: every model of this study uses the same decoder (pretrain.decoder), nothing to compare.")
    return _write_table(cfg, results, "table8", df, note, out)


def write_table9(cfg, results, out=None) -> pd.DataFrame:
    from .tables import sampling_candidates, table9

    stats = C.manifest_stats(manifest_paths(cfg, results, sampling_candidates(cfg)))
    df = table9(cfg, results, _summary(cfg, results), stats)
    note = "" if len(df) else "Empty: the study has no class-subset dataset (datasets.<name>.num_classes)."
    return _write_table(cfg, results, "table9", df, note, out)


# ------------------------------------------------------------------ figures
def _cost_cells(cfg, results, scores: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    from .cost import add_relative_cost

    stats = pd.read_csv(table_paths(results, "table1")["csv"])
    summary = _summary(cfg, results)
    cells = C.scored_cells(cfg, results, summary) if scores else summary
    return add_relative_cost(cells, stats, cfg["lengths"]), stats


def write_figure1(cfg, results, out=None) -> None:
    from .figures import figure1

    cells, stats = _cost_cells(cfg, results)
    out = _outputs("fig1", results, out)
    figure1(cfg, cells, stats, out["png"], out["pdf"])


def write_figure2(cfg, results, out=None) -> None:
    from .figures import figure2

    cells = C.scored_cells(cfg, results, _summary(cfg, results))
    out = _outputs("fig2", results, out)
    figure2(cfg, cells, out["png"], out["pdf"])


def write_figure3(cfg, results, out=None) -> None:
    from .figures import figure3

    cells, stats = _cost_cells(cfg, results)
    out = _outputs("fig3", results, out)
    figure3(cfg, cells, stats, out["png"], out["pdf"])


def write_figure4(cfg, results, out=None) -> None:
    from .figures import figure4

    cells = C.scored_cells(cfg, results, _summary(cfg, results))
    out = _outputs("fig4", results, out)
    figure4(cfg, cells, _overfit(results), out["png"], out["pdf"])


def figure5_checkpoints(cfg, results) -> dict[str, Path]:
    """dataset -> checkpoint of the largest model at the longest length (Figure 5's candidates)."""
    model, length = largest_model(cfg), max(cfg["lengths"])
    return {ds: paths.at(results, paths.CELL_CKPT, model=model, dataset=ds, length=length) for ds in cfg["datasets"]}


def write_figure5(cfg, results, out=None) -> list[tuple[str, str]]:
    from .reconstruction import figure5

    out = _outputs("fig5", results, out)
    return figure5(cfg, _overfit(results), largest_model(cfg), figure5_checkpoints(cfg, results),
                   manifest_paths(cfg, results), val_index_path(cfg, results), out["png"], out["pdf"],
                   images=int(C.analysis_settings(cfg)["reconstruction_images"]))


def write_figure6(cfg, results, out=None) -> None:
    from .figures import figure6
    from .tables import sampling_candidates, sampling_pairs

    stats = C.manifest_stats(manifest_paths(cfg, results, sampling_candidates(cfg)))
    pairs = sampling_pairs(cfg, dict(zip(stats["dataset"], stats["images"])))
    out = _outputs("fig6", results, out)
    curves = C.read_curves(paths.at(results, paths.PRETRAIN_CURVES)) if pairs else pd.DataFrame()
    figure6(cfg, curves, pairs, out["png"], out["pdf"])


def write_curve_figure(cfg, results, name: str, out=None) -> None:
    from . import figures

    curves = C.read_curves(paths.at(results, paths.PRETRAIN_CURVES))
    out = _outputs(name, results, out)
    {"fig7": figures.figure7, "fig8": figures.figure8}[name](cfg, curves, out["png"], out["pdf"])


# ------------------------------------------------------------------ beyond the paper
def write_proxy(cfg, results, out=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    from .proxy import proxy_figure, proxy_tables

    cells = C.scored_cells(cfg, results, _summary(cfg, results))
    per_cell, summary = proxy_tables(cfg, cells)
    out = _outputs("proxy", results, out)
    out["cells"].parent.mkdir(parents=True, exist_ok=True)
    per_cell.to_csv(out["cells"], index=False, float_format="%.6g")
    summary.to_csv(out["summary"], index=False, float_format="%.6g")
    title = f"Validation loss as a proxy for fine-tuning — study {C.study_name(cfg)}"
    note = ("Per task score: line score = slope * val_loss + intercept fitted on every measured cell; "
            "predicted_loo leaves the cell out. spearman_val_loss: rank agreement of low val loss and high "
            "score (+1 = perfect). runs_needed: fine-tuning the cells in val-loss order finds the measured "
            "best after this many runs; runs_saved = the rest. regret_topk: best score minus the best of "
            "the k lowest-loss cells.")
    out["md"].write_text(
        f"**{title}**\n\n{note}\n\n" + C.markdown_table(C.pretty(summary, cfg)) + "\n\nPer cell:\n\n"
        + C.markdown_table(C.pretty(per_cell, cfg)))
    out["html"].write_text(
        C.html_page(title, [("Summary", C.pretty(summary, cfg)), ("Per cell", C.pretty(per_cell, cfg))], note))
    proxy_figure(cfg, per_cell, out["png"], out["pdf"])
    return per_cell, summary


def write_scaling(cfg, results, out=None):
    from .scaling import scaling_figure, scaling_inputs, study_scaling

    stats = pd.read_csv(table_paths(results, "table1")["csv"])
    datasets = C.manifest_stats(manifest_paths(cfg, results))
    inputs = scaling_inputs(cfg, _summary(cfg, results), stats, datasets, _overfit(results))
    fit, cells, predictions = study_scaling(cfg, inputs)
    out = _outputs("scaling", results, out)
    out["json"].parent.mkdir(parents=True, exist_ok=True)
    out["json"].write_text(fit.to_json() + "\n")
    cells.to_csv(out["fit"], index=False, float_format="%.6g")
    predictions.to_csv(out["predictions"], index=False, float_format="%.6g")
    title = f"Scaling fit of the validation loss — study {C.study_name(cfg)}"
    refs = ", ".join(f"{a}0 = {fit.refs[a]:.6g}" for a in fit.axes)
    params = pd.DataFrame([{"parameter": k, "value": v} for k, v in fit.params.items()])
    quality = (f"form: {fit.form}; {fit.formula}; {refs}; N = backbone parameters, D = pre-training images, "
               f"I = iterations; {fit.n} cells, R^2 = {fit.r2:.4f}, RMSE = {fit.rmse:.5f}. {fit.note}")
    out["md"].write_text(
        f"**{title}**\n\n{quality}\n\n" + C.markdown_table(params) + "\n\nPredictions for cells not run:\n\n"
        + C.markdown_table(predictions) + "\n\nPer cell:\n\n" + C.markdown_table(C.pretty(cells, cfg)))
    out["html"].write_text(C.html_page(
        title, [("Parameters", params), ("Predictions for cells not run", predictions),
                ("Per cell", C.pretty(cells, cfg))], quality))
    scaling_figure(cfg, fit, cells, out["png"], out["pdf"])
    return fit, cells, predictions


def write_reproduction(cfg, results, out=None, margin: float | None = None) -> pd.DataFrame:
    """Every paper cell of the study (Tables 3-6) with the paper's value, the study's and the
    difference (CSV); the Markdown / HTML pages list the cells off by more than the margin
    (``analysis.reproduction_margin``)."""
    from . import tables
    from .paper import comparison

    margin = float(C.analysis_settings(cfg)["reproduction_margin"] if margin is None else margin)
    built = {3: tables.table3(cfg, results), 4: tables.table4(cfg, results), 5: tables.table5(cfg, results),
             6: tables.table6(cfg, results)}
    df = comparison(cfg, built, margin)
    out = _outputs("reproduction", results, out)
    out["csv"].parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out["csv"], index=False, float_format="%.6g")
    measured = df[df["reproduced"].notna()]
    off = df[df["off"]].drop(columns=["off"])
    title = f"Reproduction: the paper's Tables 3-6 against study {C.study_name(cfg)}"
    if df.empty:
        note = ("No cell of this study is one of the paper's (models, lengths and datasets as in "
                "config/paper.yaml), so there is nothing to compare.")
    else:
        note = (f"{len(df)} of the paper's cells are in this study, {len(measured)} measured; {len(off)} differ from "
                f"the paper by more than {margin:g} percentage points (analysis.reproduction_margin). diff: this "
                "study minus the paper. Table 3: the best over the fine-tuned lengths (length 0). All cells: "
                f"{out['csv'].name}.")
    off = C.pretty(off, cfg)
    out["md"].write_text(f"**{title}**\n\n{note}\n\n" + (C.markdown_table(off) if len(off) else "No cell is off.\n"))
    out["html"].write_text(C.html_page(title, [("Cells off by more than the margin",
                                                off if len(off) else "No cell is off.")], note))
    return df


def findings_paths(results: str | Path) -> dict[str, Path]:
    return {ext: _out(results, C.FINDINGS, ext=ext) for ext in ("json", "md", "html")}


def findings_study(cfg, results):
    """The findings' inputs (``findings.Study``) from the files the other targets wrote: Table 2
    (images), the pre-training summary, overfitting.csv, Tables 3 and 4-9, the IN-1K metrics,
    the optional seed_spread.csv."""
    from . import findings as F
    from .cost import encoder_params

    def table(name: str) -> pd.DataFrame:
        return pd.read_csv(table_paths(results, name)["csv"])

    summary = _summary(cfg, results)
    parts = [F.loss_scores(summary)]
    tasks = cfg["finetune"].get("tasks", [])
    if "in1k" in tasks:
        parts.append(F.metric_scores(C.read_task_scores(cfg, results, "in1k"), "in1k", "top1"))
    for task, name in F.BY_LENGTH_TABLES.items():
        if task in tasks:
            metrics = [m for t, m, _ in C.TASK_SCORES if t == task]
            parts.append(F.by_length_scores(table(name), task, metrics, cfg["datasets"], F.src_table(name)))
    scratch = pd.concat([F.scratch_scores(C.read_task_scores(cfg, results, t), t, m) for t, m, _ in C.TASK_SCORES
                         if t in tasks], ignore_index=True) if tasks and cfg["finetune"].get("scratch_baseline") else None
    t2 = table("table2")
    t8 = table("table8")
    if len(t8):
        t8["decoder_params_m"] = t8["params_m"] - t8["encoder"].map(encoder_params) / 1e6
    return F.Study(
        name=C.study_name(cfg), models=list(cfg["models"]), largest=largest_model(cfg),
        datasets=list(cfg["datasets"]), images=dict(zip(t2["dataset"], t2["images"])),
        lengths=sorted(cfg["lengths"]), finetune_lengths=C.finetune_lengths(cfg), tasks=list(tasks),
        scores=pd.concat(parts, ignore_index=True),
        subsets=[n for n, d in cfg["datasets"].items() if "num_classes" in d],
        overfit=_overfit(results), table3=table("table3"), table7=table("table7"), table8=t8,
        table9=table("table9"), loss_tol=float(C.analysis_settings(cfg)["overfit_tolerance"]),
        labels={d: C.display_dataset(cfg, d) for d in cfg["datasets"]},
        seeds=F.read_seed_spread(_out(results, C.SEED_SPREAD)), scratch=scratch)


def write_findings(cfg, results, out=None) -> list:
    from . import findings as F

    study = findings_study(cfg, results)
    found = F.study_findings(study)
    out = _outputs("findings", results, out)
    out["json"].parent.mkdir(parents=True, exist_ok=True)
    out["json"].write_text(F.findings_json(study.name, found, study.seeds))
    out["md"].write_text(F.findings_markdown(study.name, found, study.seeds))
    out["html"].write_text(F.findings_html(study.name, found, study.seeds))
    return found


#: target name (the rule's) -> writer(cfg, results), in an order that builds inputs first
TARGETS: dict[str, Callable[..., Any]] = {
    "overfitting": write_overfitting, "table1": write_table1, "table2": write_table2, "table3": write_table3,
    "table4": partial(write_table_by_length, name="table4"),
    "table5": partial(write_table_by_length, name="table5"),
    "table6": partial(write_table_by_length, name="table6"),
    "table7": write_table7, "table8": write_table8, "table9": write_table9,
    "fig1": write_figure1, "fig2": write_figure2, "fig3": write_figure3, "fig4": write_figure4,
    "fig5": write_figure5, "fig6": write_figure6,
    "fig7": partial(write_curve_figure, name="fig7"), "fig8": partial(write_curve_figure, name="fig8"),
    "proxy": write_proxy, "scaling": write_scaling, "reproduction": write_reproduction, "findings": write_findings,
}


def run_target(name: str, cfg: Mapping[str, Any], results: str | Path | None = None,
               out: Mapping[str, Any] | None = None, **kw: Any) -> Any:
    """Build one aggregation target (``cfg`` validated, e.g. the workflow's ``CFG``) into ``out``
    (its rule's named outputs; default :func:`target_outputs`)."""
    if name not in TARGETS:
        raise KeyError(f"unknown aggregation target {name!r} (known: {', '.join(TARGETS)})")
    return TARGETS[name](cfg, results if results is not None else cfg["results"], out=out, **kw)
