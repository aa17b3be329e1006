# Aggregation: the paper's Tables 1-9 and Figures 1-8, the overfitting classification, the
# validation-loss-as-proxy analysis, the scaling fit and the findings page (the paper's findings
# as rules on the study's own results; mimlib/analysis/). Each target reads
# only the results it needs (Table 3: the IN-1K metrics; Table 6: the COCO ones; ...);
# `aggregate_all` builds them all. Outputs marked report() make `snakemake --report report.html`.
# Needs from common.smk: CFG, RESULTS, res(), P.
import os

from mimlib.analysis import aggregate as AGG
from mimlib.analysis import common as AC
from mimlib.analysis.tables import decoder_groups, sampling_candidates
from mimlib.resources import light_resources as _agg_light_resources

AGG_TASKS = CFG["finetune"].get("tasks", [])
AGG_CAPTION = "../report/{}.rst"
# Every target runs workflow/scripts/aggregate.py (a fresh, light process: pandas + matplotlib,
# torch only where a target needs it) with the validated config and its name as params.
AGG_SCRIPT = "../scripts/aggregate.py"
AGG_RESOURCES = {k: v for k, v in _agg_light_resources().items() if k in ("mem_mb", "runtime", "cpus_per_task")}
# Table 1 (fvcore traces every encoder) and Figure 5 (loads the largest model twice) need more.
AGG_HEAVY = {**AGG_RESOURCES, "mem_mb": 32000}


def agg_params(target):
    return {"target": target, "config": CFG}


def agg_path(pattern, **kw):
    return res(pattern.format(**kw))


def agg_table_outputs(name, category="Tables"):
    return {
        "csv": agg_path(AC.TABLE, name=name, ext="csv"),
        "md": agg_path(AC.TABLE, name=name, ext="md"),
        "html": report(agg_path(AC.TABLE, name=name, ext="html"), caption=AGG_CAPTION.format(name),
                       category=category, labels={"name": name, "type": "table"}),
    }


def agg_figure_outputs(name, category="Figures"):
    return {
        "png": report(agg_path(AC.FIGURE, name=name, ext="png"), caption=AGG_CAPTION.format(name),
                      category=category, labels={"name": name, "type": "figure"}),
        "pdf": agg_path(AC.FIGURE, name=name, ext="pdf"),
    }


def agg_metrics(task, scratch=True, datasets=None):
    """The fine-tuning metrics.json files of one task (none if the study does not run it)."""
    return AC.task_metric_paths(CFG, task, RESULTS, scratch=scratch, datasets=datasets)


def agg_all_metrics():
    return [p for task in AGG_TASKS for p in agg_metrics(task, scratch=False)]


AGG_SUMMARY = res(P.PRETRAIN_SUMMARY)
AGG_CURVES = res(P.PRETRAIN_CURVES)
AGG_OVERFIT = agg_path(AC.OVERFITTING)
AGG_TABLE1 = agg_path(AC.TABLE, name="table1", ext="csv")
AGG_MANIFESTS = [res(P.MANIFEST, dataset=d) for d in CFG["datasets"]]
AGG_SAMPLING = sampling_candidates(CFG)


# ---------------------------------------------------------------- tables
rule table1:
    output:
        **agg_table_outputs("table1"),
    resources:
        **AGG_HEAVY,
    params:
        **agg_params("table1"),
    script:
        AGG_SCRIPT


rule table2:
    input:
        AGG_MANIFESTS,
    output:
        **agg_table_outputs("table2"),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("table2"),
    script:
        AGG_SCRIPT


rule table3:
    input:
        agg_metrics("in1k"),
    output:
        **agg_table_outputs("table3"),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("table3"),
    script:
        AGG_SCRIPT


rule table4:
    input:
        agg_metrics("inat18"),
    output:
        **agg_table_outputs("table4"),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("table4"),
    script:
        AGG_SCRIPT


rule table5:
    input:
        agg_metrics("ade20k"),
    output:
        **agg_table_outputs("table5"),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("table5"),
    script:
        AGG_SCRIPT


rule table6:
    input:
        agg_metrics("coco"),
    output:
        **agg_table_outputs("table6"),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("table6"),
    script:
        AGG_SCRIPT


rule overfitting:
    input:
        summary=AGG_SUMMARY,
        curves=AGG_CURVES,
    output:
        report(AGG_OVERFIT, caption=AGG_CAPTION.format("overfitting"), category="Analysis",
               labels={"name": "overfitting", "type": "table (CSV)"}),
    params:
        **agg_params("overfitting"),
        tolerance=AC.analysis_settings(CFG)["overfit_tolerance"],
    resources:
        **AGG_RESOURCES,
    script:
        AGG_SCRIPT


rule table7:
    input:
        summary=AGG_SUMMARY,
        overfit=AGG_OVERFIT,
        metrics=agg_all_metrics(),
    output:
        **agg_table_outputs("table7"),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("table7"),
    script:
        AGG_SCRIPT


rule table8:
    input:
        summary=AGG_SUMMARY if decoder_groups(CFG) else [],
        metrics=agg_metrics("in1k", scratch=False) if decoder_groups(CFG) else [],
    output:
        **agg_table_outputs("table8"),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("table8"),
    script:
        AGG_SCRIPT


rule table9:
    input:
        summary=AGG_SUMMARY if AGG_SAMPLING else [],
        manifests=[res(P.MANIFEST, dataset=d) for d in AGG_SAMPLING],
        metrics=agg_metrics("in1k", scratch=False, datasets=AGG_SAMPLING) if AGG_SAMPLING else [],
    output:
        **agg_table_outputs("table9"),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("table9"),
    script:
        AGG_SCRIPT


