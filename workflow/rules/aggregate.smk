# Aggregation: the paper's Tables 1-9 and Figures 1-8, the overfitting classification, the
# validation-loss-as-proxy analysis, the scaling fit and the findings page (the paper's findings
# as rules on the study's own results; mimlib/analysis/). Each target reads
# only the results it needs (Table 3: the IN-1K metrics; Table 6: the COCO ones; ...);
# `aggregate_all` builds them all. Outputs marked report() make `snakemake --report report.html`.
# Needs from common.smk: CFG, RESULTS, res(), P.
import os

from mimlib.analysis import aggregate as AGG
from mimlib.analysis import common as AC
from mimlib.analysis.paper import paper_datasets
from mimlib.analysis.tables import decoder_groups, sampling_candidates
from mimlib.resources import light_resources as _agg_light_resources

AGG_TASKS = CFG["finetune"].get("tasks", [])
AGG_CAPTION = "../report/{}.rst"
# Every target runs workflow/scripts/aggregate.py (a fresh, light process: pandas + matplotlib,
# torch only where a target needs it) with the validated config and its name as params.
AGG_SCRIPT = "../scripts/aggregate.py"
AGG_RESOURCES = {k: v for k, v in _agg_light_resources().items() if k in ("mem_mb", "runtime", "cpus_per_task")}
AGG_HEAVY = {**AGG_RESOURCES, "mem_mb": 32000}


def agg_path(pattern, **kw):
    return res(pattern.format(**kw))


def agg_outputs(name, category, reported):
    """The target's outputs as mimlib.analysis.aggregate.target_outputs declares them; the keys in
    ``reported`` (key -> type label) go into `snakemake --report` under ``category``."""
    outputs = {k: str(v) for k, v in AGG.target_outputs(name, RESULTS).items()}
    for key, kind in reported.items():
        outputs[key] = report(outputs[key], caption=AGG_CAPTION.format(name), category=category,
                              labels={"name": name, "type": kind})
    return outputs


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


# ---------------------------------------------------------------- the targets
# One row per target: its inputs, where the report shows it, and what it needs beyond the light
# resources. The rules below are generated from this table; their outputs come from
# mimlib.analysis.aggregate.target_outputs and reach the writer as snakemake.output.
TABLE = ("Tables", {"html": "table"})
FIGURE = ("Figures", {"png": "figure"})
BEYOND = ("Beyond the paper", {"html": "table", "png": "figure"})


def fig5_inputs(wc):
    # lazy: finding the largest model builds each encoder on the meta device
    return {
        "overfit": AGG_OVERFIT,
        "checkpoints": [str(p) for p in AGG.figure5_checkpoints(CFG, RESULTS).values()],
        "manifests": AGG_MANIFESTS,
        "val_index": str(AGG.val_index_path(CFG, RESULTS)),
    }


# The optional seed spread (analysis/seed_spread.csv) is an input only when it is already there:
# this workflow never builds it (the seed-spread measurement does).
AGG_SEEDS = agg_path(AC.SEED_SPREAD)
DECODERS, SAMPLING = bool(decoder_groups(CFG)), bool(AGG_SAMPLING)

