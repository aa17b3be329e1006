"""Snakemake script of every aggregation rule (workflow/rules/aggregate.smk): builds the target
named by ``params.target`` from the validated config in ``params.config`` into the rule's
``snakemake.output`` (declared once, by mimlib.analysis.aggregate.target_outputs)."""

from mimlib.analysis.aggregate import run_target

params = snakemake.params  # noqa: F821 (injected by Snakemake's script directive)
extra = {"tolerance": params.tolerance} if "tolerance" in params.keys() else {}
run_target(params.target, params.config, out=dict(snakemake.output.items()), **extra)  # noqa: F821