# ---------------------------------------------------------------- figures
rule fig1:
    input:
        stats=AGG_TABLE1,
        summary=AGG_SUMMARY,
        metrics=agg_metrics("in1k", scratch=False),
    output:
        **agg_figure_outputs("fig1"),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("fig1"),
    script:
        AGG_SCRIPT


rule fig2:
    input:
        summary=AGG_SUMMARY,
        metrics=agg_metrics("in1k", scratch=False),
    output:
        **agg_figure_outputs("fig2"),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("fig2"),
    script:
        AGG_SCRIPT


rule fig3:
    input:
        stats=AGG_TABLE1,
        summary=AGG_SUMMARY,
        metrics=[p for t in AGG_TASKS if t != "in1k" for p in agg_metrics(t, scratch=False)],
    output:
        **agg_figure_outputs("fig3"),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("fig3"),
    script:
        AGG_SCRIPT


rule fig4:
    input:
        summary=AGG_SUMMARY,
        overfit=AGG_OVERFIT,
        metrics=agg_all_metrics(),
    output:
        **agg_figure_outputs("fig4"),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("fig4"),
    script:
        AGG_SCRIPT


def fig5_inputs(wc):
    # lazy: finding the largest model builds each encoder on the meta device
    return {
        "overfit": AGG_OVERFIT,
        "checkpoints": [str(p) for p in AGG.figure5_checkpoints(CFG, RESULTS).values()],
        "manifests": AGG_MANIFESTS,
        "val_index": str(AGG.val_index_path(CFG, RESULTS)),
    }


rule fig5:
    input:
        unpack(fig5_inputs),
    output:
        **agg_figure_outputs("fig5"),
    resources:
        **AGG_HEAVY,
    params:
        **agg_params("fig5"),
    script:
        AGG_SCRIPT


rule fig6:
    input:
        curves=AGG_CURVES if AGG_SAMPLING else [],
        manifests=[res(P.MANIFEST, dataset=d) for d in AGG_SAMPLING],
    output:
        **agg_figure_outputs("fig6"),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("fig6"),
    script:
        AGG_SCRIPT


rule fig7:
    input:
        AGG_CURVES,
    output:
        **agg_figure_outputs("fig7"),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("fig7"),
    script:
        AGG_SCRIPT


rule fig8:
    input:
        AGG_CURVES,
    output:
        **agg_figure_outputs("fig8"),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("fig8"),
    script:
        AGG_SCRIPT


# ---------------------------------------------------------------- beyond the paper
rule proxy:
    input:
        summary=AGG_SUMMARY,
        metrics=agg_all_metrics(),
    output:
        cells=agg_path(AC.PROXY_CELLS),
        summary=agg_path(AC.PROXY_SUMMARY),
        md=agg_path(AC.PROXY_REPORT, ext="md"),
        html=report(agg_path(AC.PROXY_REPORT, ext="html"), caption=AGG_CAPTION.format("proxy"),
                    category="Beyond the paper", labels={"name": "proxy", "type": "table"}),
        **agg_figure_outputs("proxy", "Beyond the paper"),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("proxy"),
    script:
        AGG_SCRIPT


rule scaling:
    input:
        stats=AGG_TABLE1,
        summary=AGG_SUMMARY,
        overfit=AGG_OVERFIT,
        manifests=AGG_MANIFESTS,
    output:
        json=agg_path(AC.SCALING_JSON),
        fit=agg_path(AC.SCALING_FIT),
        predictions=agg_path(AC.SCALING_PREDICTIONS),
        md=agg_path(AC.SCALING_REPORT, ext="md"),
        html=report(agg_path(AC.SCALING_REPORT, ext="html"), caption=AGG_CAPTION.format("scaling"),
                    category="Beyond the paper", labels={"name": "scaling", "type": "table"}),
        **agg_figure_outputs("scaling", "Beyond the paper"),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("scaling"),
    script:
        AGG_SCRIPT


# ---------------------------------------------------------------- the paper's findings as rules
# The optional seed spread (analysis/seed_spread.csv) is an input only when it is already there:
# this workflow never builds it (the seed-spread measurement does).
AGG_SEEDS = agg_path(AC.SEED_SPREAD)


rule findings:
    input:
        summary=AGG_SUMMARY,
        overfit=AGG_OVERFIT,
        tables=[agg_path(AC.TABLE, name=f"table{i}", ext="csv") for i in range(2, 10)],
        metrics=[p for task in AGG_TASKS for p in agg_metrics(task)],  # scratch too (pre-training helps)
        seeds=[AGG_SEEDS] if os.path.exists(AGG_SEEDS) else [],
    output:
        json=agg_path(AC.FINDINGS, ext="json"),
        md=agg_path(AC.FINDINGS, ext="md"),
        html=report(agg_path(AC.FINDINGS, ext="html"), caption=AGG_CAPTION.format("findings"),
                    category="1. Findings", labels={"name": "findings", "type": "page"}),
    resources:
        **AGG_RESOURCES,
    params:
        **agg_params("findings"),
    script:
        AGG_SCRIPT


AGG_TABLES = [f"table{i}" for i in range(1, 10)]
AGG_FIGURES = [f"fig{i}" for i in range(1, 9)]


rule aggregate_all:
    input:
        [agg_path(AC.TABLE, name=t, ext=e) for t in AGG_TABLES for e in ("csv", "md", "html")],
        [agg_path(AC.FIGURE, name=f, ext=e) for f in AGG_FIGURES + ["proxy", "scaling"] for e in ("png", "pdf")],
        AGG_OVERFIT,
        agg_path(AC.PROXY_SUMMARY),
        agg_path(AC.SCALING_JSON),
        [agg_path(AC.FINDINGS, ext=e) for e in ("json", "md", "html")],