AGG_TARGETS = {
    # Table 1 (fvcore traces every encoder) and Figure 5 (loads the largest model twice) need more memory.
    "table1": dict(input={}, shown=TABLE, heavy=True),
    "table2": dict(input={"manifests": AGG_MANIFESTS}, shown=TABLE),
    "table3": dict(input={"metrics": agg_metrics("in1k")}, shown=TABLE),
    "table4": dict(input={"metrics": agg_metrics("inat18")}, shown=TABLE),
    "table5": dict(input={"metrics": agg_metrics("ade20k")}, shown=TABLE),
    "table6": dict(input={"metrics": agg_metrics("coco")}, shown=TABLE),
    "overfitting": dict(input={"summary": AGG_SUMMARY, "curves": AGG_CURVES},
                        shown=("Analysis", {"csv": "table (CSV)"}),
                        params={"tolerance": AC.analysis_settings(CFG)["overfit_tolerance"]}),
    "table7": dict(input={"summary": AGG_SUMMARY, "overfit": AGG_OVERFIT, "metrics": agg_all_metrics()},
                   shown=TABLE),
    "table8": dict(input={"summary": [AGG_SUMMARY] if DECODERS else [],
                          "metrics": agg_metrics("in1k", scratch=False) if DECODERS else []}, shown=TABLE),
    "table9": dict(input={"summary": [AGG_SUMMARY] if SAMPLING else [],
                          "manifests": [res(P.MANIFEST, dataset=d) for d in AGG_SAMPLING],
                          "metrics": agg_metrics("in1k", scratch=False, datasets=AGG_SAMPLING) if SAMPLING else []},
                   shown=TABLE),
    "fig1": dict(input={"stats": AGG_TABLE1, "summary": AGG_SUMMARY, "metrics": agg_metrics("in1k", scratch=False)},
                 shown=FIGURE),
    "fig2": dict(input={"summary": AGG_SUMMARY, "metrics": agg_metrics("in1k", scratch=False)}, shown=FIGURE),
    "fig3": dict(input={"stats": AGG_TABLE1, "summary": AGG_SUMMARY,
                        "metrics": [p for t in AGG_TASKS if t != "in1k" for p in agg_metrics(t, scratch=False)]},
                 shown=FIGURE),
    "fig4": dict(input={"summary": AGG_SUMMARY, "overfit": AGG_OVERFIT, "metrics": agg_all_metrics()},
                 shown=FIGURE),
    "fig5": dict(input=fig5_inputs, shown=FIGURE, heavy=True),
    "fig6": dict(input={"curves": [AGG_CURVES] if SAMPLING else [],
                        "manifests": [res(P.MANIFEST, dataset=d) for d in AGG_SAMPLING]}, shown=FIGURE),
    "fig7": dict(input={"curves": AGG_CURVES}, shown=FIGURE),
    "fig8": dict(input={"curves": AGG_CURVES}, shown=FIGURE),
    # beyond the paper
    "proxy": dict(input={"summary": AGG_SUMMARY, "metrics": agg_all_metrics()}, shown=BEYOND),
    "scaling": dict(input={"stats": AGG_TABLE1, "summary": AGG_SUMMARY, "overfit": AGG_OVERFIT,
                           "manifests": AGG_MANIFESTS}, shown=BEYOND),
    # the paper's Tables 3-6 against the study's cells that are the paper's (none: an empty page)
    "reproduction": dict(input={"metrics": [p for t in AGG_TASKS
                                            for p in agg_metrics(t, scratch=False, datasets=paper_datasets(CFG))]},
                         shown=("Analysis", {"html": "page"})),
    # the paper's findings as rules (scratch metrics too: "pre-training helps")
    "findings": dict(input={"summary": AGG_SUMMARY, "overfit": AGG_OVERFIT,
                            "tables": [agg_path(AC.TABLE, name=f"table{i}", ext="csv") for i in range(2, 10)],
                            "metrics": [p for task in AGG_TASKS for p in agg_metrics(task)],
                            "seeds": [AGG_SEEDS] if os.path.exists(AGG_SEEDS) else []},
                     shown=("1. Findings", {"html": "page"})),
}


def agg_input(spec):
    return spec["input"] if callable(spec["input"]) else (lambda wc: spec["input"])


for agg_name, agg_spec in AGG_TARGETS.items():

    rule:
        name:
            agg_name
        input:
            unpack(agg_input(agg_spec)),
        output:
            **agg_outputs(agg_name, *agg_spec["shown"]),
        log:
            agg_path("logs/aggregate/{name}.log", name=agg_name),
        resources:
            **(AGG_HEAVY if agg_spec.get("heavy") else AGG_RESOURCES),
        params:
            target=agg_name,
            config=CFG,
            **agg_spec.get("params", {}),
        script:
            AGG_SCRIPT


rule aggregate_all:
    input:
        [str(p) for name in AGG_TARGETS for p in AGG.target_outputs(name, RESULTS).values()],
