# mimscale: SimMIM x SwinV2 data-scaling study.
#   snakemake --cores all                      # the embedded demo (config/config.yaml)
#   snakemake --cores all results/pretrain/<model>/<dataset>/<length>/checkpoint.pt
#   snakemake --configfile config/paper.yaml --profile slurm ...
from snakemake.utils import min_version

min_version("9.0")


# The embedded demo, unless --configfile names a study (which then replaces it whole,
# rather than being merged into it key by key).
if not workflow.overwrite_configfiles:
    from mimlib.config import ConfigError, read_yaml

    # Snakemake's own message for a YAML error names neither file nor line; this one does.
    # (A --configfile is read by Snakemake before this file runs: check it with
    # `python -m mimlib check-config FILE`.)
    try:
        read_yaml("config/config.yaml")
    except ConfigError as exc:
        raise WorkflowError(str(exc)) from None

    configfile: "config/config.yaml"


# `snakemake --report report.html` opens on this description: start with the findings page.
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/aggregate.smk"


rule all:
    input:
        res(P.PRETRAIN_SUMMARY),
        res(P.FINETUNE_SUMMARY) if FT["tasks"] else [],
        rules.aggregate_all.input,


# Recorded training jobs no longer need their final state (workflow/rules/common.smk).
onsuccess:
    drop_recorded_final_states()


onerror:
    drop_recorded_final_states()
